"""A real CUDA device fault in the middle of the batched decoder's work (tests/test_gpu.py): the other half
of what the quarantine is for. A fault leaves the process's CUDA context broken for good, so it runs here,
in a process of its own.

``python -m tests.support.gpu_fault STATE_DIR FILE...`` opens the batched reader on "cuda" (nvJPEG, chunks of
two files) with STATE_DIR as its state directory and reads the files. Right after nvJPEG has decoded a chunk
holding a file with FAULT_MARKER in its bytes, a kernel indexes out of bounds: a device-side assert, which
CUDA reports at a later call and which is sticky (every later call fails), as an illegal address in a
decoder would be. Only the fault is staged; its detection (``_device_fault``), the quarantine and the CPU
path are the project's. Prints one JSON line: what each file became and what the decoder logged.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

FAULT_MARKER = b"this file breaks the CUDA device"
CHUNK = 2


def fault_on(device) -> None:
    """Queue a kernel that reads out of bounds: CUDA's device-side assert, raised by a later call."""
    import torch

    small = torch.zeros(4, device=device)
    small[torch.tensor([1 << 30], device=device)]  # noqa: B018 - the launch is the point


def main(state_directory: Path, paths: list[Path]) -> None:
    from structlog.testing import capture_logs

    from image_search import gpudecode
    from image_search.gpudecode import BatchedJpegDecoder
    from image_search.preprocess import PreparedImage
    from image_search.workers import PreprocessPool
    from tests.support.jpegs import CLIP_224, LIMIT

    real_decode_each = BatchedJpegDecoder._decode_each

    def decode_then_fault(self, data, *args, **kwargs):
        decoded = real_decode_each(self, data, *args, **kwargs)
        if any(FAULT_MARKER in bytes(d) for d in data):
            fault_on(self.device)
        return decoded

    BatchedJpegDecoder._decode_each = decode_then_fault
    gpudecode.DECODE_CHUNK = CHUNK
    with PreprocessPool(max_size=(512, 512), max_pixels=LIMIT, workers=0) as pool, capture_logs() as logs:
        reader = gpudecode.open_gpu_reader(pool, "cuda", spec=CLIP_224, threads=1, state_directory=state_directory)
        assert reader is not None, [e for e in logs if e["event"] == "gpu_jpeg_decode_unavailable"]
        outcomes = reader.submit(paths).results()
        reader.close()
    print(json.dumps({
        "indexable": [isinstance(o, PreparedImage) for o in outcomes],
        "decoded_on_device": reader.decoded_on_device,
        "chunks_failed": [e["reason"] for e in logs if e["event"] == "gpu_jpeg_chunk_failed"],
    }), flush=True)
    # A broken CUDA context may fail the interpreter's own teardown: the report is out, the exit is clean.
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]])
