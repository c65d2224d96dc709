"""Buffers sized from an argument (the KV cache, the logits) are checked against the memory the device
has free before they are allocated, so a huge request fails at once with its size instead of hanging
the machine."""

from __future__ import annotations

import os

import jax
import numpy as np


def available_bytes(device: jax.Device | None = None) -> int | None:
    """Free memory of `device` (default: the first one): an accelerator's own, or the host's for a CPU.
    None when it cannot be told."""
    device = device or jax.devices()[0]
    stats = None
    if device.platform != "cpu":
        try:
            stats = device.memory_stats()
        except Exception:  # not every backend reports memory
            stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def tree_bytes(tree) -> int:
    """The bytes of every array (or ShapeDtypeStruct) of `tree`."""
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:,.1f} GiB"


def check_fits(nbytes: int, what: str) -> None:
    """A ValueError when `nbytes` exceed the free memory; `what` says what they are for."""
    free = available_bytes()
    if free is not None and nbytes > free:
        raise ValueError(f"{what} needs {gib(nbytes)}, more than the {gib(free)} of memory free")
