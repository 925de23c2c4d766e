"""A stand-in for jina-clip-implementation's eva_model.py: the EVA02 vision tower, tiny.

``Attention`` has the attributes of the remote ``eva_model.Attention`` and its naive (no xformers)
forward, written from the remote code; this module is named ``eva_model`` as the remote one is, in
tests and when transformers loads it as remote code from a saved model directory.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Pairs (x1, x2) -> (-x2, x1) along the last dimension, as EVA's rope does."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    x1, x2 = pairs.unbind(-1)
    return torch.stack((-x2, x1), dim=-1).reshape(x.shape)


class Rope(nn.Module):
    """A rotary embedding over ``tokens`` patch tokens with fixed random angles (VisionRotaryEmbeddingFast's form)."""

    def __init__(self, tokens: int, head_dim: int, seed: int = 0) -> None:
        super().__init__()
        angles = torch.rand(tokens, head_dim // 2, generator=torch.Generator().manual_seed(seed)) * 6.28
        angles = angles.repeat_interleave(2, dim=-1)
        # Not saved (one rope is shared by every block); recomputed from the seed when loaded.
        self.register_buffer("freqs_cos", angles.cos(), persistent=False)
        self.register_buffer("freqs_sin", angles.sin(), persistent=False)

    def forward(self, t: torch.Tensor, patch_indices_keep: torch.Tensor | None = None) -> torch.Tensor:
        return t * self.freqs_cos + rotate_half(t) * self.freqs_sin


class Attention(nn.Module):
    """eva_model.Attention's attributes and its naive (no xformers) forward, written from the remote code."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, subln: bool, rope: nn.Module | None,
                 attn_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim ** -0.5
        self.subln = subln
        if subln:
            self.q_proj = nn.Linear(dim, dim, bias=False)
            self.k_proj = nn.Linear(dim, dim, bias=False)
            self.v_proj = nn.Linear(dim, dim, bias=False)
        else:
            self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.randn(dim) * 0.1) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.randn(dim) * 0.1) if qkv_bias else None
        self.window_size = None
        self.relative_position_bias_table = None
        self.relative_position_index = None
        self.attn_drop = nn.Dropout(attn_drop)
        self.inner_attn_ln = nn.LayerNorm(dim) if subln else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)
        self.xattn = False
        self.xattn_drop = attn_drop
        self.rope = rope

    def forward(self, x: torch.Tensor, rel_pos_bias: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        if self.subln:
            q = F.linear(x, self.q_proj.weight, self.q_bias).reshape(b, n, self.num_heads, -1).permute(0, 2, 1, 3)
            k = F.linear(x, self.k_proj.weight, None).reshape(b, n, self.num_heads, -1).permute(0, 2, 1, 3)
            v = F.linear(x, self.v_proj.weight, self.v_bias).reshape(b, n, self.num_heads, -1).permute(0, 2, 1, 3)
        else:
            bias = None
            if self.q_bias is not None:
                bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
            qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
        if self.rope:
            q = torch.cat((q[:, :, :1, :], self.rope(q[:, :, 1:, :])), -2).type_as(v)
            k = torch.cat((k[:, :, :1, :], self.rope(k[:, :, 1:, :])), -2).type_as(v)
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        if rel_pos_bias is not None:
            attn = attn + rel_pos_bias.type_as(attn)
        if attn_mask is not None:
            attn = attn.masked_fill(~attn_mask.bool()[:, None, None, :], float("-inf"))
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(b, n, -1)
        x = self.inner_attn_ln(x)
        x = self.proj(x)
        return self.proj_drop(x)


class EVAVisionTransformer(nn.Module):
    """A two-block EVA-like tower: patch embedding, class token, attention blocks, class-token output."""

    def __init__(self, image_size: int, patch: int, dim: int, heads: int) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        tokens = (image_size // patch) ** 2
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        rope = self.rope = Rope(tokens, dim // heads)
        self.blocks = nn.ModuleList([Attention(dim, heads, qkv_bias=True, subln=subln, rope=rope) for subln in (True, False)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        # As the remote forward_features does at every call (patch dropout off, as in eval): a new
        # partial each time, which a compiled block reading self.rope.forward would recompile on.
        self.rope.forward = partial(self.rope.forward, patch_indices_keep=None)
        for block in self.blocks:
            x = x + block(x)
        return self.norm(x)[:, 0]
