"""image-search: a CLIP-family model kept hot, two watched folders, PostgreSQL with pgvector."""

import os

# Torch's intra-op threads (OpenMP) spin for a while after each parallel region before they sleep. On the
# CPU the model shares the cores with the preprocessing workers, PostgreSQL and the row writer, and a
# spinning thread takes its core from them: in `index` of 5,000 small pictures on 2 cores
# (tests/benchmarks/ceiling.py, tiny model) the main process spent 1.50-1.59 ms of CPU per image, against
# 0.59-0.72 ms with passive waiting, and ran at 372-375 against 425-513 images/s. Set here, before any
# module of the package imports torch (its OpenMP runtime reads it once, when loaded); a value in the
# environment (OMP_WAIT_POLICY=ACTIVE) wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
