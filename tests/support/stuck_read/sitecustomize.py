"""Reads that never return, or return late, for the tests of stopping, of the per-file limit and of slow
files: with this folder on PYTHONPATH and STUCK_READ_MARK set, a preprocessing worker that is given a file
whose name starts with ``stuck`` creates the file STUCK_READ_MARK names, then blocks as a read from a
network mount whose server is gone would. One whose name starts with ``slow`` is read at once, and the
first such read (the one that makes STUCK_READ_MARK) is then held for STUCK_READ_SLOW_S seconds: a
panorama that takes long to decode, read again quickly once rewritten. Every other file is read as usual."""

import os

if os.environ.get("STUCK_READ_MARK"):
    import time

    import image_search.workers as _workers

    _real = _workers.preprocess_file

    def _preprocess_file(path, settings):  # type: ignore[no-untyped-def]
        if path.name.startswith("stuck"):
            with open(os.environ["STUCK_READ_MARK"], "w"):
                pass
            time.sleep(3600)
        if path.name.startswith("slow"):
            try:
                os.close(os.open(os.environ["STUCK_READ_MARK"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                first = True
            except FileExistsError:
                first = False
            outcome = _real(path, settings)
            if first:
                time.sleep(float(os.environ["STUCK_READ_SLOW_S"]))
            return outcome
        return _real(path, settings)

    _workers.preprocess_file = _preprocess_file
