"""Time per phantom case on one core (target: <= 1 s per 64^3 case).

Usage::

    PYTHONPATH=src python benchmarks/bench_phantom.py [--shape 64] [--cases 16] [--write]

Prints a table with the median and mean seconds per case and per stage (anatomy, warp, tumour, contrasts,
scanner effects, finish), over cases spread across the ``paper`` sites; ``--write`` adds the time to write
the case as five NIfTI files. The atlas is built (or loaded from the cache) before timing starts.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs="+", default=[64], help="grid edge (or three edges)")
    parser.add_argument("--cases", type=int, default=16, help="cases to time (spread over the paper sites)")
    parser.add_argument("--write", action="store_true", help="also time writing the NIfTI files")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    from synthlearn.data.io import write_case
    from synthlearn.data.phantom import STUDY_PRESETS, generate_case
    from synthlearn.data.phantom.atlas import load_atlas
    from synthlearn.data.phantom.generate import parse_shape

    shape = parse_shape(args.shape[0] if len(args.shape) == 1 else tuple(args.shape), (64, 64, 64))
    atlas = load_atlas(shape)
    sites = STUDY_PRESETS["paper"].sites
    generate_case(sites[0], 999, shape=shape, atlas=atlas)  # warm-up (imports, allocator)
    totals, stages, writes = [], {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.cases):
            site = sites[i % len(sites)]
            timings: dict[str, float] = {}
            t0 = time.perf_counter()
            case = generate_case(site, i, shape=shape, atlas=atlas, timings=timings)
            totals.append(time.perf_counter() - t0)
            for k, v in timings.items():
                stages.setdefault(k, []).append(v)
            if args.write:
                t0 = time.perf_counter()
                write_case(tmp, case.case_id, case.images, case.seg, case.affine)
                writes.append(time.perf_counter() - t0)
    grid = "x".join(map(str, shape))
    print(f"phantom case {grid}, torch {torch.__version__}, {torch.get_num_threads()} thread, "
          f"{args.cases} cases over {len(sites)} sites")
    print(f"{'stage':<12}{'median s':>10}{'mean s':>10}")
    for k, v in stages.items():
        print(f"{k:<12}{statistics.median(v):>10.3f}{statistics.mean(v):>10.3f}")
    print(f"{'total':<12}{statistics.median(totals):>10.3f}{statistics.mean(totals):>10.3f}")
    if writes:
        print(f"{'write NIfTI':<12}{statistics.median(writes):>10.3f}{statistics.mean(writes):>10.3f}")


if __name__ == "__main__":
    main()
