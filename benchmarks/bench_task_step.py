"""Task-model training step vs the bare network forward + backward on the same input.

The share of a training step not spent in the network (batch assembly from the preprocessed-case cache,
flips, loss over tumour voxels, gradient clipping, optimizer, bookkeeping) is what the trainer costs on
top of the model. Target: under 10 % at 64^3 on the project's 2-core CPU (issue 3).

    PYTHONPATH=src python benchmarks/bench_task_step.py --shape 64 --cases 8 --threads 2
    PYTHONPATH=src python benchmarks/bench_task_step.py --study data/phantom --shape 64

Without ``--study`` the cases are synthetic spheres held in memory (same shapes and dtypes as preprocessed
cases); with it, the first cases of the first training site are read and preprocessed once (not timed:
the trainer keeps preprocessed cases in memory, so steady-state epochs never touch the disk).
Prints a JSON line with median wall/CPU seconds per step for both and the overhead share.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch


class _MemoryCases:
    def __init__(self, n: int, size: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"))
        self.items, self.targets = [], []
        for i in range(n):
            c = rng.uniform(size * 0.3, size * 0.7, 3)
            seg = (np.sum((grid - c[:, None, None, None]) ** 2, 0) < (size / 6) ** 2).astype(np.int64)
            self.items.append((rng.normal(size=(4, size, size, size)).astype(np.float32), seg))
            self.targets.append(i % 2)

    def __len__(self):
        return len(self.items)

    def arrays(self, i):
        return self.items[i]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, default=64)
    parser.add_argument("--cases", type=int, default=8, help="cases per epoch (steps = cases / batch)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs (after one warm-up epoch)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--channels", default="8,16,32,64")
    parser.add_argument("--no-mamba", action="store_true")
    parser.add_argument("--blas-unlimited", action="store_true",
                        help="leave numpy's BLAS pool at its default size (shows the thread fight it causes)")
    parser.add_argument("--study", help="read real cases from this study instead of synthetic ones")
    args = parser.parse_args()

    from synthlearn.models.classifier import ClassifierConfig, build_classifier
    from synthlearn.runtime import configure_threads
    from synthlearn.training.trainer import (
        TrainConfig,
        load_batch,
        train_model,
        voxel_loss,
    )

    if args.blas_unlimited:  # reproduce the spinning OpenBLAS pool (docs/benchmarks.md)
        torch.set_num_threads(args.threads)
        torch.set_flush_denormal(True)
    else:
        configure_threads(args.threads)
    if args.study:
        from synthlearn.data.layouts import open_study
        from synthlearn.data.preprocess import PreprocessConfig
        from synthlearn.tasks import get_task
        from synthlearn.tasks.cache import DatasetCache

        site = open_study(args.study).sites_with_role("train")[0]
        cases = [c for c in site.cases if c.labels.idh is not None][: args.cases]
        data = DatasetCache(PreprocessConfig(shape=(args.shape,) * 3)).dataset(cases)
        for i in range(len(data)):
            data.arrays(i)  # fill the cache (preprocessing is not part of a steady-state step)
        targets = [get_task("idh").label(c.labels) for c in cases]
    else:
        data = _MemoryCases(args.cases, args.shape)
        targets = data.targets
    channels = tuple(int(c) for c in args.channels.split(","))
    mcfg = ClassifierConfig(channels=channels, norm_num_groups=4, mamba=not args.no_mamba, mamba_d_state=8)
    tcfg = TrainConfig(epochs=args.epochs + 1, batch_size=args.batch, device="cpu", momentum=0.9)
    steps_per_epoch = -(-len(data) // args.batch)

    # 1) the trainer: per-epoch wall and CPU time (first epoch = warm-up)
    torch.manual_seed(0)
    net = build_classifier(mcfg, out_channels=2)
    trainer_wall, trainer_cpu = [], []
    for epoch in range(args.epochs + 1):
        w0, c0 = time.perf_counter(), time.process_time()
        train_model(net, data, targets, tcfg, seed=0, name="bench", start_epoch=epoch, stop_epoch=epoch + 1,
                    progress=False)
        if epoch:
            trainer_wall.append((time.perf_counter() - w0) / steps_per_epoch)
            trainer_cpu.append((time.process_time() - c0) / steps_per_epoch)

    # 2) bare network: forward + backward + SGD step on the same batches, already stacked in memory
    torch.manual_seed(0)
    net = build_classifier(mcfg, out_channels=2)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    batches = []
    for s in range(0, len(data), args.batch):
        idx = list(range(s, min(s + args.batch, len(data))))
        images, seg = load_batch(data, idx)
        batches.append((images, seg, torch.tensor([targets[i] for i in idx])))
    bare_wall, bare_cpu = [], []
    for epoch in range(args.epochs + 1):
        w0, c0 = time.perf_counter(), time.process_time()
        for images, seg, y in batches:
            loss = voxel_loss(net(images), seg, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if epoch:
            bare_wall.append((time.perf_counter() - w0) / len(batches))
            bare_cpu.append((time.process_time() - c0) / len(batches))

    tw, bw = statistics.median(trainer_wall), statistics.median(bare_wall)
    tc, bc = statistics.median(trainer_cpu), statistics.median(bare_cpu)
    print(json.dumps({
        "shape": args.shape, "batch": args.batch, "cases": len(data), "threads": args.threads,
        "channels": channels, "mamba": not args.no_mamba, "data": "study" if args.study else "memory",
        "trainer_step_wall_s": round(tw, 4), "bare_step_wall_s": round(bw, 4),
        "trainer_step_cpu_s": round(tc, 4), "bare_step_cpu_s": round(bc, 4),
        "overhead_share_wall": round(1 - bw / tw, 4), "overhead_share_cpu": round(1 - bc / tc, 4),
    }))


if __name__ == "__main__":
    main()
