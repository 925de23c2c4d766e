"""A read that never returns, for the tests of stopping and of the per-file limit: with this folder on
PYTHONPATH and STUCK_READ_MARK set, a preprocessing worker that is given a file whose name starts with
``stuck`` creates the file STUCK_READ_MARK names, then blocks as a read from a network mount whose
server is gone would. Every other file is read as usual."""

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
        return _real(path, settings)

    _workers.preprocess_file = _preprocess_file
