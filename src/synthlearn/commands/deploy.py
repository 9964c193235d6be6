"""Deployment verbs, for a study across hospitals' machines:

- ``synthlearn server credentials --out DIR --site A --site B ...``: the consortium's CA, the server's certificate
  and one key pair per site;
- ``synthlearn server start --config STUDY.toml --out RUN --credentials DIR``: the SuperLink (TLS, only registered
  site keys admitted) and the study's federated arms through it;
- ``synthlearn site join --site SITE_DIR --superlink HOST:PORT --ca ca.crt --key SITE.key``: a hospital's SuperNode
  serving its own site folder only.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def cmd_credentials(args: argparse.Namespace) -> int:
    from synthlearn.deployment.credentials import make_credentials

    written = make_credentials(args.out, args.site, hosts=args.host or ("127.0.0.1", "localhost"), days=args.days)
    print(f"credentials written to {args.out}:")
    print(f"  server keeps   {written['ca.key']} (offline once done), {written['server.pem']}, {written['server.key']}")
    for site in args.site:
        print(f"  site {site:<8} gets {written['ca.crt']} and {written[f'site:{site}.key']}")
    print(f"  the server registers {Path(args.out) / 'sites'}/*.pub (`synthlearn server start --credentials "
          f"{args.out}` does)")
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    from synthlearn.commands import check_output
    from synthlearn.commands.study import format_summary
    from synthlearn.data.layouts import open_study
    from synthlearn.deployment.credentials import site_public_keys
    from synthlearn.deployment.runner import deployed_federate, register_sites, start_superlink, stop_process
    from synthlearn.strategies.registry import deployable_arms, get_arm
    from synthlearn.study import load_study_config, run_study

    overrides: dict = {}
    if args.study:
        overrides["study"] = args.study
    if args.arms:
        overrides["arms"] = [a.strip() for a in args.arms.split(",") if a.strip()]
    cfg = load_study_config(args.config, overrides)
    local = [a for a in cfg.arms if get_arm(a).protocol is None]
    if local:
        raise ValueError(f"server start runs the study's federated arms across machines; arms {local} train on the "
                         f"sites' data in one process: run them with `synthlearn study run`, or choose --arms among "
                         f"{', '.join(deployable_arms())}")
    for arm in cfg.arms:  # settings that would need the sites' cases here fail before anything starts
        spec = get_arm(arm)
        if spec.deploy_check is not None:
            spec.deploy_check(cfg.arm_config(arm))
    open_study(cfg.study)  # a missing or unreadable study fails before the SuperLink starts
    check_output(args.out, "folder")
    keys = site_public_keys(args.credentials)
    out = Path(args.out)
    flwr_home = Path(args.flwr_home or out / "flower")
    superlink = start_superlink(args.address, args.credentials, flwr_home, out / "flower" / "superlink.log")
    try:
        register_sites(keys, flwr_home)
        print(f"SuperLink on {args.address}; registered sites: {', '.join(keys)}. Waiting for them to join "
              f"(`synthlearn site join`) ...", flush=True)
        results = run_study(cfg, out, progress=not args.quiet, force=args.force, federate=deployed_federate(flwr_home),
                            remote_sites=True)
    finally:
        stop_process(superlink)
    print(format_summary(results))
    print(f"results: {out}/results.json")
    return 0


def cmd_join(args: argparse.Namespace) -> int:
    import subprocess
    import sys
    import threading

    from synthlearn.deployment.runner import (
        check_site_files,
        flower_env,
        split_address,
        stop_process,
        supernode_command,
    )
    from synthlearn.strategies.registry import deployable_arms

    split_address(args.superlink)
    check_site_files(args.site, args.ca, args.key)
    name = args.name or Path(args.site).resolve().name
    state = Path(args.state or Path("synthlearn-site-state") / name)
    allow = [a.strip() for a in (args.allow or "").split(",") if a.strip()]
    unknown = sorted(set(allow) - set(deployable_arms()))
    if unknown:
        raise ValueError(f"--allow {args.allow}: {unknown} are not arms that run deployed; choose among "
                         f"{', '.join(deployable_arms())}")
    cmd = supernode_command(args.superlink, args.ca, args.key, args.site, state, port=args.port, name=args.name,
                            allow=allow, max_wait_s=args.max_wait)
    print(f"site {name}: serving {args.site} to {args.superlink} (state in {state}); Ctrl-C to leave", flush=True)
    if args.dry_run:
        print(" ".join(cmd))
        return 0
    state.mkdir(parents=True, exist_ok=True)
    from synthlearn.deployment.apps import POLICY_FILE

    # this site's own policy, read by its app each round (rewritten every join: an old override does not linger)
    (state / POLICY_FILE).write_text(json.dumps({"release_override": args.release_override or ""}, indent=1))
    if args.release_override:
        print(f"site {name}: a generator the release gate refuses will be sent anyway, with the reason "
              f"{args.release_override!r} recorded in its manifest", flush=True)
    env = flower_env(args.flwr_home or state / "flower")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    gave_up = threading.Event()

    def relay() -> None:  # the SuperNode's log, watched: flwr 1.41's SuperNode logs that it gave up but keeps running
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if "Giving up reconnection" in line:
                gave_up.set()

    threading.Thread(target=relay, daemon=True).start()  # the pipe stays open while Flower's SuperExec lives
    try:
        while proc.poll() is None:
            if gave_up.wait(0.5):
                print(f"site join: no server for {args.max_wait or 0:g} s (--max-wait); leaving", flush=True)
                return 1
        return proc.returncode
    except KeyboardInterrupt:
        return 130
    finally:
        stop_process(proc)  # with the SuperExec Flower starts detached


def cmd_gate(args: argparse.Namespace) -> int:
    from synthlearn.config import load_toml
    from synthlearn.generators.ldm.release_gate import (
        ReleaseGateConfig,
        ReleaseRefused,
        describe_refusal,
        record_release,
        release_gate,
    )

    holdout_path = Path(args.holdout)
    if not holdout_path.is_file():
        raise FileNotFoundError(f"--holdout {holdout_path}: no such file")
    try:
        split = json.loads(holdout_path.read_text())
        members, holdout = [str(c) for c in split["members"]], [str(c) for c in split["holdout"]]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"--holdout {holdout_path}: expected JSON with 'members' and 'holdout' lists of case ids, "
                         f"found {type(exc).__name__}: {exc}") from None
    cfg = load_toml(ReleaseGateConfig, args.config) if args.config else ReleaseGateConfig()
    decision = release_gate(args.artifact, args.site, members, holdout, cfg, seed=args.seed, progress=not args.quiet)
    if args.out:
        Path(args.out).write_text(json.dumps(decision, indent=1))
    try:
        record_release(args.artifact, decision, args.override_reason)
    except ReleaseRefused as exc:
        print(f"release gate: REFUSED: {describe_refusal(exc.decision)}; the artifact is unchanged and stays at the "
              f"site (--override-reason REASON releases it with the reason recorded)", flush=True)
        return 4
    state = "passed" if decision["passed"] else f"refused, released with the override {args.override_reason!r}"
    print(f"release gate: {state}; decision written to {Path(args.artifact) / 'manifest.json'} (release_gate)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    server = subparsers.add_parser(
        "server", help="run a study's federated arms across machines (credentials, start)",
        description="The server side of a study across hospitals: make the consortium's credentials, then start the "
                    "SuperLink and run the study's federated arms through it.")
    sub = server.add_subparsers(dest="server_command", metavar="SERVER_COMMAND")
    cred = sub.add_parser("credentials", help="make the CA, the server certificate and one key pair per site",
                          description="Write DIR/ca.crt, ca.key, server.pem, server.key and sites/<site>.key|.pub "
                                      "(EC P-384). Nothing is overwritten.")
    cred.add_argument("--out", required=True, help="a new folder")
    cred.add_argument("--site", action="append", required=True, help="a site name (repeat per site)")
    cred.add_argument("--host", action="append", help="a name or IP the sites dial (repeat; default 127.0.0.1 and "
                                                      "localhost)")
    cred.add_argument("--days", type=int, default=365, help="validity of the certificates (default 365)")
    cred.set_defaults(handler=cmd_credentials)
    start = sub.add_parser(
        "start", help="start the SuperLink and run the study's federated arms through the sites that join",
        description="Start a Flower SuperLink on --address with TLS (--credentials' CA and server certificate) and "
                    "SuperNode authentication (only the registered site keys, --credentials' sites/*.pub, may "
                    "join), then run the study config's federated arms, each federation a Flower run through the "
                    "sites' SuperNodes, and write RUN/results.json as `study run` does.")
    start.add_argument("--config", required=True, help="study config TOML")
    start.add_argument("--out", required=True, help="run folder")
    start.add_argument("--credentials", required=True, help="folder written by `synthlearn server credentials`")
    start.add_argument("--address", default="127.0.0.1:9300", help="host:port to listen on (default 127.0.0.1:9300)")
    start.add_argument("--study", help="study folder (overrides the config's `study`)")
    start.add_argument("--arms", help="comma-separated federated arms, overriding the config's `arms`")
    start.add_argument("--flwr-home", help="the server's Flower home (default RUN/flower)")
    start.add_argument("--force", action="store_true", help="re-run arms that are already complete")
    start.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    start.set_defaults(handler=cmd_start)
    server.set_defaults(handler=lambda args: (server.print_help(), 2)[1])

    site = subparsers.add_parser(
        "site", help="a hospital's side of a study across machines (join)",
        description="A hospital's side: `join` starts a SuperNode that serves one site folder to the server.")
    ssub = site.add_subparsers(dest="site_command", metavar="SITE_COMMAND")
    join = ssub.add_parser(
        "join", help="serve one site folder to the server's SuperLink (TLS, authenticated by the site key)",
        description="Start a Flower SuperNode that connects to --superlink over TLS (verified with --ca), "
                    "authenticated with the site's private --key, and answers the server's rounds from --site only. "
                    "It runs the protocol the server names only if it is one of --allow (default: every deployable "
                    "arm), rebuilt from settings (never code from the server); what it agreed to run is kept in "
                    "its state folder.")
    join.add_argument("--site", required=True, help="the site folder (case folders and labels.csv)")
    join.add_argument("--superlink", required=True, help="the server's host:port")
    join.add_argument("--ca", required=True, help="the consortium's CA certificate (ca.crt)")
    join.add_argument("--key", required=True, help="this site's private key (sites/<site>.key)")
    join.add_argument("--name", default="", help="the site's name in the study (default: the folder's name)")
    join.add_argument("--state", help="private state folder (default: synthlearn-site-state/<site> in the working "
                                      "folder)")
    join.add_argument("--port", type=int, default=9094, help="the SuperNode's local port for its app (default 9094)")
    join.add_argument("--allow", help="comma-separated arms this site agrees to run (default: all deployable)")
    join.add_argument("--max-wait", type=float, help="give up after this many seconds without the server")
    join.add_argument("--flwr-home", help="this site's Flower home (default: in the state folder)")
    join.add_argument("--dry-run", action="store_true", help="print the SuperNode command and exit")
    join.add_argument("--release-override", metavar="REASON", default="",
                      help="send a CATphishing generator even when the release gate refuses it, recording REASON in "
                           "its manifest (the server cannot set this; default: a refused generator stays here)")
    join.set_defaults(handler=cmd_join)

    gate = ssub.add_parser(
        "gate", help="run the release gate on a generator artifact at its site",
        description="Attack the artifact with the site's own cases before it leaves (SSIM membership inference with "
                    "its negative and positive controls, copy rate, white-box diffusion-loss attack) and write the "
                    "decision into its manifest. Exit 0: passed (or overridden with --override-reason); 4: refused, "
                    "the artifact unchanged.")
    gate.add_argument("--artifact", required=True, help="the generator artifact folder")
    gate.add_argument("--site", required=True, help="the site folder it was trained on")
    gate.add_argument("--holdout", required=True,
                      help="JSON with the 'members' (cases the generator trained on) and 'holdout' (cases it never "
                           "saw) ids, as the catphishing arm writes (holdout/<site>.json)")
    gate.add_argument("--config", help="a TOML of gate settings (keys of ReleaseGateConfig; unknown keys refused)")
    gate.add_argument("--seed", type=int, default=0, help="seed of the samples and the attacks (default 0)")
    gate.add_argument("--override-reason", default="", metavar="REASON",
                      help="release a refused artifact anyway, recording REASON in its manifest")
    gate.add_argument("--out", help="also write the full decision here (JSON)")
    gate.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    gate.set_defaults(handler=cmd_gate)
    site.set_defaults(handler=lambda args: (site.print_help(), 2)[1])
