"""`python -m notifier validate`: will the relay start here with these settings?

It checks the environment the way the relay will use it, without starting it: the
socket binds, the data directory and the log file can be written. It lists every
problem, so an operator (or systemd's ``ExecStartPre=``) sees them all at once.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import stat
import tempfile
from pathlib import Path

import zmq

from notifier import store
from notifier.config import Config


def _writable_directory(directory: Path) -> str | None:
    """Why files cannot be created in `directory` (or in the nearest existing parent the
    relay would create it under), or None. Tried for real: root passes every access
    check, so only an attempt tells."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory"
    try:
        fd, temp = tempfile.mkstemp(dir=existing, prefix=".notifier-validate-")
    except OSError as exc:
        return f"cannot create files in {existing}: {exc.strerror}"
    os.close(fd)
    os.unlink(temp)
    return None


def _file(path: Path, what: str) -> str | None:
    """Why the relay could not write `path` (a regular file, or one it creates), or None."""
    if not path.exists():
        reason = _writable_directory(path.parent)
        return None if reason is None else f"{what} {path}: {reason}"
    if not stat.S_ISREG(path.stat().st_mode):
        return f"{what} {path} is not a regular file"
    try:
        with open(path, "ab"):
            pass
    except OSError as exc:
        return f"{what} {path} cannot be written: {exc.strerror}"
    return None


def _bind(endpoint: str) -> str | None:
    context = zmq.Context()
    try:
        socket = context.socket(zmq.PULL)
        socket.setsockopt(zmq.LINGER, 0)
        socket.bind(endpoint)
    except zmq.ZMQError as exc:
        return f"cannot bind {endpoint}: {zmq.strerror(exc.errno)}"
    finally:
        context.destroy(linger=0)
    return None


def _listen(address: tuple[str, int]) -> str | None:
    try:
        with socket.create_server(address):
            return None
    except OSError as exc:
        return f"cannot serve metrics on {address[0]}:{address[1]}: {os.strerror(exc.errno)}"


def _store(path: Path) -> str | None:
    """Why the relay could not have the store at `path`: another relay holds it (asked
    without taking it), or its directory cannot be written."""
    holder = store.in_use(path)
    if holder is not None:
        return f"the store {path} is in use by {holder}: one relay per store"
    reason = _writable_directory(path.parent)
    return None if reason is None else f"store {path}: {reason}"


def problems(settings: Config) -> list[str]:
    """Everything that would stop the relay configured by `settings` from running."""
    found = [_bind(settings.endpoint),
             _file(settings.metrics_file, "metrics file"),
             _store(settings.store)]
    if settings.log_file is not None:
        found.append(_file(settings.log_file, "log file"))
    if settings.prometheus_file is not None:
        found.append(_file(settings.prometheus_file, "Prometheus file"))
    if settings.metrics_listen is not None:
        found.append(_listen(settings.metrics_listen))
    if (settings.prometheus_file or settings.metrics_listen) and \
            importlib.util.find_spec("prometheus_client") is None:
        found.append("Prometheus metrics need prometheus_client: pip install "
                     "'swimmy-notifier[prometheus]'")
    return [problem for problem in found if problem]
