"""``torch.compile`` of the vision tower, block by block (config key ``compile-model``).

Regional compilation: each block of the vision tower's longest ``ModuleList`` (CLIP's and SigLIP's
``encoder.layers``, jina-clip's EVA ``blocks``) is compiled in place with ``nn.Module.compile``. The
blocks share one code object, so one compiled graph serves them all and the start-up cost is about
one block's, not the tower's. The code around the blocks (patch embedding, pooling, projection)
stays eager, and with it what jina's remote code does between them: its ``forward_features`` rebinds
``rope.forward`` to a new ``functools.partial`` at each call. A Tenstorrent loader for jina-clip-v2
reports that this made dynamo recompile at every call (18 against its limit of 8); with the torch this
project locks, dynamo guards a partial by what it wraps and compiles once (tested on the stand-in
tower, which rebinds as jina's does).

It costs start-up time, not the first ingest's: ``compile_blocks`` compiles at batch sizes 1 and 2
(torch specialises size 1 and makes the batch dimension dynamic at the second size), then runs a third
size with recompiles forbidden. Blocks that would recompile there, that need more graphs than dynamo
keeps (it would run them eagerly without a word), or that do not compile at all (no C compiler for the
CPU backend, an operator the backend lacks, a Python torch.compile does not support) are put back as
they were, with one warning, and the model runs eagerly.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog
import torch
from torch import nn

from .errors import describe

log = structlog.get_logger(__name__)

# Batch sizes run at start-up: 1 and 2 compile the graphs every later pass uses; 3 proves it.
WARM_UP_SIZES = (1, 2)
PROOF_SIZE = 3


def vision_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The repeated blocks of ``model.vision_model``: its longest ``ModuleList`` of one module type."""
    tower = getattr(model, "vision_model", None)
    if not isinstance(tower, nn.Module):
        return None
    lists = [m for m in tower.modules() if isinstance(m, nn.ModuleList) and len(m) and len({type(b) for b in m}) == 1]
    return max(lists, key=len, default=None)


def compile_blocks(blocks: nn.ModuleList, forward: Callable[[int], object]) -> bool:
    """Compile ``blocks`` in place and compile them now through ``forward(batch_size)``, a forward pass
    of the model they belong to. True when they run compiled; False (one warning, the blocks as they
    were) when the compile fails or a pass at a new batch size would compile again."""
    started = time.monotonic()
    try:
        for block in blocks:
            block.compile()  # raises on a Python torch.compile does not support yet
        # Past dynamo's limit of compiled versions a code object runs eagerly from then on, unseen by the
        # stance below (blocks that each need a graph of their own, say): raise that too.
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            for size in WARM_UP_SIZES:
                forward(size)
            with torch.compiler.set_stance("fail_on_recompile"):
                forward(PROOF_SIZE)
    except Exception as exc:  # a backend error, no C compiler, a recompile at the proof size...
        for block in blocks:
            # nn.Module.compile keeps the compiled call here; without it the module calls forward as before.
            block._compiled_call_impl = None
        torch.compiler.reset()
        log.warning("model_compile_failed", reason=describe(exc)[:300], detail="the model runs without torch.compile")
        return False
    log.info("model_compiled", blocks=len(blocks), block=type(blocks[0]).__name__,
             seconds=round(time.monotonic() - started, 1))
    return True
