"""torch.compile of the vision tower, block by block (config key 'compile-model', compiled.py): the
compiled model embeds as the eager one at every batch size without compiling again, and a compile that
does not hold leaves the model eager with one warning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from structlog.testing import capture_logs
from torch import nn

from image_search.compiled import compile_blocks, vision_blocks
from image_search.embed import Embedder
from tests.support.jina import save_jina_stand_in

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def jina_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_jina_stand_in(tmp_path_factory.mktemp("jina-stand-in"))


def compile_fails(blocks: nn.ModuleList, forward) -> dict:
    """compile_blocks on blocks it must put back: its warning, the blocks checked to be eager again."""
    with capture_logs() as logs:
        assert compile_blocks(blocks, forward) is False
    [event] = [e for e in logs if e["event"] == "model_compile_failed"]
    assert event["log_level"] == "warning" and event["detail"] == "the model runs without torch.compile"
    assert all(b._compiled_call_impl is None for b in blocks)
    return event


@pytest.mark.parametrize("family", ["clip", "jina"])
def test_the_compiled_tower_embeds_as_the_eager_one_at_any_batch_size(family, tiny_model_dir, jina_dir) -> None:
    """The compile is paid at load (batch sizes 1 and 2), then passes of any size reuse it. The jina
    stand-in rebinds rope.forward to a new partial at every call, as jina's remote code does."""
    model_dir = str(tiny_model_dir if family == "clip" else jina_dir)
    eager = Embedder.load(model_dir, device="cpu")
    with capture_logs() as logs:
        compiled = Embedder.load(model_dir, device="cpu", compile_model=True)
    [event] = [e for e in logs if e["event"] == "model_compiled"]
    blocks = vision_blocks(compiled._model)
    assert blocks is not None and event["blocks"] == len(blocks) == 2
    assert event["block"] == ("CLIPEncoderLayer" if family == "clip" else "Attention")
    assert all(b._compiled_call_impl is not None for b in blocks)
    width, height = compiled.pixel_spec.output_size
    pixels = np.random.default_rng(0).integers(0, 256, (7, height, width, 3), dtype=np.uint8)
    with torch.compiler.set_stance("fail_on_recompile"):  # a pass that compiles again raises here
        for size in (1, 2, 4, 7):
            np.testing.assert_allclose(compiled.embed_images(pixels[:size]), eager.embed_images(pixels[:size]),
                                       atol=1e-5, err_msg=f"batch of {size}")


def test_blocks_that_would_compile_at_every_pass_are_put_back_eager() -> None:
    """A guard that never holds (here on a string the code around the blocks changes at every pass, as
    jina's rebinding of rope.forward was reported to be) would recompile at each pass, then run eagerly
    once dynamo gives up, unseen: the start-up proof catches it and puts the blocks back."""

    class Drifting(nn.Module):
        tag = ""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * len(Drifting.tag)

    blocks = nn.ModuleList([Drifting(), Drifting()])

    def forward(size: int) -> None:
        Drifting.tag += "+"
        x = torch.ones(size, 3)
        for block in blocks:
            x = block(x)

    reason = compile_fails(blocks, forward)["reason"]
    assert "Recompil" in reason or "recompil" in reason, reason
    Drifting.tag = "+++++"
    assert torch.equal(blocks[0](torch.ones(1)), torch.full((1,), 5.0))  # eager again: reads the tag as it is


def test_blocks_that_need_more_graphs_than_dynamo_keeps_are_put_back_eager() -> None:
    """Ten blocks that each need a graph of their own (a string attribute guarded by value) pass dynamo's
    limit of 8 compiled versions of the one code they share: past it dynamo runs them eagerly without a
    word, and the compile would be reported as done. The start-up passes make that an error instead."""

    class Tagged(nn.Module):
        def __init__(self, index: int) -> None:
            super().__init__()
            self.tag = "+" * (index + 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * len(self.tag)

    blocks = nn.ModuleList([Tagged(i) for i in range(10)])

    def forward(size: int) -> None:
        x = torch.ones(size, 3)
        for block in blocks:
            x = block(x)

    reason = compile_fails(blocks, forward)["reason"]
    assert "fail_on_recompile_limit_hit" in reason, reason


def test_a_torch_compile_that_refuses_to_start_leaves_the_blocks_eager(monkeypatch) -> None:
    """torch.compile itself raises on a Python it does not support yet: a warning, not a failed start."""

    def unsupported(self, *args, **kwargs):
        raise RuntimeError("torch.compile is not supported on Python 3.16+")

    blocks = nn.ModuleList([nn.Linear(3, 3), nn.Linear(3, 3)])
    monkeypatch.setattr(nn.Module, "compile", unsupported)
    reason = compile_fails(blocks, lambda size: blocks[0](torch.ones(size, 3)))["reason"]
    assert reason == "RuntimeError: torch.compile is not supported on Python 3.16+"


def test_a_model_without_repeated_vision_blocks_is_not_compiled() -> None:
    assert vision_blocks(nn.Linear(2, 2)) is None

    class Tower(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vision_model = nn.Sequential(nn.ModuleList([nn.Linear(2, 2)]),
                                              nn.ModuleList([nn.ReLU(), nn.ReLU(), nn.ReLU()]),
                                              nn.ModuleList([nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2), nn.ReLU()]))

    # The longest list of one module type: the three ReLUs, not the longer mixed list.
    blocks = vision_blocks(Tower())
    assert blocks is not None and len(blocks) == 3 and all(isinstance(b, nn.ReLU) for b in blocks)
