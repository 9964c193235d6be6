"""CLI verb groups. Each module has ``register(subparsers)``; imports of heavy libraries stay inside the
handlers so that ``synthlearn --help`` is instant."""
