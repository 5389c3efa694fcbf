"""Swimmy notifier: a non-blocking relay from ZeroMQ producers to Discord webhooks."""

__version__ = "0.1.0"
PROJECT_URL = "https://github.com/swimmy/notifier"


def program_name(argv0: str, module: str) -> str:
    """What --help calls a command: ``python -m MODULE`` when run that way, else the name
    it was started by (``swimmy-notifier``, ``swimmy-telemetry``)."""
    name = argv0.rpartition("/")[2]
    return f"python -m {module}" if name in ("__main__.py", "") else name
