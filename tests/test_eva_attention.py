"""jina-clip's EVA attention through scaled_dot_product_attention: the same numbers as its naive formula."""

from __future__ import annotations

import pytest
import torch
from structlog.testing import capture_logs
from torch import nn

from image_search import eva_attention
from image_search.eva_attention import is_eva_attention, patch_eva_attention
from tests.support.jina_remote_code.eva_model import Attention, Rope
from tests.support.jina import jina_stand_in_model


def count_sdpa_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(eva_attention.F, "scaled_dot_product_attention", counting)
    return calls


@pytest.mark.parametrize("subln", [True, False])
@pytest.mark.parametrize("qkv_bias", [True, False])
@pytest.mark.parametrize("with_rope", [True, False])
def test_sdpa_forward_equals_the_naive_formula(subln: bool, qkv_bias: bool, with_rope: bool, monkeypatch) -> None:
    torch.manual_seed(3)
    tokens, dim, heads = 17, 64, 4  # a class token and 16 patch tokens
    attention = Attention(dim, heads, qkv_bias=qkv_bias, subln=subln,
                          rope=Rope(tokens - 1, dim // heads) if with_rope else None, attn_drop=0.3).eval()
    attention.scale = 0.2  # not SDPA's default 1/sqrt(head_dim): the scale must be passed through
    x = torch.randn(3, tokens, dim)
    with torch.inference_mode():
        naive = attention(x)
    sdpa_calls = count_sdpa_calls(monkeypatch)
    assert patch_eva_attention(attention) == 1
    with torch.inference_mode():
        fused = attention(x)
    assert sdpa_calls == [1]  # the fused path did run
    torch.testing.assert_close(fused, naive, atol=1e-5, rtol=1e-5)


def test_biases_and_masks_keep_the_remote_codes_own_path(monkeypatch) -> None:
    torch.manual_seed(4)
    attention = Attention(32, 2, qkv_bias=True, subln=False, rope=None).eval()
    x, bias = torch.randn(2, 5, 32), torch.randn(2, 5, 5)
    expected = attention(x, rel_pos_bias=bias)
    patch_eva_attention(attention)
    sdpa_calls = count_sdpa_calls(monkeypatch)
    torch.testing.assert_close(attention(x, rel_pos_bias=bias), expected)
    assert sdpa_calls == []


def test_a_whole_tower_is_patched_with_one_log_line_and_only_without_xformers() -> None:
    model = jina_stand_in_model()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        naive = model.get_image_features(pixel_values=pixels)
    with capture_logs() as logs:
        assert patch_eva_attention(model) == 2
        assert patch_eva_attention(model) == 2  # again: still the fused forward, original kept once
    assert [entry["event"] for entry in logs] == ["eva_attention_patched", "eva_attention_patched"]
    with torch.inference_mode():
        torch.testing.assert_close(model.get_image_features(pixel_values=pixels), naive, atol=1e-5, rtol=1e-5)

    with_xformers = jina_stand_in_model()
    for block in with_xformers.vision_model.blocks:
        block.xattn = True  # as jina's loader sets it where xformers is installed and CUDA is there
    assert patch_eva_attention(with_xformers) == 0


def test_only_the_remote_eva_attention_class_is_recognised() -> None:
    assert is_eva_attention(Attention(32, 2, qkv_bias=True, subln=True, rope=None))

    class OtherAttention(nn.Module):  # right name, wrong module
        pass

    OtherAttention.__name__ = "Attention"
    assert not is_eva_attention(OtherAttention())
    assert not is_eva_attention(nn.MultiheadAttention(32, 2))


@pytest.mark.integration
def test_the_benchmarks_eva_tower_is_patched_whole_and_measured(monkeypatch) -> None:
    """tests/benchmarks/eva.py (the --gpu benchmark's jina-sized tower) at its CPU smoke size: every block's
    attention is patched, the tower computes what it did unpatched, and ``measure`` reports every number
    (tests/test_gpu.py runs it at jina-clip-v2's size on CUDA)."""
    import math

    from tests.benchmarks import eva

    torch.manual_seed(0)
    tower = eva.Tower(eva.SMOKE).eval()
    pixels = torch.randn(2, 3, eva.SMOKE.image, eva.SMOKE.image)
    with torch.inference_mode():
        naive = tower(pixels)
    sdpa_calls = count_sdpa_calls(monkeypatch)
    assert patch_eva_attention(tower) == eva.SMOKE.blocks
    with torch.inference_mode():
        torch.testing.assert_close(tower(pixels), naive, atol=1e-5, rtol=1e-5)
    assert len(sdpa_calls) == eva.SMOKE.blocks
    assert (eva.SMOKE.tokens, eva.JINA_CLIP_V2.tokens) == (17, 1297)  # a class token and (image / patch)^2

    monkeypatch.undo()  # measure compiles: the real SDPA, not the counting stand-in
    report = eva.measure(torch.device("cpu"), batch=2, rounds=1)
    assert report["gpu_eva_tokens"] == eva.SMOKE.tokens
    for key, value in report.items():
        assert math.isfinite(value) and value > 0, (key, value)  # the compiled tower ran too (0 when it failed)
