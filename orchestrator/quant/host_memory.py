"""Keep freed host memory in the process (glibc): CPU training steps stop paying page faults.

A training step on CPU allocates and frees large tensors every step (activations, saved
tensors, gradients: 16 MiB each for a 64x64x32x32 float32 activation). glibc serves blocks
above its mmap threshold with fresh ``mmap``s and gives the top of the heap back to the OS
when more than its trim threshold is free, so each step touches fresh pages: the kernel zeroes
and maps them again, step after step. Fake quantization adds allocations per quantized tensor,
so this cost falls on QAT more than on FP32 (on a 2-core AVX2 VM: a W8A8 step of resnet_cifar
1.23x FP32 without this setting, ~1.07x with it; ``benchmarks/step_overhead.py``).

``keep_freed_host_memory()`` raises both thresholds to their maximum (2 GiB - 1): blocks come
from the heap and freed memory is reused in place. The process keeps its peak footprint
instead of returning memory to the OS between steps. Process-wide; call it once, early.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
INT_MAX = 2**31 - 1
TOP_PAD_BYTES = 64 << 20  # grow the heap in 64 MiB steps


def keep_freed_host_memory() -> bool:
    """Apply the setting; True when it took effect (glibc), False elsewhere (macOS, musl)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((M_MMAP_THRESHOLD, INT_MAX), (M_TRIM_THRESHOLD, INT_MAX), (M_TOP_PAD, TOP_PAD_BYTES))
    return all(mallopt(option, value) == 1 for option, value in settings)
