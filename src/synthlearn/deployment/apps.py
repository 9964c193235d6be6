"""The Flower app pair a deployed run loads (``synthlearn_fab:server_app`` / ``client_app`` in the app bundle
:func:`synthlearn.deployment.runner.write_flower_app` writes), around the same server loop and site handling as the
simulation (:mod:`synthlearn.federated.apps`).

The server side runs in the SuperLink's ServerApp process on the server's machine: it reads the job the server's
``synthlearn server start`` wrote (run config ``job``: the protocol object, the site names and the checkpoint path;
a file that never leaves the server), and runs :func:`synthlearn.federated.apps.run_rounds` with the protocol's
:meth:`~synthlearn.protocol.RoundProtocol.spec` as the hello every site receives first.

The site side runs in each hospital's SuperNode: the node's config names its site folder (``site-dir``), its
private state folder (``state-dir``) and the arms it agreed to run (``allow``). From the hello it rebuilds the
protocol from settings only (:func:`synthlearn.strategies.registry.protocol_from_spec`: no code or pickle from the
server), refuses an arm it did not allow, writes what it agreed to run in its state folder, and from then on reads
only its own site folder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from flwr.app import Message
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from synthlearn.federated.apps import CONFIG_KEY, HELLO_ROUND, ROUND_KEY, hello_reply, run_rounds, site_reply
from synthlearn.protocol import FederationState

log = logging.getLogger(__name__)

#: the hello's config key holding the protocol's spec (JSON)
SPEC_KEY = "protocol-spec"
#: node config keys of a deployed site
SITE_DIR, STATE_DIR, ALLOW, SITE_NAME = "site-dir", "state-dir", "allow", "site-name"

_PROTOCOLS: dict[tuple[int, str], tuple[Any, Path]] = {}  # per ClientApp process: (run id, site) -> protocol, folder
_MEMORY: dict[tuple[int, str], dict[str, Any]] = {}  # per ClientApp process: what a site keeps between rounds


def read_job(path: str | Path) -> dict[str, Any]:
    """The job ``synthlearn server start`` wrote for the ServerApp (``protocol``, ``site_names``, ``checkpoint``).

    Raises:
        FileNotFoundError: no such job file.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"deployed run: its job file {path} does not exist (written by the server's "
                                "`synthlearn server start` before it submits the run)")
    # the server's own file, written by the same user on the same machine just before: never a site's
    return torch.load(path, map_location="cpu", weights_only=False)


server_app = ServerApp()


@server_app.main()
def server_main(grid, context) -> None:
    """Every remaining round of the job's protocol over the registered sites."""
    from synthlearn.runtime import configure_threads

    job = read_job(str(context.run_config["job"]))
    configure_threads(int(job.get("threads", 1)))  # the server's aggregation and training as in the study process
    protocol, names, checkpoint = job["protocol"], list(job["site_names"]), Path(job["checkpoint"])
    state = FederationState.load_or_start(checkpoint, protocol.initial_state)
    hello = {SPEC_KEY: json.dumps(protocol.spec())}
    run_rounds(grid, protocol, state, names, checkpoint, hello=hello)


def _site_protocol(run_id: int, site: str, state: Path, spec_text: str | None, allowed: list[str]):
    """The protocol of ``run_id`` at this site and its state folder: built from the hello's spec, or rebuilt in a
    later round from what the site recorded at the hello.

    The state folder is the spec's (``state/protocol-<sha256 of the spec>/``, with ``protocol.json``, what the site
    agreed to run), not the run's: a federation the server resumes is a new Flower run of the same spec, and finds
    the site's state of its earlier rounds (e.g. FedAvg's optimizer) again. ``state/runs/<run id>`` names it.

    Returns:
        ``(protocol, its state folder)``.
    """
    import hashlib

    from synthlearn.strategies.registry import protocol_from_spec

    key = (run_id, site)
    pointer = state / "runs" / str(run_id)
    if spec_text is not None:
        spec = json.loads(spec_text)
        arm = spec.get("arm") if isinstance(spec, dict) else None
        if allowed and arm not in allowed:
            raise PermissionError(f"site {site}: the server asked for arm {arm!r}; this site agreed to run only "
                                  f"{allowed} (site join --allow)")
        protocol = protocol_from_spec(spec)
        text = json.dumps(spec, indent=1, sort_keys=True)
        folder = state / f"protocol-{hashlib.sha256(text.encode()).hexdigest()[:16]}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "protocol.json").write_text(text)
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.write_text(folder.name)
        _PROTOCOLS[key] = (protocol, folder)
    elif key not in _PROTOCOLS:
        if not pointer.is_file():
            raise RuntimeError(f"site {site}: round message of run {run_id} before its hello (no {pointer})")
        folder = state / pointer.read_text().strip()
        _PROTOCOLS[key] = (protocol_from_spec(json.loads((folder / "protocol.json").read_text())), folder)
    return _PROTOCOLS[key]


client_app = ClientApp()


@client_app.train()
def site_main(msg: Message, context) -> Message:
    """A deployed site's answer to the server's message: the hello (agree to the protocol, say its name) or a
    round of the protocol on its own site folder."""
    from synthlearn.data.contract import GLIOMA_LABELS
    from synthlearn.data.layouts import open_site
    from synthlearn.runtime import configure_threads

    node = context.node_config
    site_dir = Path(str(node[SITE_DIR]))
    name = str(node.get(SITE_NAME) or site_dir.resolve().name)
    allowed = [a for a in str(node.get(ALLOW, "")).split(",") if a]
    run_id = int(msg.metadata.run_id)
    config = msg.content[CONFIG_KEY]
    hello = int(config[ROUND_KEY]) == HELLO_ROUND
    protocol, state_root = _site_protocol(run_id, name, Path(str(node[STATE_DIR])),
                                          str(config[SPEC_KEY]) if hello and SPEC_KEY in config else None, allowed)
    if hello:
        log.info("site %s: run %d agreed (%s)", name, run_id, protocol.arm_name)
        return hello_reply(name, msg)
    configure_threads(protocol.threads_per_site)
    site = open_site(site_dir, name=name, sequences=protocol.setup.sequences,
                     labels=protocol.setup.labels or GLIOMA_LABELS)
    memory = _MEMORY.setdefault((run_id, name), {})
    from synthlearn.strategies.catphishing_site import SITE_POLICY

    memory[SITE_POLICY] = read_site_policy(Path(str(node[STATE_DIR])))  # the site's own, never the server's
    return site_reply(protocol, site, msg, state_root / name, memory)


#: the site's own settings, written by `synthlearn site join` into its state folder
POLICY_FILE = "site_policy.json"


def read_site_policy(state: Path) -> dict[str, Any]:
    """The site's policy (``{"release_override": reason or ""}``) from its state folder; empty when absent."""
    path = state / POLICY_FILE
    if not path.is_file():
        return {"release_override": ""}
    policy = json.loads(path.read_text())
    return {"release_override": str(policy.get("release_override", ""))}


__all__ = ["ALLOW", "POLICY_FILE", "SITE_DIR", "SITE_NAME", "SPEC_KEY", "STATE_DIR", "client_app", "read_job",
           "read_site_policy", "server_app"]
