"""A process that dies inside the batched JPEG decoder, as one does when nvJPEG faults on a file (a
signal, no Python exception): the first half of the story the quarantine is for.

``python -m tests.support.gpu_crash [--device cuda] STATE_DIR FILE...`` opens the batched reader (on
torchvision's CPU decoder unless ``--device`` says otherwise; chunks of two files) with STATE_DIR as its state directory and decodes the files; the decode
of any chunk holding a file with CRASH_MARKER in its bytes kills the process with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

CRASH_MARKER = b"this file kills the GPU decoder"
CHUNK = 2


def main(state_directory: Path, paths: list[Path], device: str = "cpu") -> None:
    from image_search import gpudecode
    from image_search.pixels import PixelSpec
    from image_search.workers import PreprocessPool

    real_decode = gpudecode.decode_jpeg

    def decode_or_die(encoded, **options):
        if any(CRASH_MARKER in bytes(t.numpy()) for t in encoded):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_decode(encoded, **options)

    gpudecode.decode_jpeg = decode_or_die
    gpudecode.DECODE_CHUNK = CHUNK
    spec = PixelSpec.from_processor_config({"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 224},
                                            "crop_size": {"height": 224, "width": 224}})
    with PreprocessPool(max_size=(512, 512), max_pixels=178_956_970, workers=0) as pool:
        reader = gpudecode.open_gpu_reader(pool, device, spec=spec, threads=1, state_directory=state_directory)
        assert reader is not None
        reader.submit(paths).results()
        reader.close()


if __name__ == "__main__":
    args = sys.argv[1:]
    chosen = "cpu"
    if args[0] == "--device":
        chosen, args = args[1], args[2:]
    main(Path(args[0]), [Path(p) for p in args[1:]], chosen)
