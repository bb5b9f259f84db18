"""Byte arithmetic. Everything inside memtune is an ``int`` number of bytes; GiB appear only at the edges.

GiB (gibibyte) is 2**30 bytes; GB is 10**9. nvidia-smi's "MiB" are 2**20 bytes.
"""

from __future__ import annotations

KiB = 2**10
MiB = 2**20
GiB = 2**30

_UNITS = {"B": 1, "KiB": KiB, "MiB": MiB, "GiB": GiB, "KB": 10**3, "MB": 10**6, "GB": 10**9}

# The CUDA caching allocator hands out blocks in multiples of 512 bytes
# (c10/cuda/CUDACachingAllocator.cpp: kMinBlockSize = 512, round_size()).
ALLOCATOR_BLOCK = 512


def convert(num_bytes: float, unit: str) -> float:
    """``num_bytes`` expressed in ``unit`` (one of B, KiB, MiB, GiB, KB, MB, GB)."""
    try:
        return num_bytes / _UNITS[unit]
    except KeyError:
        raise ValueError(f"unknown unit {unit!r}; supported units are {', '.join(_UNITS)}") from None


def gib(num_bytes: float) -> float:
    return num_bytes / GiB


def fmt_gib(num_bytes: float, digits: int = 2) -> str:
    return f"{num_bytes / GiB:.{digits}f} GiB"


def round_block(num_bytes: int) -> int:
    """Size of the block the CUDA caching allocator returns for a request of ``num_bytes``."""
    if num_bytes <= 0:
        return 0
    return -(-num_bytes // ALLOCATOR_BLOCK) * ALLOCATOR_BLOCK
