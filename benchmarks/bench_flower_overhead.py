"""Flower simulation overhead per FedAvg round vs the same local training without Flower.

Runs the same FedAvg rounds twice on the training sites of a study: once in process
(:func:`synthlearn.strategies.fedavg.run_rounds_inprocess`, sites one after another, plain function calls)
and once on Flower's simulation engine with one site at a time and one torch thread per site (the same
work, now through ServerApp/ClientApp messages and Ray workers). Round 1 also holds the start-up (Ray,
worker imports, each site reading its cases); later rounds show the steady per-round overhead.

    PYTHONPATH=src python benchmarks/bench_flower_overhead.py --study data/phantom_tiny --rounds 4

Prints a JSON line: seconds per round for both, the overhead of round 1 and the median overhead of
rounds 2..R, and the bytes each path counted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", required=True)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--shape", type=int, default=32)
    parser.add_argument("--channels", default="8,16,32,64")
    parser.add_argument("--folds", type=int, default=1)
    args = parser.parse_args()

    from synthlearn.data.layouts import open_study
    from synthlearn.data.preprocess import PreprocessConfig
    from synthlearn.federated.simulation import run_protocol_simulation
    from synthlearn.models.classifier import ClassifierConfig
    from synthlearn.strategies.fedavg import (
        FedAvgConfig,
        FedAvgProtocol,
        run_rounds_inprocess,
    )
    from synthlearn.tasks.cache import DatasetCache
    from synthlearn.tasks.setup import TrainingSetup
    from synthlearn.training.trainer import TrainConfig

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    sites = open_study(args.study).sites_with_role("train")
    setup = TrainingSetup(task="idh", n_folds=args.folds, seed=0, preprocess=PreprocessConfig(shape=(args.shape,) * 3),
                          model=ClassifierConfig(channels=tuple(int(c) for c in args.channels.split(",")),
                                                 norm_num_groups=4, mamba=True, mamba_d_state=8),
                          train=TrainConfig(epochs=args.rounds * args.local_epochs, momentum=0.9, device="cpu"))
    cfg = FedAvgConfig(rounds=args.rounds, local_epochs=args.local_epochs, threads_per_site=1, parallel_sites=1,
                       start_timeout_s=300, round_timeout_s=1800)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        plain = run_rounds_inprocess(sites, setup, cfg, Path(tmp) / "plain", cache=DatasetCache(setup.preprocess))
        plain_total = time.perf_counter() - t0
        t0 = time.perf_counter()
        flower = run_protocol_simulation(FedAvgProtocol(setup, cfg), sites, Path(tmp) / "flower", progress=False)
        flower_total = time.perf_counter() - t0
    p = [h["wall_s"] for h in plain.history]
    f = [h["wall_s"] for h in flower.history]
    steady = [fi - pi for fi, pi in zip(f[1:], p[1:])]
    print(json.dumps({
        "sites": len(sites), "rounds": args.rounds, "local_epochs": args.local_epochs, "shape": args.shape,
        "inprocess_round_s": [round(x, 2) for x in p], "flower_round_s": [round(x, 2) for x in f],
        "inprocess_total_s": round(plain_total, 1), "flower_total_s": round(flower_total, 1),
        "flower_startup_and_round1_overhead_s": round(flower_total - plain_total - sum(steady), 1),
        "flower_overhead_per_round_s_median_rounds_2_on": round(statistics.median(steady), 2) if steady else None,
        "flower_overhead_per_round_share": round(statistics.median(steady) / statistics.median(p[1:]), 3)
        if steady else None,
        "bytes_from_sites_inprocess_payload": plain.bytes_from_sites,
        "bytes_from_sites_flower_messages": flower.bytes_from_sites,
    }))


if __name__ == "__main__":
    main()
