"""Suite-wide settings.

The test models are tiny, and on a small or busy machine PyTorch's worker threads spend more
time waiting on each other than computing; one thread (inherited by subprocesses) keeps the
suite fast and its timings steady.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

torch.set_num_threads(1)
