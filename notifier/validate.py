"""The relay's start check: can the relay start here, with these settings?

One function, `problems`, decides it. The relay runs it at start and refuses to start on
any problem; ``python -m notifier validate`` (the unit's ``ExecStartPre=``) runs it and
lists what it found. Both exit with the same code: 2 (`OPERATOR`) for what only an
operator can fix (a bad or inconsistent setting, a key file missing, unreadable or
loosely permitted, a path the relay may not write), 1 (`TRANSIENT`) for what may pass
by itself (a port in use, a full disk).

The relay then binds for real; `validate` tries that too (``trial=True``): a loopback
address by binding it, any other address never (that would open the port, perhaps
without CURVE, only to check it): it reads the kernel's socket table and this host's
addresses instead. Run as the service user, it reads the key files as the relay will.
"""

from __future__ import annotations

import errno
import importlib.util
import ipaddress
import os
import socket
import stat
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import zmq

from notifier import curve, store
from notifier.config import Config

OPERATOR, TRANSIENT = 2, 1
"""Exit codes: only an operator can fix it / it may pass by itself."""

OPERATOR_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR,
                   errno.ELOOP, errno.ENAMETOOLONG, errno.EINVAL}
"""Errors of a path or a socket that waiting will not fix (permissions, a read-only file
system, a directory where a file belongs); the others (ENOSPC, EADDRINUSE...) may pass."""


class StartError(RuntimeError):
    """The relay cannot start; `code` is its exit code, OPERATOR or TRANSIENT."""

    def __init__(self, message: str, code: int = TRANSIENT):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Problem:
    code: int  # OPERATOR or TRANSIENT
    text: str


def code_for(exc: OSError) -> int:
    """OPERATOR or TRANSIENT for an error met while using a path or a socket."""
    return OPERATOR if exc.errno in OPERATOR_ERRNOS else TRANSIENT


def exit_code(found: Iterable[Problem]) -> int:
    """0 when nothing was found, else the code of the problem only an operator can fix."""
    return max((problem.code for problem in found), default=0)


# ---------------------------------------------------------------------- settings, keys

def _curve(settings: Config) -> Iterable[Problem]:
    """Both CURVE settings or neither, the bind CURVE or loopback allows, and key files
    the relay (this user) can load and nobody else can read or change."""
    if (settings.curve_secret_key is None) != (settings.curve_clients is None):
        yield Problem(OPERATOR, "CURVE needs both SWIMMY_NOTIFIER_CURVE_SECRET_KEY "
                                "(--curve-secret-key) and SWIMMY_NOTIFIER_CURVE_CLIENTS "
                                "(--curve-clients)")
    refusal = curve.bind_refusal(settings.bind_addr, settings.curve, settings.insecure_bind)
    if refusal is not None:
        yield Problem(OPERATOR, refusal)
    for path, load in ((settings.curve_secret_key, curve.load_secret),
                       (settings.curve_clients, curve.load_clients)):
        if path is not None:
            try:
                load(path)
            except curve.CurveError as exc:
                yield Problem(OPERATOR, f"CURVE: {exc}")


def _prometheus(settings: Config) -> Problem | None:
    if (settings.prometheus_file or settings.metrics_listen) and \
            importlib.util.find_spec("prometheus_client") is None:
        return Problem(OPERATOR, "Prometheus metrics need prometheus_client: pip install "
                                 "'swimmy-notifier[prometheus]'")
    return None


# ---------------------------------------------------------------------- files

def _writable_directory(directory: Path, what: str) -> Problem | None:
    """Why files cannot be created in `directory` (or in the nearest existing parent the
    relay would create it under), or None. Tried for real: root passes every access
    check, so only an attempt tells."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return Problem(OPERATOR, f"{what} {directory}: {existing} is not a directory")
    try:
        fd, temp = tempfile.mkstemp(dir=existing, prefix=".notifier-validate-")
    except OSError as exc:
        return Problem(code_for(exc), f"{what} {directory}: cannot create files in "
                                      f"{existing}: {exc.strerror}")
    os.close(fd)
    os.unlink(temp)
    return None


def _file(path: Path | None, what: str) -> Problem | None:
    """Why the relay could not write `path` (a regular file, or one it creates), or None."""
    if path is None:
        return None
    if not path.exists():
        return _writable_directory(path.parent, what)
    if not stat.S_ISREG(path.stat().st_mode):
        return Problem(OPERATOR, f"{what} {path} is not a regular file")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        return Problem(code_for(exc), f"{what} {path} cannot be written: {exc.strerror}")
    os.close(fd)
    return None


# ---------------------------------------------------------------------- addresses (trial)

def _kernel_words(hex_text: str) -> bytes:
    """An address as /proc/net/tcp prints it (32-bit words in host order) -> its bytes."""
    return b"".join(struct.pack("=I", int(hex_text[i:i + 8], 16))
                    for i in range(0, len(hex_text), 8))


def _listeners(port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The addresses TCP sockets of this network namespace listen on at `port`."""
    found = []
    for table in ("tcp", "tcp6"):
        try:
            lines = Path("/proc/self/net", table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, _, hex_port = fields[1].partition(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.append(ipaddress.ip_address(_kernel_words(address)))
    return found


def _conflicts(ours: ipaddress.IPv4Address | ipaddress.IPv6Address,
               theirs: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if ours.version != theirs.version:
        return ours.version == 6 and ours.is_unspecified  # '::' takes IPv4 too
    return ours == theirs or ours.is_unspecified or theirs.is_unspecified


def _local_addresses() -> set[ipaddress.IPv4Address | ipaddress.IPv6Address] | None:
    """This host's addresses (its network namespace's), or None if they cannot be read."""
    found: set = set()
    try:
        for line in Path("/proc/self/net/if_inet6").read_text().splitlines():
            found.add(ipaddress.IPv6Address(bytes.fromhex(line.split()[0])))
        last = None
        for line in Path("/proc/self/net/fib_trie").read_text().splitlines():
            text = line.strip(" |-+")
            if "/32 host LOCAL" in line and last is not None:
                found.add(last)
            try:
                last = ipaddress.IPv4Address(text)
            except ValueError:
                pass
    except (OSError, ValueError, IndexError):
        return None
    return found


def _unbound_check(address: str, port: int, what: str) -> Problem | None:
    """Whether `address`:`port` could be bound, judged without binding it."""
    ip = curve.ip_address(address)
    if ip is None and address != "*":
        try:
            socket.if_nametoindex(address)
        except OSError:
            return Problem(TRANSIENT, f"cannot bind {what}: no network interface {address!r}")
        ip = ipaddress.IPv4Address("0.0.0.0")  # judged against listeners on every address
    elif ip is None:
        ip = ipaddress.IPv4Address("0.0.0.0")
    local = _local_addresses()
    if not ip.is_unspecified and local is not None and ip not in local:
        return Problem(TRANSIENT, f"cannot bind {what}: {address} is not an address of this "
                                  "host (yet?)")
    if any(_conflicts(ip, theirs) for theirs in _listeners(port)):
        return Problem(TRANSIENT, f"cannot bind {what}: Address already in use")
    return None


def _bind(settings: Config) -> Problem | None:
    """Can the relay's PULL socket bind its address?"""
    if not curve.is_loopback(settings.bind_addr):
        return _unbound_check(settings.bind_addr, settings.port, settings.endpoint)
    context = zmq.Context()
    try:
        pull = context.socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        pull.setsockopt(zmq.IPV6, settings.ipv6)
        pull.bind(settings.endpoint)
    except zmq.ZMQError as exc:
        return Problem(code_for(exc), f"cannot bind {settings.endpoint}: "
                                      f"{zmq.strerror(exc.errno)}")
    finally:
        context.destroy(linger=0)
    return None


def _listen(settings: Config) -> Problem | None:
    """Can /metrics be served where asked? Resolved as prometheus_client resolves it."""
    if settings.metrics_listen is None:
        return None
    host, port = settings.metrics_listen
    where = f"metrics on {host}:{port}"
    try:
        family, *_, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                  flags=socket.AI_PASSIVE)[0]
    except OSError as exc:
        return Problem(TRANSIENT, f"cannot serve {where}: {exc.strerror}")
    if not curve.is_loopback(sockaddr[0]):
        return _unbound_check(sockaddr[0], port, where)
    try:
        with socket.create_server(sockaddr[:2], family=family):
            return None
    except OSError as exc:
        return Problem(code_for(exc), f"cannot serve {where}: {exc.strerror}")


# ---------------------------------------------------------------------- the check

def _store(settings: Config) -> Problem | None:
    """Another relay holds the store (asked without taking it over), or its directory
    cannot be written."""
    holder = store.in_use(settings.store)
    if holder is not None:
        return Problem(OPERATOR, f"the store {settings.store} is in use by {holder}: one "
                                 "relay per store")
    return _writable_directory(settings.store.parent, "store directory")


CHECKS: tuple[Callable[[Config], Problem | Iterable[Problem] | None], ...] = (
    _curve,
    _prometheus,
    lambda settings: _writable_directory(settings.data_dir, "data directory"),
    lambda settings: _file(settings.metrics_file, "metrics file"),
    _store,
    lambda settings: _file(settings.log_file, "log file"),
    lambda settings: _file(settings.prometheus_file, "Prometheus file"),
)
"""What the relay needs before it starts, in the order reported; one line per check."""

TRIALS: tuple[Callable[[Config], Problem | None], ...] = (_bind, _listen)
"""What the relay does at start anyway (and fails with the same code): validate tries it."""


def problems(settings: Config, *, trial: bool = True) -> list[Problem]:
    """Everything that would stop the relay configured by `settings` from starting here.
    The relay passes ``trial=False``: it binds for real right after."""
    found: list[Problem] = []
    for check in CHECKS + (TRIALS if trial else ()):
        result = check(settings)
        if isinstance(result, Problem):
            found.append(result)
        elif result is not None:
            found.extend(result)
    return found
