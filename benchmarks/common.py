"""Shared helpers of the benchmarks: timing statistics and the machine they ran on."""

import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": len(xs), "all": xs}


def machine() -> dict:
    import torch
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "load_avg_1m": os.getloadavg()[0], "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def matmul_peak_gflops(n: int = 1024, reps: int = 10, dtype=None) -> float:
    """Matmul throughput measured here, the fastest of `reps` n x n products (the peak that MFU is
    taken against); dtype: fp32 by default, or e.g. torch.bfloat16."""
    import torch
    a, b = torch.randn(n, n), torch.randn(n, n)
    if dtype is not None:
        a, b = a.to(dtype), b.to(dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9
