"""Autoencoder training cost per case against the batch size on this CPU (issue 4, "Benchmark").

PyTorch routes a CPU 3D convolution to oneDNN only when its input is big enough: with a batch of 1 and
``channels x X x Y <= 20480`` (16 channels at 32^3: 16384) it takes its slow native kernel
(``aten::slow_conv3d_forward``) instead. The demo's autoencoder (32^3, channels (16, 32, 32)) sat on that path
at batch 1. This measures one training step (forward, L1 + KL, backward, Adam) of the bare MONAI
``AutoencoderKL`` of ``configs/generator_demo.toml`` for each ``--batch`` and reports seconds per step, per
case, and how many of the convolution forwards ran on oneDNN (from the profiler).

Run (about 1 minute)::

    PYTHONPATH=src python benchmarks/bench_ae_batch.py --threads 1 --batch 1 2 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(batch: int, shape: int, steps: int, channels_last: bool = False) -> dict:
    """Median step time of ``steps`` timed steps (after one warm-up) and the conv kernels of one step."""
    import torch
    from torch.profiler import profile

    from synthlearn.models.autoencoder import build_autoencoder, kl_loss
    from synthlearn.generators.ldm.config import load_generator_config

    cfg = load_generator_config(ROOT / "configs" / "generator_demo.toml").autoencoder
    torch.manual_seed(0)
    ae = build_autoencoder(cfg)
    opt = torch.optim.Adam(ae.parameters(), lr=1e-4)
    x = torch.rand(batch, 5, shape, shape, shape)
    if channels_last:
        ae = ae.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)

    def step() -> None:
        recon, mu, sigma = ae(x)
        loss = (recon - x).abs().mean() + 1e-8 * kl_loss(mu, sigma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    with profile() as prof:
        step()
    counts = {e.key: e.count for e in prof.key_averages()}
    s = statistics.median(times)
    return {"batch": batch, "shape": shape, "channels_last": channels_last,
            "s_per_step": round(s, 3), "s_per_case": round(s / batch, 3),
            "onednn_conv_forwards": counts.get("aten::mkldnn_convolution", 0),
            "slow_conv3d_forwards": counts.get("aten::slow_conv3d_forward", 0)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--shape", type=int, default=32, help="cube side of the autoencoder's input (demo: 32)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per batch size")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--channels-last", action="store_true", help="also measure each batch in channels_last_3d")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    if min(args.batch) < 1:
        ap.error(f"--batch: every batch size must be >= 1, found {args.batch}")
    if args.shape < 4 or args.shape % 4:
        ap.error(f"--shape: expected a multiple of 4 (the autoencoder down-samples twice), found {args.shape}")
    if args.steps < 1 or args.threads < 1:
        ap.error(f"--steps and --threads must be >= 1, found {args.steps} and {args.threads}")
    if args.json is not None and not args.json.parent.is_dir():
        ap.error(f"--json {args.json}: its folder {args.json.parent} does not exist")
    sys.path.insert(0, str(ROOT / "src"))
    from synthlearn.runtime import configure_threads

    configure_threads(args.threads)
    layouts = (False, True) if args.channels_last else (False,)
    rows = [measure(b, args.shape, args.steps, cl) for b in args.batch for cl in layouts]
    base = rows[0]["s_per_case"]
    print("| batch | memory format | s per step | s per case | vs first | conv forwards on oneDNN / slow path |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        fmt = "channels_last_3d" if r["channels_last"] else "contiguous"
        print(f"| {r['batch']} | {fmt} | {r['s_per_step']} | {r['s_per_case']} | {r['s_per_case'] / base:.2f}x | "
              f"{r['onednn_conv_forwards']} / {r['slow_conv3d_forwards']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
