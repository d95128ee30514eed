"""glibc malloc for CPU training: freed memory stays in the heap for the next step.

A training step allocates and frees the same activations every step. cpm-tiny's GRPO update (64
responses) frees ~400 MB of 1-10 MB tensors. glibc returns such blocks to the kernel: it unmaps
an mmap'd block on free, and trims the heap top back once it is free. So the next step gets fresh
pages and faults every one of them in again: 50-170k minor faults an update, ~12% of its time
(`getrusage` around `RLRecipe.update`; medians of 6 steps, two runs each: 0.50-0.51 s, against
0.44-0.46 s with the blocks kept, where the faults drop to 0-20k once the heap has grown to its
working size after a step).

Raising the mmap and trim thresholds keeps those blocks in the heap and reuses them. The CUDA
caching allocator does the same for GPU memory, and jemalloc or tcmalloc (LD_PRELOAD, as Intel's
PyTorch tuning guide recommends) do it on the CPU. The price is that the process keeps its peak
heap until it exits.

It is a process-wide setting, applied by the trainers' `setup()` on the CPU. It is skipped:
- with CPMTOOL_MALLOC_TUNE=0;
- where the libc is not glibc;
- where the user already chose: a MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ variable, or
  a jemalloc or tcmalloc in LD_PRELOAD.
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt's parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks up to 1 GiB come from the heap. Some glibc releases cap the mmap threshold at
# HEAP_MAX_SIZE / 2 (32 MiB on 64-bit) and refuse more; that cap is the fallback.
MMAP_THRESHOLDS = (1 << 30, 32 << 20)
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the largest one, i.e. never trim in practice

_state: list[str] = []  # the outcome, once decided: the setting is process-wide


def keep_freed_memory(device: str = "cpu") -> str:
    """Raise glibc's mmap and trim thresholds once per process, for a run on `device`.

    Returns:
        What was done, for run.json: "kept" (thresholds raised), or why not: "untouched" (not a
        CPU run), "disabled" (CPMTOOL_MALLOC_TUNE=0), "user_setting" (MALLOC_*_ variables or a
        preloaded allocator), "not_glibc", or "refused" (mallopt returned 0).
    """
    if device != "cpu":
        return "untouched"
    if not _state:
        _state.append(_apply())
    return _state[0]


def _apply() -> str:
    if os.environ.get("CPMTOOL_MALLOC_TUNE", "1") == "0":
        return "disabled"
    preload = os.environ.get("LD_PRELOAD", "")
    if ("MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ
            or "jemalloc" in preload or "tcmalloc" in preload):
        return "user_setting"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not_glibc"
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "not_glibc"
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if not any(mallopt(M_MMAP_THRESHOLD, t) for t in MMAP_THRESHOLDS):
        return "refused"
    # Setting either threshold turns off glibc's dynamic adjustment of both, so both are set.
    return "kept" if mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) else "refused"
