"""CURVE for producers on other hosts: pyzmq's `zmq.auth` does the cryptography and the
key checks; this module only loads certificates carefully and sets the sockets up so
that nothing gets in when something is missing.

The relay's PULL socket is a CURVE server with a ZAP domain and ZAP_ENFORCE_DOMAIN set,
and a `zmq.auth` `ThreadAuthenticator` on the same context, started before the bind,
answers for that domain from the clients directory. Both halves matter (checked with
pyzmq 27.3 and libzmq 4.3.5): without an answering ZAP handler libzmq lets in any
client that knows the server key, unless ZAP_ENFORCE_DOMAIN is set; and
ZAP_ENFORCE_DOMAIN without a ZAP_DOMAIN on the socket turns authentication off
entirely. A domain the authenticator is not configured for refuses everyone.

Each message a CURVE server receives carries the ZAP User-Id its connection was
admitted with (the client's public key, Z85), which `Clients.names` maps to the name of
its certificate file: the producer the metrics and the log lines name.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import socket
import stat
import tempfile
from pathlib import Path

import zmq
import zmq.auth
import zmq.utils.z85
from zmq.auth.thread import ThreadAuthenticator

from notifier.redaction import CONTROL

log = logging.getLogger("notifier.curve")

ZAP_DOMAIN = "swimmy-notifier"
PUBLIC_SUFFIX, SECRET_SUFFIX = ".key", ".key_secret"  # as zmq.auth.create_certificates
MAX_FORMER = 1000  # revoked keys whose names are remembered for the log and the metrics


class CurveError(RuntimeError):
    """A certificate or clients directory the relay or a producer must not use."""


def _check_mode(path: Path, loose: int, what: str) -> None:
    """Refuse a file others could read or change, as ssh refuses a loose key."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise CurveError(f"cannot read {what} {path}: {exc.strerror}") from None
    if mode & loose:
        raise CurveError(f"{what} {path} has mode {stat.S_IMODE(mode):04o}: group and others "
                         f"must not {'write' if loose == 0o022 else 'read or write'} it "
                         f"(chmod {'go-w' if loose == 0o022 else '600'} {path})")


def load_secret(path: Path) -> tuple[bytes, bytes]:
    """(public, secret) key of a secret certificate; refused unless only its owner can
    read it (mode 0600 or stricter)."""
    _check_mode(path, 0o077, "secret certificate")
    public, secret = _load(path)
    if secret is None:
        raise CurveError(f"{path} holds no secret key: give the {SECRET_SUFFIX} file "
                         "written by `python -m notifier keygen`")
    return public, secret


def load_public(path: Path) -> bytes:
    """The public key of a certificate (a public or a secret one)."""
    return _load(path)[0]


def _load(path: Path) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise CurveError(f"cannot load the certificate {path}: {exc}") from None


def load_clients(directory: Path) -> tuple[dict[str, str], list[str]]:
    """The allowed producers, Z85 public key -> name (the certificate file's name
    without ``.key``), and why any certificate was refused. Group and others must not be
    able to write the directory or a certificate in it: whoever can would allow
    themselves. A name that is not UTF-8 or holds a control character is refused (its
    producer cannot connect): a name is written in the metrics and the log, as is."""
    _check_mode(directory, 0o022, "clients directory")
    if not directory.is_dir():
        raise CurveError(f"the clients directory {directory} is not a directory")
    clients, refused = {}, []
    for path in sorted(directory.glob("*" + PUBLIC_SUFFIX)):
        name = path.name[:-len(PUBLIC_SUFFIX)]
        refusal = name_refusal(name)
        if refusal is not None:
            refused.append(f"client certificate {shown(path.name)} in {directory} refused: "
                           f"its name {refusal}; rename it (its producer cannot connect "
                           "meanwhile)")
            continue
        _check_mode(path, 0o022, "client certificate")
        clients[load_public(path).decode("ascii")] = name
    return clients, refused


def name_refusal(name: str) -> str | None:
    """Why a certificate file's name cannot name a producer, or None."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if CONTROL.search(name):
        return "holds a control character"
    return None


def shown(name: str) -> str:
    """A file name as it can be logged: its bytes, escaped where not printable ASCII."""
    return ascii(os.fsencode(name))[1:]


def set_server(socket: zmq.Socket, public: bytes, secret: bytes) -> None:
    """Make `socket` (not bound yet) a CURVE server that only ZAP can let clients into."""
    socket.curve_server = True
    socket.curve_publickey = public
    socket.curve_secretkey = secret
    socket.zap_domain = ZAP_DOMAIN.encode()
    socket.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)


HANDSHAKE_FAILURES = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                      | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


def handshake_failure(event: int, value: int) -> str:
    """What a failed handshake (a socket monitor event) most likely means."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return f"the key is not allowed (ZAP status {value})"
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            return "one side uses CURVE and the other does not"
        if value == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
            return "it could not be decrypted: the producer has the wrong server key"
        return f"protocol error {value:#x}"
    return "the peer hung up: wrong server key, or no CURVE"


def set_client(socket: zmq.Socket, server_public: bytes, public: bytes, secret: bytes) -> None:
    """Make `socket` (not connected yet) a CURVE client of the server `server_public`."""
    socket.curve_serverkey = server_public
    socket.curve_publickey = public
    socket.curve_secretkey = secret


class _Authenticator(ThreadAuthenticator):
    """zmq.auth's authenticator, noting which CURVE keys connect from which address: a
    connection libzmq drops (`notifier.door`) is named by the producer at its address."""

    MAX_ADDRESSES = 1024

    def __init__(self, context: zmq.Context):
        super().__init__(context)
        self.keys_at: dict[str, frozenset[str]] = {}  # replaced, never changed: read
        # from the relay's receiver thread while this one writes

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        await super().handle_zap_message(msg)  # a coroutine since pyzmq 25
        if len(msg) >= 7 and msg[5] == b"CURVE" and len(msg[6]) == 32:
            address = msg[3].decode("utf-8", "replace")
            keys = self.keys_at.pop(address, frozenset())
            if len(self.keys_at) >= self.MAX_ADDRESSES:
                del self.keys_at[next(iter(self.keys_at))]
            self.keys_at[address] = keys | {zmq.utils.z85.encode(msg[6]).decode("ascii")}


class Clients:
    """The ZAP authenticator of the relay's context and `names`, the keys it admits
    (Z85 User-Id -> producer name): zmq.auth asks `callback` at each handshake, so what
    it admits and what `names` holds are one dict. `reload` re-reads the directory: a new
    key can connect at once; a removed one can no longer connect, and leaves `names`
    (for `former`), so the relay refuses what a connection admitted before still sends."""

    def __init__(self, context: zmq.Context, directory: Path):
        self.directory = directory
        self.names: dict[str, str] = self._load()
        self.former: dict[str, str] = {}  # revoked key -> its name
        self._auth = _Authenticator(context)
        self._auth.start()
        self._auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=self)

    def _load(self) -> dict[str, str]:
        names, refused = load_clients(self.directory)
        for text in refused:
            log.error("%s", text)
        return names

    def callback(self, domain: str, key: bytes) -> bool:
        """zmq.auth's question, in its thread, for each handshake: is `key` (Z85) allowed?"""
        return key.decode("ascii", "replace") in self.names

    def reload(self) -> tuple[list[str], list[str]]:
        """Re-read the directory; returns the names added and removed. A directory that
        cannot be read (CurveError) leaves the keys loaded before in force."""
        old, self.names = self.names, self._load()
        removed = {key: name for key, name in old.items() if key not in self.names}
        for key in self.names:
            self.former.pop(key, None)
        self.former.update(removed)
        while len(self.former) > MAX_FORMER:
            del self.former[next(iter(self.former))]
        added = [name for key, name in self.names.items() if key not in old]
        return sorted(added), sorted(removed.values())

    def name_at(self, address: str) -> str | None:
        """The producer that connected from `address`, if only one did."""
        keys = self._auth.keys_at.get(address, frozenset())
        names = {self.names.get(key) or self.former.get(key) for key in keys} - {None}
        return names.pop() if len(names) == 1 else None

    def alive(self) -> bool:
        return self._auth.is_alive()

    def stop(self) -> None:
        self._auth.stop()


def ip_address(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address `address` names as ZeroMQ reads a bind address (``[::1]``, and the
    IPv4 spellings the C library accepts: ``127.1``, ``0``, ``0x7f.1``), or None for
    ``*``, an interface or a host name."""
    text = address.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    if not text or not text[0].isdigit():
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(text))
    except OSError:
        return None


def is_loopback(address: str) -> bool:
    """Whether binding `address` keeps the relay reachable from this host only: every
    address of 127.0.0.0/8 however spelled, ``::1`` and ``localhost``."""
    if address.strip() == "localhost":
        return True
    ip = ip_address(address)
    if ip is not None and ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip is not None and ip.is_loopback  # '*', 0.0.0.0, interface and host names: no


def bind_refusal(address: str, curve: bool, insecure: bool) -> str | None:
    """Why the relay must not bind `address` (None: it may). Off loopback, anyone who
    reaches the port could post to any allowed webhook, and the webhook tokens would
    cross the network in the clear."""
    if curve or insecure or is_loopback(address):
        return None
    return (f"refusing to bind {address} without CURVE: anyone who can reach the port "
            "could post to your webhooks, and webhook tokens would cross the network in "
            "the clear. Set up CURVE: `python -m notifier keygen DIR relay` and one "
            "`keygen DIR NAME` per producer, then set SWIMMY_NOTIFIER_CURVE_SECRET_KEY to "
            "the relay's .key_secret file and SWIMMY_NOTIFIER_CURVE_CLIENTS to a "
            "directory of the producers' .key files (README: Producers on other hosts). "
            "Or bind 127.0.0.1. Only to accept the risk: SWIMMY_NOTIFIER_INSECURE_BIND=1")


def keygen(directory: Path, name: str, owner: tuple[int, int] | None = None
           ) -> tuple[Path, Path]:
    """Write NAME.key (public, 0644) and NAME.key_secret (0600) in `directory`, owned by
    `owner` (uid, gid) when given (root gives the relay's key to its service user).
    Returns their paths.

    Never over an existing path of any kind, and never through a symlink (a dangling one
    planted in a shared directory included): zmq.auth writes the pair into a private
    directory of its own, and each file is then hard-linked to its name, which fails on
    any existing name without following it. So the files appear whole, with their final
    mode and owner, or not at all."""
    if not name or name.startswith(".") or any(not (c.isalnum() or c in "._-") for c in name):
        raise CurveError(f"{name!r} is not a certificate name (letters, digits, '.', '_', "
                         "'-'; it names the producer in metrics and logs)")
    public, secret = directory / (name + PUBLIC_SUFFIX), directory / (name + SECRET_SUFFIX)
    for path in (public, secret):
        if os.path.lexists(path):
            raise CurveError(f"{path} exists already: remove it or choose another name")
    directory.mkdir(parents=True, exist_ok=True)
    private = Path(tempfile.mkdtemp(dir=directory, prefix=".keygen-"))  # mode 0700
    linked: list[Path] = []
    try:
        made_public, made_secret = map(Path, zmq.auth.create_certificates(private, name))
        made_secret.chmod(0o600)
        made_public.chmod(0o644)
        for made in (made_public, made_secret):
            if owner is not None:
                os.chown(made, *owner, follow_symlinks=False)
        for made, path in ((made_public, public), (made_secret, secret)):
            try:
                os.link(made, path, follow_symlinks=False)
            except FileExistsError:
                raise CurveError(f"{path} exists already: remove it or choose another "
                                 "name") from None
            linked.append(path)
    except BaseException:
        for path in linked:
            path.unlink()
        raise
    finally:
        shutil.rmtree(private, ignore_errors=True)
    return public, secret
