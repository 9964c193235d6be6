"""Where does CATphishing lose the class: the case writer, the autoencoder, or the diffusion model? (issue 5)

On a finished study run with a ``catphishing`` arm (e.g. ``runs/demo``), this builds training studies
from what the generator sites' **member** cases (the cases each site's generator trained on, from
``catphishing/holdout/<site>.json``) become at each step of the generator, each beside the run's real test
sites, and trains the study's task model on them with ``synthlearn study run --arms centralized`` (same
config, same test sites):

- ``real``: the members themselves, mapped to the generator's scale and written by the same code that
  writes synthetic cases (:func:`synthlearn.synthesis.cases.postprocess_sample`, whole-tumour mask,
  centred affine). If this falls short of the run's centralized arm, the pipeline loses the class, not the
  generator.
- ``recon``: the members encoded (posterior mean) and decoded by the site's shipped artifact (decoder +
  stage 2), written the same way: the ceiling the diffusion model can reach with this autoencoder.
- ``refined``: the same reconstructions through the artifact's refiner stage (:mod:`synthlearn.models.refiner`,
  trained on these very reconstructions: its best case), for generators that have one.
- ``synthetic``: the arm's own kept synthetic cases (what the ``catphishing`` arm trained on), retrained
  here so that the three rows come from one process and one seed.
- ``g<G>`` for each ``--guidance G``: as many cases per class per site as the run synthesized, drawn again
  from the shipped artifacts at classifier-free guidance ``G`` (no diversity filter).

``--test-blur SIGMA ...``: each row's model is also scored on the real test cases low-passed after
preprocessing (Gaussian, ``SIGMA`` voxels of the task grid, inside the brain): if a model trained on blurred
reconstructions did better on blurred test cases, the gap would be the decoder's blur.

``--tumour-stats``: per row (and for the real test cases) the mean z-scored intensity inside the tumour of
each sequence and the tumour's voxel count on the task grid, per class: what the class differences become.

Every row also says how the task model trained on ``real`` (when that kind is in the list) classifies the
training cases of that row: ``recognised`` (balanced share predicted as the conditioned class, chance 0.5)
and ``recognition_auc``; :func:`synthlearn.audits.recognition.recognition_audit`, the arm's own audit.

Each study gets its own run folder under ``--out``; the table printed at the end (and ``--json``) has the
combined AUC with its CI and the per-site AUCs.

Run (about 2-4 minutes per study on two cores)::

    PYTHONPATH=src python benchmarks/synthetic_gap.py --run runs/demo --config configs/demo.toml \\
        --study data/phantom --out /tmp/synthetic_gap --guidance 1.5 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

KINDS = ("real", "recon", "synthetic")
OPTIONAL_KINDS = ("refined",)


def _write_site(out: Path, cases: list[tuple[str, object, str]], label: str, shape, voxel_size) -> None:
    """Write ``(case_id, decoded (5, X, Y, Z) array, class)`` as a contract site, like ``synthesize`` does."""
    from synthlearn.data.contract import Labels
    from synthlearn.data.io import write_case, write_labels_csv
    from synthlearn.synthesis.cases import centred_affine, postprocess_sample

    affine = centred_affine(shape, voxel_size)
    rows = []
    for case_id, decoded, cls in cases:
        case = postprocess_sample(decoded)
        if case.tumour_voxels == 0:
            continue
        write_case(out, case_id, case.images, case.seg, affine)
        rows.append((case_id, Labels(**{label: cls})))
    write_labels_csv(out / "labels.csv", rows)


def write_study(root: Path, meta: dict, train_sites: list[str], tests) -> None:
    """Make ``root`` a study: its site folders ``train_sites`` as training sites, links to the real ``tests``
    sites as test sites, and ``study.json`` (``meta`` with those roles)."""
    sites = {name: {"role": "train"} for name in train_sites}
    for s in tests:
        if not (root / s.name).exists():
            os.symlink(Path(s.path).resolve(), root / s.name)
        sites[s.name] = {"role": "test"}
    (root / "study.json").write_text(json.dumps({**meta, "sites": sites}, indent=2) + "\n")


def centralized_test(config: Path, study: Path, run_dir: Path) -> dict:
    """The task model of ``config`` trained on ``study``'s training sites (``synthlearn study run --arms
    centralized``, skipped when ``run_dir`` already holds its results): its ``test`` block of results.json."""
    if not (run_dir / "results.json").is_file():
        subprocess.run([sys.executable, "-m", "synthlearn.cli", "study", "run", "--config", str(config),
                        "--study", str(study), "--arms", "centralized", "--out", str(run_dir), "-q"], check=True)
    return json.loads((run_dir / "results.json").read_text())["arms"]["centralized"]["test"]


def build_studies(run: Path, study_dir: Path, out: Path, kinds: tuple[str, ...],
                  guidance: tuple[float, ...] = ()) -> dict[str, Path]:
    """Write one study folder per kind under ``out/studies`` (test sites linked, not copied)."""
    import torch

    from synthlearn.data.layouts import open_study
    from synthlearn.generators.ldm.sample import load_generator
    from synthlearn.generators.ldm.data import load_site_tensors

    arm = run / "catphishing"
    holdouts = sorted((arm / "holdout").glob("*.json"))
    if not holdouts:
        raise SystemExit(f"{arm / 'holdout'}: expected one <site>.json per generator site (a finished catphishing "
                         f"arm), found none")
    study = open_study(study_dir)
    meta = json.loads((study_dir / "study.json").read_text())
    tests = [s for s in study.sites if s.role == "test"]
    per_class = int(json.loads((run / "config.json").read_text())["catphishing"]["per_class"])
    studies = {}
    for kind in list(kinds) + [f"g{g:g}" for g in guidance]:
        root = out / "studies" / kind
        if (root / "study.json").is_file():
            studies[kind] = root
            continue
        tmp = out / "studies" / f".{kind}.tmp"
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        sites = {}
        for hf in holdouts:
            split = json.loads(hf.read_text())
            name = split["site"]
            if kind == "synthetic":  # the arm's kept cases, linked
                src = arm / "synthetic" / name
                div = src / "diversity.json"
                lines = (src / "labels.csv").read_text().splitlines()
                ids = [ln.split(",")[0] for ln in lines[1:] if ln.strip()]
                if div.is_file():
                    kept = set(json.loads(div.read_text())["kept_case_ids"])
                    ids = [i for i in ids if i in kept]
                dest = tmp / f"syn_{name}"
                dest.mkdir()
                for case_id in ids:
                    os.symlink((src / case_id).resolve(), dest / case_id)
                keep = set(ids)
                (dest / "labels.csv").write_text("\n".join([lines[0]] + [ln for ln in lines[1:]
                                                                          if ln.split(",")[0] in keep]) + "\n")
                sites[f"syn_{name}"] = {"role": "train"}
                continue
            if kind.startswith("g"):  # drawn again at another guidance scale
                from synthlearn.generators.ldm.sample import synthesize
                from synthlearn.training.seeding import derive_seed

                synthesize(arm / "artifacts" / name, per_class, tmp / f"{kind}_{name}",
                           seed=derive_seed(0, "synthetic_gap", kind, name), guidance=float(kind[1:]), progress=False)
                sites[f"{kind}_{name}"] = {"role": "train"}
                continue
            gen = load_generator(arm / "artifacts" / name)
            cfg = gen.cfg
            real_site = next(s for s in study.sites if s.name == name)
            members = tuple(c for c in real_site.cases if c.case_id in set(split["members"]))
            data = load_site_tensors(members, cfg)
            if kind == "real":
                decoded = data.x
            else:
                with torch.no_grad():
                    decoded = torch.cat([gen.decode(gen.autoencoder.encode(data.x[i:i + 4])[0],
                                                    data.class_index[i:i + 4]) for i in range(0, len(data.x), 4)])
                if kind == "refined":  # the reconstructions through the artifact's refiner stage
                    if gen.refiner is None:
                        raise SystemExit(f"{arm / 'artifacts' / name}: --kinds refined needs a generator with a "
                                         f"refiner stage (refiner.epochs > 0), found none")
                    from synthlearn.training.seeding import derive_seed

                    g = torch.Generator()
                    g.manual_seed(derive_seed(0, "synthetic_gap", kind, name))
                    decoded = torch.cat([gen.refine(decoded[i:i + 8].float(), data.class_index[i:i + 8], g)
                                         for i in range(0, len(decoded), 8)])
            cases = [(f"{kind}-{c.case_id}", decoded[i].float().numpy(), cfg.class_names[int(data.class_index[i])])
                     for i, c in enumerate(members)]
            _write_site(tmp / f"{kind}_{name}", cases, cfg.label, cfg.shape, data.voxel_size)
            sites[f"{kind}_{name}"] = {"role": "train"}
        write_study(tmp, meta, list(sites), tests)
        os.replace(tmp, root)
        studies[kind] = root
    return studies


def blurred_test_auc(model_dir: Path, study_dir: Path, sigmas) -> dict[str, float]:
    """Combined test AUC of a saved task model on the study's test cases low-passed after preprocessing."""
    import numpy as np
    from scipy import ndimage

    from synthlearn.data.datasets import CaseDataset
    from synthlearn.data.layouts import open_study
    from synthlearn.evaluate.classification import roc_auc
    from synthlearn.tasks.model import TaskModel

    model = TaskModel.load(model_dir)
    cases = [c for s in open_study(study_dir).sites if s.role == "test" for c in s.cases]
    keep = [i for i, c in enumerate(cases) if model.task.label(c.labels) is not None]
    cases = [cases[i] for i in keep]
    y = np.asarray([model.task.label(c.labels) for c in cases])
    base = CaseDataset(cases, model.preprocess)

    class Blurred:
        def __init__(self, sigma: float):
            self.sigma = sigma

        def __len__(self) -> int:
            return len(base)

        def arrays(self, i: int):
            images, seg = base.arrays(i)
            brain = np.any(images != 0, axis=0)
            images = np.stack([ndimage.gaussian_filter(ch, self.sigma) for ch in images]) * brain
            return images.astype(np.float32), seg

    positive = model.task.positive_class if model.task.num_classes == 2 else None
    return {f"{s:g}": round(float(roc_auc(y, model.predict(Blurred(s)), positive)), 3) for s in sigmas}


def tumour_stats(cases, task, preprocess) -> dict[str, dict[str, float]]:
    """Class -> mean over cases of the z-scored intensity inside the tumour per sequence and the tumour voxels."""
    import numpy as np

    from synthlearn.data.contract import SEQUENCES
    from synthlearn.data.datasets import CaseDataset

    ds = CaseDataset(list(cases), preprocess)
    rows: dict[str, list[list[float]]] = {}
    for i, c in enumerate(ds.cases):
        k = task.label(c.labels)
        images, seg = ds.arrays(i)
        tumour = seg > 0
        if k is None or not tumour.any():
            continue
        rows.setdefault(task.class_names[k], []).append([float(images[q][tumour].mean()) for q in range(len(SEQUENCES))]
                                                        + [float(tumour.sum())])
    return {name: {**{q: round(float(v), 2) for q, v in zip(SEQUENCES, np.mean(r, axis=0)[:-1])},
                   "tumour_voxels": round(float(np.mean(r, axis=0)[-1])), "n": len(r)}
            for name, r in rows.items()}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a finished study run with a catphishing arm")
    parser.add_argument("--config", type=Path, required=True, help="the study config the run used (TOML)")
    parser.add_argument("--study", type=Path, default=None, help="the real study (default: the run's)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help=f"comma-separated subset of {KINDS + OPTIONAL_KINDS}")
    parser.add_argument("--guidance", type=float, nargs="*", default=[],
                        help="also draw the run's cases per class again at these guidance scales (one row each)")
    parser.add_argument("--test-blur", type=float, nargs="*", default=[],
                        help="also score every row's model on test cases low-passed by these sigmas (voxels)")
    parser.add_argument("--tumour-stats", action="store_true",
                        help="per row and class: mean z-scored intensity in the tumour per sequence, tumour voxels")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if any(v <= 0 for v in args.test_blur):
        raise SystemExit(f"--test-blur: expected sigmas > 0 (voxels), found {args.test_blur}")
    if any(g < 0 for g in args.guidance):
        raise SystemExit(f"--guidance: expected scales >= 0, found {args.guidance}")
    kinds = tuple(k for k in args.kinds.split(",") if k)
    bad = [k for k in kinds if k not in KINDS + OPTIONAL_KINDS]
    if bad:
        raise SystemExit(f"--kinds: expected a subset of {KINDS + OPTIONAL_KINDS}, found {bad}")
    for name in ("config.json", "run.json"):
        if not (args.run / name).is_file():
            raise SystemExit(f"--run {args.run}: expected a study run folder with {name}, found none")
    from synthlearn.config import ConfigError
    from synthlearn.study import load_study_config

    try:
        scfg = load_study_config(args.config)
    except (OSError, ConfigError, ValueError) as exc:
        raise SystemExit(f"--config {args.config}: not a usable study config ({exc})") from None
    study_dir = args.study or Path(json.loads((args.run / "run.json").read_text())["study"])  # stored resolved
    source = {"run": str(args.run.resolve()), "config": str(args.config.resolve()), "study": str(study_dir.resolve())}
    stamp = args.out / "source.json"
    if stamp.is_file() and json.loads(stamp.read_text()) != source:
        raise SystemExit(f"--out {args.out}: holds studies and runs made from {json.loads(stamp.read_text())}, "
                         f"expected {source}; use a new --out")
    args.out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(source, indent=2) + "\n")
    studies = build_studies(args.run, study_dir, args.out, kinds, tuple(args.guidance))
    rows = []
    for kind, root in studies.items():
        run_dir = args.out / "runs" / kind
        t0 = time.perf_counter()
        res = centralized_test(args.config, root, run_dir)
        n_train = sum(len((p / "labels.csv").read_text().splitlines()) - 1 for p in root.iterdir()
                      if p.is_dir() and not p.is_symlink())
        row = {"kind": kind, "auc": round(res["combined"]["auc"], 3),
               "auc_ci": [round(v, 3) for v in res["combined"].get("auc_ci", [])],
               "per_site_auc": {s: round(v["auc"], 3) for s, v in res.items() if s != "combined" and "auc" in v},
               "train_cases": n_train, "wall_s": round(time.perf_counter() - t0, 1)}
        rows.append(row)
    real_model = args.out / "runs" / "real" / "centralized" / "model"
    if (real_model / "model.json").is_file():
        from synthlearn.data.layouts import open_study
        from synthlearn.audits.recognition import recognition_audit
        from synthlearn.tasks.model import TaskModel

        model = TaskModel.load(real_model)
        for row in rows:
            st = open_study(studies[row["kind"]])
            rec = recognition_audit(model, {s.name: list(s.cases) for s in st.sites if s.role == "train"})
            row.update(recognised=round(rec["balanced"], 3), recognition_auc=round(rec["auc"], 3))
    if args.test_blur:
        for row in rows:
            row["test_auc_blurred"] = blurred_test_auc(args.out / "runs" / row["kind"] / "centralized" / "model",
                                                       study_dir, args.test_blur)
    if args.tumour_stats:
        from synthlearn.data.layouts import open_study
        from synthlearn.tasks import get_task

        task = get_task(scfg.task)
        for row in rows:
            st = open_study(studies[row["kind"]])
            row["tumour_stats"] = tumour_stats([c for s in st.sites if s.role == "train" for c in s.cases], task,
                                               scfg.preprocess)
        test = [c for s in open_study(study_dir).sites if s.role == "test" for c in s.cases]
        rows.append({"kind": "real test sites", "tumour_stats": tumour_stats(test, task, scfg.preprocess)})
    for row in rows:
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
