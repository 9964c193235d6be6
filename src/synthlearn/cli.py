"""The ``synthlearn`` command: thin verbs over the package API.

Verb groups live in :mod:`synthlearn.commands` (one module each); this file only wires them up, sets the
process-wide numeric settings and turns user errors into one clear message and a non-zero exit.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

from synthlearn import __version__

#: modules of synthlearn.commands whose register() adds verbs, in --help order
COMMAND_MODULES = ("data", "study", "generator", "evaluate", "paper", "deploy", "demo")

log = logging.getLogger("synthlearn")


class UserError(Exception):
    """An error caused by the user's input; printed without a traceback, exit code 2."""


def _setup_runtime() -> None:
    # 2-core machines: one torch thread per process avoids oversubscription (ENVIRONMENT.md);
    # a user may raise it with SYNTHLEARN_THREADS.
    from synthlearn.runtime import configure_threads

    configure_threads()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="synthlearn",
        description="Share generators, not patients: multi-site medical-imaging studies with synthetic data.",
    )
    parser.add_argument("--version", action="version", version=f"synthlearn {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        module_name = f"synthlearn.commands.{name}"
        if importlib.util.find_spec(module_name) is None:  # a verb group not built yet
            continue
        importlib.import_module(module_name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    _setup_runtime()
    try:
        return int(args.handler(args) or 0)
    except (UserError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError,
            ValueError) as exc:
        if args.verbose:
            raise
        print(f"synthlearn {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from synthlearn.protocol import FederationError

        if args.verbose or not isinstance(exc, FederationError):
            raise
        print(f"synthlearn {args.command}: the federation failed: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
