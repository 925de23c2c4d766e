"""A jina-clip-v2-sized EVA02 vision tower: its naive attention against ``scaled_dot_product_attention``.

jina-clip-v2's tower is EVA02-L/14 at 512 px: 24 blocks of width 1024, 16 heads, 1,297 tokens (a class
token and 37 x 37 patches), each block an attention (separate q/k/v projections, a rotary embedding,
an inner layer norm) and a SwiGLU MLP of 2,730. Its remote code cannot be downloaded here, so the
tower is built from the test stand-in's ``Attention`` (its naive forward is the remote one's, step for
step) plus blocks of those sizes; ``patch_eva_attention`` then swaps the attention product exactly as
it does in the real model. Random weights: the speed does not depend on them.

Measured: images/s naive (bf16), with SDPA (bf16), with SDPA in fp16 (jina trains in bf16; the
question is only whether fp16 would be faster on this GPU), and with SDPA in bf16 and the blocks
compiled as config key 'compile-model' compiles them (``compiled.compile_blocks``: its start-up cost
too). Each is also given in achieved TFLOPS (``TowerSize.flops_per_image``), to compare with the GPU's
dense bf16 peak (989 TFLOPS on an H100 or H200 SXM).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from image_search.compiled import compile_blocks
from image_search.eva_attention import patch_eva_attention
from tests.benchmarks.common import images_per_s
from tests.support.jina_remote_code.eva_model import Attention, Rope


@dataclass(frozen=True)
class TowerSize:
    blocks: int
    dim: int
    heads: int
    mlp: int
    image: int
    patch: int

    @property
    def tokens(self) -> int:
        return (self.image // self.patch) ** 2 + 1

    @property
    def flops_per_image(self) -> float:
        """Floating-point operations of one forward pass (a multiply-add is two): the patch embedding,
        and per block the q/k/v/output projections, q k^T and the product with v, the SwiGLU MLP."""
        n, d, h = self.tokens, self.dim, self.mlp
        patches = 2 * (n - 1) * 3 * self.patch ** 2 * d
        block = 2 * 4 * n * d * d + 2 * 2 * n * n * d + 2 * 3 * n * d * h
        return float(patches + self.blocks * block)


JINA_CLIP_V2 = TowerSize(blocks=24, dim=1024, heads=16, mlp=2730, image=512, patch=14)
SMOKE = TowerSize(blocks=2, dim=64, heads=4, mlp=128, image=56, patch=14)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.ffn_ln = nn.LayerNorm(hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(self.ffn_ln(F.silu(gate) * value))


class Block(nn.Module):
    def __init__(self, size: TowerSize, rope: Rope) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(size.dim)
        self.attn = Attention(size.dim, size.heads, qkv_bias=True, subln=True, rope=rope)
        self.norm2 = nn.LayerNorm(size.dim)
        self.mlp = SwiGLU(size.dim, size.mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Tower(nn.Module):
    def __init__(self, size: TowerSize) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, size.dim, kernel_size=size.patch, stride=size.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, size.dim))
        rope = Rope(size.tokens - 1, size.dim // size.heads)
        self.blocks = nn.ModuleList(Block(size, rope) for _ in range(size.blocks))
        self.norm = nn.LayerNorm(size.dim)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]


def _images_per_s(tower: nn.Module, pixels: torch.Tensor, rounds: int) -> float:
    with torch.inference_mode():
        tower(pixels)  # warm-up: kernels chosen, allocator grown
        return images_per_s(rounds * len(pixels), lambda: [tower(pixels) for _ in range(rounds)])


def measure(device: torch.device, *, batch: int, rounds: int) -> dict[str, float]:
    """Naive against SDPA in bf16, SDPA in fp16, and SDPA in bf16 compiled, on one tower of
    jina-clip-v2's size (smoke size on the CPU)."""
    size = JINA_CLIP_V2 if device.type == "cuda" else SMOKE
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    tower = Tower(size).to(device, dtype).eval()
    pixels = torch.randn(batch, 3, size.image, size.image, device=device, dtype=dtype)
    naive = _images_per_s(tower, pixels, rounds)
    if patch_eva_attention(tower) != size.blocks:
        raise RuntimeError("patch_eva_attention did not take every block of the stand-in tower")
    sdpa = _images_per_s(tower, pixels, rounds)
    fp16 = sdpa
    if device.type == "cuda":
        fp16 = _images_per_s(tower.to(torch.float16), pixels.to(torch.float16), rounds)
        tower.to(dtype)

    def forward(count: int) -> None:
        with torch.inference_mode():
            tower(pixels[:1].expand(count, -1, -1, -1))

    started = time.perf_counter()
    # A compile that fails (its warning says why) costs only its own numbers, reported as 0.
    compiled_ok = compile_blocks(tower.blocks, forward)
    compile_s = time.perf_counter() - started
    compiled = _images_per_s(tower, pixels, rounds) if compiled_ok else 0.0
    tower = pixels = None  # freed for what follows (del: forward() above would name nothing)
    torch.compiler.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    tflops = size.flops_per_image / 1e12
    return {"gpu_eva_naive_img_s": naive, "gpu_eva_sdpa_img_s": sdpa, "gpu_eva_sdpa_fp16_img_s": fp16,
            "gpu_eva_compiled_img_s": compiled, "gpu_eva_sdpa_speedup": sdpa / naive,
            "gpu_eva_compile_speedup": compiled / sdpa, "gpu_eva_compile_s": compile_s,
            "gpu_eva_sdpa_tflops": sdpa * tflops, "gpu_eva_compiled_tflops": compiled * tflops,
            "gpu_eva_tokens": size.tokens}
