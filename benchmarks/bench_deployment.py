"""A study's federated arms deployed on one machine (issue 28): a SuperLink with TLS and SuperNode authentication
and one SuperNode per training site as real processes on loopback (`synthlearn server start` / `site join`), the
server holding only study.json and the test sites; then the same arms in Flower's simulation engine
(`synthlearn study run`). Reports per arm: wall time of each, their ratio, bytes from the sites, rounds, and the
test metric of both (they may differ slightly: the simulation and the deployment run the same seeds, but
the deployed server checks fewer files and the site processes start fresh each round).

Run (tiny studies, a few minutes each on 2 cores)::

    PYTHONPATH=src python benchmarks/bench_deployment.py --config configs/study_tiny.toml --arms fedavg \\
        --out runs/bench_deployment/fedavg
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CLI = [sys.executable, "-m", "synthlearn.cli"]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(CLI + args, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "SYNTHLEARN_THREADS": "1"}, start_new_session=True)


def deployed(config: Path, study: Path, arms: str, out: Path, timeout_s: float) -> tuple[dict, float]:
    from synthlearn.data.layouts import open_study
    from synthlearn.deployment.credentials import make_credentials
    from synthlearn.deployment.runner import free_local_ports, stop_process

    opened = open_study(study)
    train = [s.name for s in opened.sites_with_role("train")]
    server_study = out / "server_study"  # the server's view: study.json and the test sites only
    server_study.mkdir(parents=True)
    shutil.copy(study / "study.json", server_study)
    for site in opened.sites_with_role("test"):
        shutil.copytree(study / site.name, server_study / site.name)
    make_credentials(out / "creds", train)
    link, *ports = free_local_ports(1 + len(train))
    address = f"127.0.0.1:{link}"
    t0 = time.perf_counter()
    server = _start(["server", "start", "--config", str(config), "--study", str(server_study), "--arms", arms,
                     "--out", str(out / "run"), "--credentials", str(out / "creds"), "--address", address, "-q"],
                    out / "server.log")
    procs = [server]
    try:
        while "Waiting for them to join" not in (out / "server.log").read_text():
            if server.poll() is not None:
                raise SystemExit((out / "server.log").read_text()[-3000:])
            time.sleep(0.5)
        for port, site in zip(ports, train):
            procs.append(_start(["site", "join", "--site", str(study / site), "--superlink", address,
                                 "--ca", str(out / "creds" / "ca.crt"), "--key", str(out / "creds" / "sites" /
                                                                                       f"{site}.key"),
                                 "--port", str(port), "--state", str(out / "state" / site), "--max-wait",
                                 str(timeout_s)], out / f"site-{site}.log"))
        code = server.wait(timeout=timeout_s)
        wall = time.perf_counter() - t0
    finally:
        for proc in procs:
            stop_process(proc, timeout_s=10)
    if code != 0:
        raise SystemExit(f"server exited {code}:\n" + (out / "server.log").read_text()[-3000:])
    return json.loads((out / "run" / "results.json").read_text()), wall


def simulated(config: Path, study: Path, arms: str, out: Path) -> tuple[dict, float]:
    t0 = time.perf_counter()
    subprocess.run(CLI + ["study", "run", "--config", str(config), "--study", str(study), "--arms", arms, "--out",
                          str(out / "sim"), "-q"], check=True, env={**os.environ, "SYNTHLEARN_THREADS": "1"},
                   stdout=subprocess.DEVNULL)
    return json.loads((out / "sim" / "results.json").read_text()), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=Path("configs/study_tiny.toml"))
    ap.add_argument("--study", type=Path, help="the study (default: the config's)")
    ap.add_argument("--arms", default="fedavg")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--timeout", type=float, default=1800.0)
    args = ap.parse_args()
    from synthlearn.study import load_study_config

    study = args.study or Path(load_study_config(args.config).study)
    if args.out.exists():
        raise SystemExit(f"{args.out}: exists; choose a new folder")
    args.out.mkdir(parents=True)
    dep, dep_wall = deployed(args.config, study, args.arms, args.out, args.timeout)
    sim, sim_wall = simulated(args.config, study, args.arms, args.out)
    rows = {}
    for arm in args.arms.split(","):
        d, s = dep["arms"][arm], sim["arms"][arm]
        metric = "auc" if "auc" in d["test"]["combined"] else "dice_mean"
        rows[arm] = {"metric": metric, "deployed": d["test"]["combined"].get(metric),
                     "simulated": s["test"]["combined"].get(metric), "bytes_deployed": d["bytes_from_sites"],
                     "bytes_simulated": s["bytes_from_sites"], "rounds": d["rounds"], "arm_wall_deployed": d["wall_s"],
                     "arm_wall_simulated": s["wall_s"]}
    summary = {"config": str(args.config), "arms": rows, "wall_deployed_s": dep_wall, "wall_simulated_s": sim_wall,
               "ratio_deployed_to_simulated": dep_wall / sim_wall}
    (args.out / "bench.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
