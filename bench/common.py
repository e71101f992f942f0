"""Shared plumbing for the benchmarks in `bench/`: machine description, matmul peak, alternating timers,
peak-RSS readout and Markdown tables.

The development machines are small and shared (2 cores, other jobs running), so every comparison is made
side by side in one process, alternating the contenders step by step, and reported as medians and ratios
rather than as absolute numbers.
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import time
from collections.abc import Callable

import torch


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else whatever `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, str]:
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": str(torch.get_num_threads()),
        "cpu": cpu_model(),
        "cpu capability": torch.backends.cpu.get_cpu_capability(),
    }


def proc_status_mib(field: str) -> float:
    """A memory field of /proc/self/status (`VmHWM` = peak resident set, `VmRSS` = current) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # the kernel reports kB
    raise KeyError(field)


def matmul_peak_gflops(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """Median GFLOP/s of a (size x size) @ (size x size) matmul in `dtype`: the attainable peak that MFU is
    measured against (2 * size³ FLOPs per product)."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.mm(a, b)  # warm-up: oneDNN / MKL pick their kernels on the first call
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def alternate(steps: dict[str, Callable[[], None]], warmup: int, measured: int) -> dict[str, list[float]]:
    """Run each callable `warmup` times, then `measured` rounds alternating them (A B, B A, A B, ...) and
    return every measured duration (s) per name. Alternating step by step means a burst of load from other
    jobs on the shared machine hits both contenders alike instead of biasing whichever ran during it;
    flipping the order each round cancels any cost one step leaves to the next (caches, allocator)."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(measured):
        order = list(steps.items())
        for name, step in order if round_index % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


def fill_unset(args, quick: dict, full: dict) -> None:
    """Give every option in the dicts that `args` left at None its `--quick` (smoke run) or full-run default."""
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def precision_context(precision: str, device_type: str = "cpu"):
    """bf16 autocast on `device_type` for "bf16", nothing for "fp32"."""
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
