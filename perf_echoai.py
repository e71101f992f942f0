"""Process-wide performance settings the scripts choose explicitly, kept apart from the training stack so that
inference (`scripts/evaluate.py`, `scripts/predict.py`) uses them without importing accelerate.

* `keep_freed_memory` -- glibc's malloc keeps freed memory for reuse (docs/BENCHMARKS.md, "Where the speed comes
  from", measures it with `bench/bench_pretrain.py --default_malloc`).
"""

from __future__ import annotations

import ctypes
import sys


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse rather than hand it back to the OS at once.

    A training or inference step allocates and frees tens of MB of activations. With glibc's defaults, blocks
    above 128 KiB come from fresh mmaps (a threshold that only adapts after the first frees) and freed memory at
    the heap's top is returned: every step faults the same pages in again. Raising both thresholds keeps them
    mapped, at the same peak RSS; memory freed after the peak stays with the process. Returns False (and changes
    nothing) where the C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    # The mmap threshold first: setting either one freezes glibc's adaptive threshold at its current value.
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))
