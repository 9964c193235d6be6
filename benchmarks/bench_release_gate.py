"""The release gate's catch rate and false-refusal rate on the phantom (issue 28 item 3; docs/benchmarks.md 30).

Healthy generators: the demo's site generators (benchmarks/train_gate_generators.py, one per training site and
generator seed) and, with ``--dp``, the DP-SGD generators of the privacy-utility curve (their study runs' artifacts
and holdouts). Memorising generators, made from every healthy demo generator at its site
(:func:`synthlearn.generators.ldm.memorising.train_memorising_generator`, two members stratified by class, as the
privacy audit's generator positive control):

* ``decoder+diffusion``: decoder fine-tuned 60 steps and diffusion UNet 600 steps on the two (the audit's control);
* ``diffusion-only``: the shipped decoder, the diffusion UNet 600 steps on the two (its samples are the decoder's
  blurred renderings, which the SSIM attack barely tells apart: the white-box attack's case).

Every generator goes through the gate with its default settings (:class:`ReleaseGateConfig`) once per
``--gate-seeds`` (healthy demo generators) or ``--other-seeds`` (the others), a fresh sample draw and bootstrap
each. A healthy generator refused is a false refusal; a
memorising one passed is a miss. Each decision is kept (``OUT/decisions/*.json``; a rerun reads them back) and the
summary goes to ``OUT/summary.json`` and ``OUT/table.md``.

Run::

    PYTHONPATH=src .venv/bin/python benchmarks/bench_release_gate.py --study data/phantom \\
        --healthy runs/gate/healthy --dp runs/dp_curve --out runs/gate/measure [--gate-seeds 0 1] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

VARIANTS = {"decoder+diffusion": {"steps": 600, "decoder_steps": 60}, "diffusion-only": {"steps": 600,
                                                                                         "decoder_steps": 0}}


def _memorise(artifact: str, site_dir: str, members: list[str], out: str, steps: int, decoder_steps: int,
              seed: int) -> str:
    from synthlearn.data.layouts import open_site
    from synthlearn.generators.ldm.memorising import train_memorising_generator
    from synthlearn.runtime import configure_threads
    from synthlearn.strategies.catphishing import control_cases

    configure_threads(1)
    if not (Path(out) / "manifest.json").is_file():
        chosen = control_cases(members, open_site(site_dir), "idh", 2, seed)
        train_memorising_generator(artifact, site_dir, chosen, out, steps=steps, decoder_steps=decoder_steps,
                                   seed=seed)
    return out


def _gate(key: str, artifact: str, site_dir: str, members: list[str], holdout: list[str], seed: int,
          out: str) -> dict:
    from synthlearn.generators.ldm.release_gate import release_gate
    from synthlearn.runtime import configure_threads

    configure_threads(1)
    path = Path(out)
    if path.is_file():
        return json.loads(path.read_text())
    decision = release_gate(artifact, site_dir, members, holdout, seed=seed, work_dir=path.with_suffix(".work"))
    decision["key"] = key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(decision, indent=1))
    return decision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--study", type=Path, required=True)
    parser.add_argument("--healthy", type=Path, required=True, help="benchmarks/train_gate_generators.py's --out")
    parser.add_argument("--dp", type=Path, help="folder of the DP curve's study runs (eps*/catphishing/...)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--gate-seeds", type=int, nargs="+", default=[0, 1], help="gate seeds of the healthy demo "
                        "generators (a false refusal is the rare event)")
    parser.add_argument("--other-seeds", type=int, nargs="+", default=[0], help="gate seeds of the memorising and the "
                        "DP generators")
    parser.add_argument("--memorise-from", nargs="+", default=None, metavar="SEED_FOLDER",
                        help="make memorising generators from these healthy seed folders only (e.g. seed-0; "
                             "default all)")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    t0 = time.perf_counter()
    healthy = []  # (kind, name, artifact, site_dir, members, holdout)
    for folder in sorted(args.healthy.glob("seed-*/*")):
        if (folder / "artifact" / "manifest.json").is_file():
            split = json.loads((folder / "holdout.json").read_text())
            healthy.append(("healthy", f"{folder.parent.name}/{folder.name}", folder / "artifact",
                            args.study / folder.name, split["members"], split["holdout"]))
    dp = []
    for arm in sorted(args.dp.glob("eps*/catphishing")) if args.dp else []:
        for manifest in sorted(arm.glob("artifacts/*/manifest.json")):
            site = manifest.parent.name
            split = json.loads((arm / "holdout" / f"{site}.json").read_text())
            dp.append(("healthy-dp", f"{arm.parent.name}/{site}", manifest.parent, args.study / site,
                       split["members"], split["holdout"]))
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = {}
        for _, name, artifact, site_dir, members, _ in healthy:
            if args.memorise_from and name.split("/")[0] not in args.memorise_from:
                continue
            for variant, kw in VARIANTS.items():
                out = args.out / "memorising" / name / variant
                futures[(name, variant)] = pool.submit(_memorise, str(artifact), str(site_dir), members, str(out),
                                                       kw["steps"], kw["decoder_steps"], 0)
        memorising = [(f"memorising {variant}", f"{name}/{variant}", Path(fut.result()), *next(
            (h[3], h[4], h[5]) for h in healthy if h[1] == name)) for (name, variant), fut in futures.items()]
        print(f"memorising generators ready ({time.perf_counter() - t0:.0f} s)", flush=True)
        jobs = []
        for kind, name, artifact, site_dir, members, holdout in healthy + dp + memorising:
            for seed in (args.gate_seeds if kind == "healthy" else args.other_seeds):
                key = f"{kind}|{name}|seed {seed}"
                out = args.out / "decisions" / f"{kind.replace(' ', '_')}__{name.replace('/', '__')}__{seed}.json"
                jobs.append((kind, name, seed, pool.submit(_gate, key, str(artifact), str(site_dir), members,
                                                            holdout, seed, str(out))))
        rows = []
        for kind, name, seed, fut in jobs:
            d = fut.result()
            c = d["checks"]
            rows.append({"kind": kind, "name": name, "seed": seed, "passed": d["passed"], "failed": d["failed"],
                         "copy_rate": c["copy_rate"]["value"], "ssim_auc": c["membership_ssim"]["value"],
                         "ssim_ci_low": c["membership_ssim"]["ci_low"], "loss_auc": c["membership_loss"]["value"],
                         "loss_ci_low": c["membership_loss"]["ci_low"], "exposed": c["exposed_members"]["value"],
                         "member_min_z": c["exposed_members"]["member_min_z"], "wall_s": d["wall_s"]})
            verdict = "passed" if d["passed"] else "REFUSED " + ",".join(d["failed"])
            print(f"{kind:28s} {name:32s} seed {seed}: {verdict}"
                  f" (copy {rows[-1]['copy_rate']:.2f}, SSIM AUC {rows[-1]['ssim_auc']:.2f}, loss AUC "
                  f"{rows[-1]['loss_auc']:.2f}, exposed {rows[-1]['exposed']}, min z {rows[-1]['member_min_z']:.1f})",
                  flush=True)
    summary = {}
    for kind in dict.fromkeys(r["kind"] for r in rows):
        mine = [r for r in rows if r["kind"] == kind]
        refused = [r for r in mine if not r["passed"]]
        by_check: dict[str, int] = {}
        for r in refused:
            for f in r["failed"]:
                by_check[f] = by_check.get(f, 0) + 1
        summary[kind] = {"decisions": len(mine), "refused": len(refused), "refused_share": len(refused) / len(mine),
                         "refused_by_check": by_check,
                         "ranges": {k: [min(r[k] for r in mine), max(r[k] for r in mine)]
                                    for k in ("copy_rate", "ssim_auc", "loss_auc", "exposed", "member_min_z")}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps({"summary": summary, "rows": rows,
                                                       "wall_s": time.perf_counter() - t0}, indent=1))
    lines = ["| generators | decisions | refused | by check | copy rate | SSIM AUC | loss AUC | exposed members | "
             "lowest member z |", "|---|---|---|---|---|---|---|---|---|"]
    for kind, s in summary.items():
        r = s["ranges"]
        lines.append(f"| {kind} | {s['decisions']} | {s['refused']} ({s['refused_share']:.0%}) | "
                     f"{', '.join(f'{k} {v}' for k, v in s['refused_by_check'].items()) or '-'} | "
                     f"{r['copy_rate'][0]:.2f}-{r['copy_rate'][1]:.2f} | "
                     f"{r['ssim_auc'][0]:.2f}-{r['ssim_auc'][1]:.2f} | "
                     f"{r['loss_auc'][0]:.2f}-{r['loss_auc'][1]:.2f} | {r['exposed'][0]}-{r['exposed'][1]} | "
                     f"{r['member_min_z'][0]:.1f} to {r['member_min_z'][1]:.1f} |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
