"""The arm registry: an arm is one module that declares itself as an :class:`ArmSpec`.

An arm module (``synthlearn.strategies.<name>``) defines ``ARM = ArmSpec(...)``: its name, its ``run(ctx) ->
ArmOutput``, its typed config dataclass (read from the study config's ``[<table>]`` table, ``table`` defaulting to
the name; unknown keys are refused as everywhere), the arms whose results it reads (``needs``), and optional hooks
that check its config before anything trains and add to its training signature. The study runner knows arms only
through this registry: adding an arm touches no other module. An arm defined elsewhere (a plugin, a test) joins
with :func:`register_arm`.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

#: the arms that ship with synthlearn: modules of synthlearn.strategies, in the order a study usually runs them
BUILTIN_ARMS = ("centralized", "local", "fedavg", "catphishing", "fedkd", "asyndgan", "asyndgan_pooled", "fedgan")


@dataclasses.dataclass(frozen=True)
class ArmSpec:
    """What the study runner knows of an arm.

    Attributes:
        name: the arm's name in a study config's ``arms`` list and in ``results.json``.
        run: ``run(ctx: ArmContext) -> ArmOutput`` (:mod:`synthlearn.strategies.base`).
        config: the arm's settings, a frozen dataclass with defaults for every field (None: no settings).
        table: the study config table holding those settings (default: ``name``).
        needs: arms whose primary-seed folder this arm reads when they ran before it in the same study (the
            runner hands their folders over as ``ctx.needed``; an arm that is absent is simply not handed over).
        check: ``check(config, task)``: refuse a bad config (raise ``ValueError`` / ``FileNotFoundError``)
            before any arm trains.
        signature: ``signature(config, task) -> dict``: what, beyond the config itself, must match for a complete
            arm to be reused (e.g. the content of a config file the config names by path).
        description: one line for ``--help`` and the docs.
        task_kinds: the kinds of task it runs (:attr:`synthlearn.tasks.Task.kind`: ``classification``,
            ``segmentation``, ``multitask``); a study with another task refuses the arm before anything trains.
        spatial_dims: the study dimensionalities it runs on (3: volumes; 2: a 2D study of images).
        generic_data: it runs on a study of any sequences and label columns (``study.json``); False: only on the
            glioma defaults (a generator that draws the four sequences), refused before anything trains otherwise.
        protocol: ``protocol(setup, config) -> RoundProtocol``: the arm's round protocol as a deployed site builds it
            from the settings the server names (:meth:`synthlearn.protocol.RoundProtocol.spec`); None: the arm does
            not run across machines (``synthlearn server start`` refuses it).
        deploy_check: ``deploy_check(config)``: refuse (``ValueError``) settings that need the training sites' cases
            at the server, before a deployed study starts.
    """

    name: str
    run: Callable[[Any], Any]
    config: type | None = None
    table: str | None = None
    needs: tuple[str, ...] = ()
    check: Callable[[Any, str], None] | None = None
    signature: Callable[[Any, str], dict[str, Any]] | None = None
    description: str = ""
    task_kinds: tuple[str, ...] = ("classification",)
    spatial_dims: tuple[int, ...] = (3,)
    generic_data: bool = True
    protocol: Callable[[Any, Any], Any] | None = None
    deploy_check: Callable[[Any], None] | None = None

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ValueError(f"arm name must be letters, digits and _, found {self.name!r}")
        if self.config is not None and not dataclasses.is_dataclass(self.config):
            raise TypeError(f"arm {self.name}: config must be a dataclass type, found {self.config!r}")
        if not callable(self.run):
            raise TypeError(f"arm {self.name}: run must be callable")

    @property
    def config_table(self) -> str:
        return self.table or self.name

    def default_config(self) -> Any:
        """The arm's config with every default (None when it has no settings)."""
        return self.config() if self.config is not None else None


_REGISTERED: dict[str, ArmSpec] = {}


def register_arm(spec: ArmSpec) -> ArmSpec:
    """Make ``spec`` known to every study run in this process (replacing an arm of the same name)."""
    if not isinstance(spec, ArmSpec):
        raise TypeError(f"register_arm expects an ArmSpec, found {type(spec).__name__}")
    _REGISTERED[spec.name] = spec
    return spec


def get_arm(name: str) -> ArmSpec:
    """The arm called ``name``: a registered one, else the ``ARM`` of module ``synthlearn.strategies.<name>``.

    Raises:
        ValueError: no such arm (lists the known ones).
    """
    if name in _REGISTERED:
        return _REGISTERED[name]
    module_name = f"synthlearn.strategies.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ValueError(f"unknown arm {name!r}; known arms: {', '.join(known_arms())} (or register one with "
                             f"synthlearn.strategies.registry.register_arm)") from None
        raise
    spec = getattr(module, "ARM", None)
    if not isinstance(spec, ArmSpec):
        raise ValueError(f"arm {name!r}: {module_name} defines no ARM = ArmSpec(...)")
    return spec


def known_arms() -> list[str]:
    """Names of the built-in and registered arms."""
    return list(BUILTIN_ARMS) + sorted(n for n in _REGISTERED if n not in BUILTIN_ARMS)


def all_arms() -> dict[str, ArmSpec]:
    """Every built-in and registered arm."""
    return {name: get_arm(name) for name in known_arms()}


def deployable_arms() -> list[str]:
    """The arms whose round protocol runs across machines (an ``ArmSpec.protocol``)."""
    return [name for name, spec in all_arms().items() if spec.protocol is not None]


def protocol_from_spec(spec: Any) -> Any:
    """The round protocol a deployed site runs, built from what the server named (``{"arm", "setup", "config"}``,
    :meth:`synthlearn.protocol.RoundProtocol.spec`): the arm's own class from settings read as any config is (unknown
    keys refused, values checked), never code sent by the server.

    Raises:
        ValueError: not such a spec, an arm that does not run deployed, or settings the arm's config refuses.
    """
    from synthlearn.config import from_dict
    from synthlearn.tasks.setup import TrainingSetup

    if not isinstance(spec, dict) or set(spec) != {"arm", "setup", "config"}:
        found = sorted(spec) if isinstance(spec, dict) else type(spec).__name__
        raise ValueError(f"a protocol spec is an object with keys arm, setup and config; found {found}")
    arm = get_arm(str(spec["arm"]))
    if arm.protocol is None or arm.config is None:
        raise ValueError(f"arm {arm.name} does not run deployed; arms that do: {', '.join(deployable_arms())}")
    setup = from_dict(TrainingSetup, spec["setup"])
    config = from_dict(arm.config, spec["config"])
    return arm.protocol(setup, config)


__all__ = ["BUILTIN_ARMS", "ArmSpec", "all_arms", "deployable_arms", "get_arm", "known_arms", "protocol_from_spec",
           "register_arm"]
