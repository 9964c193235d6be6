"""Process-wide numeric settings every synthlearn process applies (the CLI, study workers, Flower sites).

Measured on the project's 2-core CPU (docs/benchmarks.md): with torch at 2 threads, OpenBLAS's own thread
pool (numpy) spins between the trainer's numpy calls and takes the cores from torch's OpenMP threads: a
32^3 task-model step took 1.66 s instead of 0.15 s. Capping BLAS at one thread (threadpoolctl, which works
after numpy is loaded, unlike OPENBLAS_NUM_THREADS) removes that; torch keeps its own thread count.
Denormal flushing: without it repeated diffusion sampling slowed 5-15x at random (ENVIRONMENT.md).
"""

from __future__ import annotations

import os

_BLAS_LIMIT = None


def configure_threads(torch_threads: int | None = None) -> None:
    """Cap BLAS pools at one thread, flush denormals, and set torch's intra-op threads.

    Args:
        torch_threads: torch threads; None or 0 = ``SYNTHLEARN_THREADS`` when set, else torch's default.
    """
    global _BLAS_LIMIT
    import torch
    from threadpoolctl import threadpool_limits

    if _BLAS_LIMIT is None:  # keep the limiter alive: it holds for the life of the process
        _BLAS_LIMIT = threadpool_limits(limits=1, user_api="blas")
    torch.set_flush_denormal(True)
    threads = torch_threads or int(os.environ.get("SYNTHLEARN_THREADS", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)


__all__ = ["configure_threads"]
