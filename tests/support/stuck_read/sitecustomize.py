"""Reads that never return, or end late, for the tests of stopping, of the per-file limit and of slow
files: with this folder on PYTHONPATH and STUCK_READ_MARK set, a preprocessing worker that is given a file
whose name starts with ``stuck`` creates the file STUCK_READ_MARK names, then blocks as a read from a
network mount whose server is gone would. One whose name starts with ``slow`` is read and decoded at
once, and the first read of each such name (each makes STUCK_READ_MARK, and a mark of its own beside it)
is then held for STUCK_READ_SLOW_S seconds before its processed copy is saved, as a slow decode of the
bytes read is: a panorama, read again quickly once rewritten; asleep (a slow share), or with
STUCK_READ_SPIN set computing all along (a big decode). Every other file is read as usual."""

import os

if os.environ.get("STUCK_READ_MARK"):
    import time

    import image_search.workers as _workers

    _real_file = _workers.preprocess_file
    _real_image = _workers.preprocess_image

    def _preprocess_file(path, settings):  # type: ignore[no-untyped-def]
        if path.name.startswith("stuck"):
            with open(os.environ["STUCK_READ_MARK"], "w"):
                pass
            time.sleep(3600)
        return _real_file(path, settings)

    def _preprocess_image(path, **kwargs):  # type: ignore[no-untyped-def]
        if not path.name.startswith("slow"):
            return _real_image(path, **kwargs)
        os.close(os.open(os.environ["STUCK_READ_MARK"], os.O_CREAT | os.O_WRONLY))
        with open(f"{os.environ['STUCK_READ_MARK']}.reads", "a") as reads:  # one line a read, for counting
            reads.write(path.name + "\n")
        try:
            os.close(os.open(f"{os.environ['STUCK_READ_MARK']}.{path.name}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            first = True
        except FileExistsError:
            first = False
        prepared = _real_image(path, **kwargs)
        if first and os.environ.get("STUCK_READ_SPIN"):  # computing all along, as a big decode does
            deadline = time.monotonic() + float(os.environ["STUCK_READ_SLOW_S"])
            while time.monotonic() < deadline:
                pass
        elif first:
            time.sleep(float(os.environ["STUCK_READ_SLOW_S"]))
        return prepared

    _workers.preprocess_file = _preprocess_file
    _workers.preprocess_image = _preprocess_image
