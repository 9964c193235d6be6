"""Starting a deployment's processes and carrying a round protocol through them.

- :func:`start_superlink`: the server's Flower SuperLink with TLS and SuperNode authentication (a child process);
- :func:`register_sites`: the site public keys it admits (``flwr supernode register``);
- :func:`supernode_command`: a hospital's SuperNode serving one site folder (``synthlearn site join``);
- :func:`deployed_federate`: the study runner's ``federate`` for a deployed study (``synthlearn server start``):
  each federation is one Flower run submitted to the SuperLink (``flwr run``), whose ServerApp runs the protocol's
  rounds (:mod:`synthlearn.deployment.apps`) and checkpoints them where this process reads the result back.

Offline and explicit (ENVIRONMENT.md): no telemetry or update check, runtime dependency installation disabled,
every Flower command from this Python's environment.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from synthlearn.deployment.credentials import CA_CERT, SERVER_CERT, SERVER_KEY
from synthlearn.protocol import FederationError, FederationState, RoundProtocol

log = logging.getLogger(__name__)

#: the Flower connection name the server's commands use (in FLWR_HOME/config.toml)
CONNECTION = "synthlearn"
#: the module of the app bundle: it only re-exports synthlearn's app pair
APP_MODULE = "synthlearn_fab"


def flower_env(flwr_home: str | Path) -> dict[str, str]:
    """The environment of every Flower process: offline, this Python's scripts first on PATH (the SuperLink and
    SuperNode start ``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` by name), ``FLWR_HOME``."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env.update({"FLWR_HOME": str(Path(flwr_home).resolve()), "FLWR_TELEMETRY_ENABLED": "0",
                "FLWR_DISABLE_UPDATE_CHECK": "1", "PATH": os.pathsep.join([bin_dir, env.get("PATH", "")]),
                "PYTHONUNBUFFERED": "1"})
    Path(env["FLWR_HOME"]).mkdir(parents=True, exist_ok=True)
    return env


def flower_command(name: str) -> str:
    """The path of Flower's command ``name`` in this Python's environment.

    Raises:
        FileNotFoundError: Flower is not installed here.
    """
    path = Path(sys.executable).parent / name
    if path.is_file():
        return str(path)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name}: not found beside {sys.executable} nor on PATH; install synthlearn's "
                                "requirements (`make install`)")
    return found


def write_connection(flwr_home: str | Path, address: str, ca_cert: str | Path) -> Path:
    """Write ``FLWR_HOME/config.toml`` naming the SuperLink at ``address`` (TLS verified against ``ca_cert``) as the
    default connection of the ``flwr`` commands; a SuperLink listening on every interface (0.0.0.0, ::) is dialled
    at 127.0.0.1, which its certificate always names."""
    host, port = split_address(address)
    if host in ("0.0.0.0", "::", ""):
        address = f"127.0.0.1:{port}"
    path = Path(flwr_home) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{address}"\n'
                    f'root-certificates = "{Path(ca_cert).resolve()}"\n')
    return path


def write_flower_app(folder: str | Path) -> Path:
    """Write the app bundle's project (``pyproject.toml`` and a module re-exporting
    :data:`synthlearn.deployment.apps.server_app` / ``client_app``) into ``folder``; ``flwr run`` builds it."""
    from synthlearn import __version__

    folder = Path(folder)
    (folder / APP_MODULE).mkdir(parents=True, exist_ok=True)
    (folder / APP_MODULE / "__init__.py").write_text(
        '"""synthlearn\'s Flower app pair: the code is the installed synthlearn package\'s."""\n'
        "from synthlearn.deployment.apps import client_app, server_app\n\n"
        '__all__ = ["client_app", "server_app"]\n')
    (folder / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        f'[project]\nname = "synthlearn-fab"\nversion = "{__version__.split("+")[0]}"\n'
        'description = "synthlearn federated arms"\nlicense = "Apache-2.0"\ndependencies = []\n\n'
        '[tool.hatch.build.targets.wheel]\npackages = ["."]\n\n'
        '[tool.flwr.app]\npublisher = "synthlearn"\n\n'
        f'[tool.flwr.app.components]\nserverapp = "{APP_MODULE}:server_app"\nclientapp = "{APP_MODULE}:client_app"\n\n'
        '[tool.flwr.app.config]\njob = ""\n')
    return folder


def _wait_for_port(host: str, port: int, proc: subprocess.Popen, timeout_s: float, log_file: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FederationError(f"the SuperLink exited with code {proc.returncode} while starting; its log "
                                  f"{log_file}:\n{_tail(log_file)}")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.3)
    raise FederationError(f"the SuperLink did not listen on {host}:{port} within {timeout_s:g} s; its log {log_file}")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def free_local_ports(n: int) -> list[int]:
    """``n`` TCP ports free on 127.0.0.1 now (for a deployment tried on one machine: the SuperLink and each
    SuperNode's local port)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` -> (host, port).

    Raises:
        ValueError: not host:port.
    """
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected an address host:port (e.g. 127.0.0.1:9300), found {address!r}")
    return host.strip("[]"), int(port)


def start_superlink(address: str, credentials: str | Path, flwr_home: str | Path, log_file: str | Path, *,
                    timeout_s: float = 60.0) -> subprocess.Popen:
    """Start the server's SuperLink on ``address`` with TLS (``credentials``' CA, certificate and key) and SuperNode
    authentication on, runtime dependency installation off; return once it listens.

    Raises:
        FileNotFoundError: a credential is missing (names the file).
        FederationError: it exited or did not listen in time (with its log's tail).
    """
    credentials = Path(credentials)
    for name in (CA_CERT, SERVER_CERT, SERVER_KEY):
        if not (credentials / name).is_file():
            raise FileNotFoundError(f"{credentials / name}: missing; make the consortium's credentials with "
                                    "`synthlearn server credentials --out DIR --site NAME ...`")
    host, port = split_address(address)
    with socket.socket() as probe:  # another process on the port would answer in the SuperLink's place
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise FederationError(f"the SuperLink cannot listen on {address}: {exc.strerror or exc} (another "
                                  "process holds it; choose another --address port)") from None
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    cmd = [flower_command("flower-superlink"), "--ssl-ca-certfile", str(credentials / CA_CERT),
           "--ssl-certfile", str(credentials / SERVER_CERT), "--ssl-keyfile", str(credentials / SERVER_KEY),
           "--enable-supernode-auth", "--disable-runtime-dependency-installation", "--host", host, "--port", str(port)]
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=flower_env(flwr_home),
                                start_new_session=True)
    _wait_for_port(host, port, proc, timeout_s, log_file)
    write_connection(flwr_home, address, credentials / CA_CERT)
    log.info("SuperLink listening on %s (TLS, SuperNode authentication on; log %s)", address, log_file)
    return proc


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux ``/proc``; empty elsewhere). Flower starts its SuperExec detached, in a
    session of its own, so stopping a SuperLink's or SuperNode's session alone would leave it running."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop_process(proc: subprocess.Popen | None, timeout_s: float = 15.0) -> None:
    """Stop a process started here, its session and every process below it, politely then firmly."""
    import signal

    if proc is None:
        return
    below = _descendants(proc.pid)
    for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        for pid in below:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)  # its session, when it leads one (started here with start_new_session)
            except (ProcessLookupError, PermissionError):
                proc.send_signal(sig)
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        if not any(Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid) for pid in below):
            return


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:", 1)[1].split("\n", 1)[0].lower()
    except (OSError, IndexError):
        return "zombie"


def register_sites(public_keys: Mapping[str, str | Path], flwr_home: str | Path, *, timeout_s: float = 60.0
                   ) -> dict[str, str]:
    """Register every site's public key with the running SuperLink (only registered SuperNodes may join).

    Returns:
        Site -> what Flower answered (its node id line).

    Raises:
        FederationError: a registration failed (the key and Flower's message).
    """
    out = {}
    env = flower_env(flwr_home)
    for site, key in public_keys.items():
        done = subprocess.run([flower_command("flwr"), "supernode", "register", str(Path(key).resolve()), CONNECTION],
                              env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
        text = (done.stdout + done.stderr).strip()
        if done.returncode != 0 or "registered successfully" not in text:
            raise FederationError(f"registering site {site}'s key {key} failed (exit {done.returncode}): {text[-800:]}")
        out[site] = text.splitlines()[-1]
        log.info("site %s: key registered", site)
    return out


def supernode_command(superlink: str, ca_cert: str | Path, key: str | Path, site_dir: str | Path,
                      state_dir: str | Path, *, port: int = 9094, name: str = "", allow: Sequence[str] = (),
                      max_wait_s: float | None = None) -> list[str]:
    """The ``flower-supernode`` command of a hospital serving ``site_dir``: TLS to ``superlink`` verified with
    ``ca_cert``, authenticated with the site's private ``key``; its node config names the site folder, its private
    state folder, its name and the arms it agreed to run (empty: every deployable arm)."""
    node_config = (f'site-dir="{Path(site_dir).resolve()}" state-dir="{Path(state_dir).resolve()}" '
                   f'site-name="{name or Path(site_dir).resolve().name}" allow="{",".join(allow)}"')
    cmd = [flower_command("flower-supernode"), "--superlink", superlink, "--root-certificates",
           str(Path(ca_cert).resolve()), "--auth-supernode-private-key", str(Path(key).resolve()),
           "--port", str(port), "--node-config", node_config]
    if max_wait_s is not None:
        cmd += ["--max-wait-time", str(float(max_wait_s))]
    return cmd


def check_site_files(site_dir: str | Path, ca_cert: str | Path, key: str | Path) -> None:
    """Refuse to start a SuperNode whose site folder, CA certificate or key is missing or of the wrong kind.

    Raises:
        FileNotFoundError: naming the missing path.
        ValueError: naming the path, what was expected and what was found.
    """
    for what, path in (("site folder", site_dir), ("CA certificate", ca_cert), ("site key", key)):
        if not Path(path).exists():
            raise FileNotFoundError(f"{path}: the {what} does not exist")
    site = Path(site_dir)
    if not site.is_dir() or not any(p.is_dir() and not p.name.startswith(".") for p in site.iterdir()):
        found = "a file" if not site.is_dir() else f"no case folder ({sorted(p.name for p in site.iterdir())[:8]})"
        raise ValueError(f"--site {site}: expected a site folder of case folders (<case>/<sequence>.nii.gz), found "
                         f"{found}")
    for what, path in (("CA certificate", ca_cert), ("site key", key)):
        if not Path(path).is_file():
            raise ValueError(f"{path}: expected the {what} file, found a folder")


def deployed_federate(flwr_home: str | Path, *, submit_timeout_s: float | None = None):
    """The study runner's ``federate`` for a deployed study: every federation is a Flower run on the SuperLink that
    ``flwr_home``'s connection names (:func:`start_superlink`), carried by the same round protocol and server loop as
    in simulation; what this process gets back is the server's checkpoint.

    Args:
        flwr_home: the server's Flower home (its ``config.toml`` names the SuperLink and its CA).
        submit_timeout_s: how long one federation may take before it is stopped (default: the protocol's start
            timeout plus its round timeout per round).
    """
    flwr_home = Path(flwr_home)

    def federate(protocol: RoundProtocol, sites, work_dir: str | Path, *, progress: bool = True) -> FederationState:
        import torch

        work_dir = Path(work_dir)
        checkpoint = work_dir / "server" / "global.pt"
        state = FederationState.load_or_start(checkpoint, protocol.initial_state)
        if state.round >= protocol.rounds:
            return state
        try:
            protocol.spec()
        except NotImplementedError as exc:
            raise FederationError(f"{exc}") from exc
        state.save(checkpoint)  # the ServerApp starts from this state (also round 0's: a protocol's initial state)
        job = work_dir / "server" / "deploy_job.pt"
        torch.save({"protocol": protocol, "site_names": [s.name for s in sites], "checkpoint": str(checkpoint),
                    "threads": torch.get_num_threads()}, job)  # the server's own work as in this process
        app_dir = write_flower_app(flwr_home / "app")
        limit = submit_timeout_s or protocol.start_timeout_s + protocol.rounds * protocol.round_timeout_s + 60.0
        log_file = work_dir / "server" / "flower-run.log"
        cmd = [flower_command("flwr"), "run", str(app_dir), CONNECTION, "--run-config", f'job="{job.resolve()}"',
               "--stream"]
        log.info("federation: submitting %s over %d sites to the SuperLink (log %s)", protocol.arm_name, len(sites),
                 log_file)
        t0 = time.perf_counter()
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=protocol.rounds, initial=state.round, desc=f"federation ({protocol.arm_name}, deployed)",
                       unit="round", leave=False)
        seen = checkpoint.stat().st_mtime_ns
        try:
            with open(log_file, "ab") as out:
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=flower_env(flwr_home),
                                        start_new_session=True)
                while proc.poll() is None:
                    if time.perf_counter() - t0 > limit:
                        stop_process(proc)
                        raise FederationError(f"the deployed federation did not finish within {limit:g} s; its log "
                                              f"{log_file}:\n{_tail(log_file)}")
                    time.sleep(1.0)
                    if bar is not None and checkpoint.stat().st_mtime_ns != seen:  # the ServerApp saved a round
                        seen = checkpoint.stat().st_mtime_ns
                        with contextlib.suppress(Exception):  # a progress bar never stops a federation
                            bar.update(FederationState.load_or_start(checkpoint, dict).round - bar.n)
        finally:
            if bar is not None:
                bar.close()
        state = FederationState.load_or_start(checkpoint, protocol.initial_state)
        if state.round < protocol.rounds:
            raise FederationError(f"the deployed federation stopped after round {state.round} of {protocol.rounds} "
                                  f"({time.perf_counter() - t0:.0f} s); its log {log_file}:\n{_tail(log_file)}")
        return state

    return federate


__all__ = ["APP_MODULE", "CONNECTION", "deployed_federate", "flower_command", "flower_env", "free_local_ports",
           "register_sites",
           "split_address", "start_superlink", "stop_process", "supernode_command",
           "write_connection", "write_flower_app"]
