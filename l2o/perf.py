"""Process-wide CPU settings for meta-training speed (called by applications, never on import).

The paper-sized problems are overhead-bound: thousands of small tensor ops per meta-step. Three
process-level settings matter on CPU (measured in ``benchmarks/speed_meta_train.py``):

* the number of intra-op threads (``torch.set_num_threads``);
* flushing denormal floats to zero (converged optimizees produce tiny gradients whose denormal
  arithmetic is very slow);
* glibc's allocator: by default every buffer above 128 KiB is a fresh ``mmap`` and the freed
  truncated-BPTT tape is returned to the OS after every meta-step, so the next segment page-faults
  on every buffer again. Raising the mmap and trim thresholds keeps that memory for reuse.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch

from .validation import check_positive_int

__all__ = ["configure_cpu"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _keep_freed_memory(limit_bytes: int) -> bool:
    """Ask glibc to serve allocations below ``limit_bytes`` from the heap and not trim it."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(limit_bytes)) == 1
        ok = ok and libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(limit_bytes)) == 1
        return ok
    except (OSError, AttributeError):
        return False


def configure_cpu(threads: int | None = None, *, flush_denormal: bool = True, keep_freed_memory: bool = True) -> dict[str, object]:
    """Apply the settings above; return what was applied.

    Args:
        threads: intra-op threads (``None`` leaves torch's choice).
        flush_denormal: flush denormal floats to zero (x86 with SSE3 only; ignored elsewhere).
        keep_freed_memory: raise glibc's mmap/trim thresholds to 256 MiB (Linux/glibc only).
    """
    applied: dict[str, object] = {}
    if threads is not None:
        torch.set_num_threads(check_positive_int("threads", threads))
    applied["threads"] = torch.get_num_threads()
    applied["flush_denormal"] = bool(flush_denormal and torch.set_flush_denormal(True))
    applied["keep_freed_memory"] = bool(keep_freed_memory and _keep_freed_memory(256 << 20))
    return applied
