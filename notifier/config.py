"""Configuration: one validated object, built once by the entry point and passed in.

Every setting has an environment variable (names are a contract with existing
deployments) and a command-line flag that overrides it. A bad value is a `ConfigError`
naming the variable, never a silent default. No other module reads the environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping


class ConfigError(ValueError):
    """Settings with values the relay cannot use; `problems` names each one."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


def _whole(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError("must be a whole number") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"from {minimum} to {maximum}" if maximum else f"at least {minimum}"
            raise ValueError(f"must be {bound}")
        return value
    return parse


def _seconds(minimum: float, maximum: float) -> Callable[[str], float]:
    """Seconds from `minimum` to `maximum`: an interval or a timeout past its bound is a
    mistake (1e10 would overflow the waits that use it), never a silent clamp."""
    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise ValueError("must be a number of seconds") from None
        if not math.isfinite(value) or not minimum <= value <= maximum:
            raise ValueError(f"must be a finite number of seconds from {minimum:g} to "
                             f"{maximum:.0f}")
        return value
    return parse


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be 1 or 0 (true/false, yes/no, on/off)")


def _address(text: str) -> str:
    text = text.strip()
    if not text or any(c.isspace() for c in text) or "/" in text:
        raise ValueError("must be an IP address, '*' or an interface name")
    if text.startswith("[") and text.endswith("]"):  # [::1] is ::1
        text = text[1:-1]
    return text


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return value
    return parse


def _path(text: str) -> Path:
    if not text.strip():
        raise ValueError("must not be empty")
    return Path(text).expanduser()


_HOST_PORT = re.compile(r"(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9._-]+))(?::(\d{1,5}))?\Z")


def parse_allowed_hosts(text: str) -> tuple[tuple[str, int | None], ...]:
    """``"127.0.0.1:8099, localhost"`` -> ``(("127.0.0.1", 8099), ("localhost", None))``;
    an entry without a port allows any port on that host."""
    hosts = []
    for entry in filter(None, (part.strip() for part in text.split(","))):
        match = _HOST_PORT.match(entry)
        if match is None:
            raise ValueError(f"{entry!r} is not host[:port]")
        ipv6, host, port = match.groups()
        hosts.append(((ipv6 or host).lower(), _whole(1, 65535)(port) if port else None))
    return tuple(hosts)


def _listen(text: str) -> tuple[str, int]:
    """``127.0.0.1:9464`` -> ``("127.0.0.1", 9464)``: an address and a port, both needed."""
    match = _HOST_PORT.match(text.strip())
    if match is None or match.group(3) is None:
        raise ValueError("must be ADDRESS:PORT, such as 127.0.0.1:9464")
    ipv6, host, port = match.groups()
    return ipv6 or host, _whole(1, 65535)(port)


@dataclasses.dataclass(frozen=True)
class Setting:
    field: str
    env: str | None
    flag: str
    parse: Callable[[str], Any]
    default: str | None
    help: str


# The one table of settings: the parser, the flags and the README's table follow it.
SETTINGS = (
    Setting("home", "SWIMMY_HOME", "--home", _path, None,
            "base directory; runtime files go in $SWIMMY_HOME/data/ (default: current directory)"),
    Setting("port", "SWIMMY_PORT_NOTIFIER", "--port", _whole(1, 65535), "5562",
            "TCP port the relay binds its PULL socket to"),
    Setting("bind_addr", "SWIMMY_NOTIFIER_BIND_ADDR", "--bind-addr", _address, "127.0.0.1",
            "address to bind (loopback only unless set)"),
    Setting("queue_max", "SWIMMY_NOTIFIER_QUEUE_MAX", "--queue-max", _whole(1, 10_000_000),
            "1000", "bound on messages held (oldest dropped first)"),
    Setting("metrics_interval", "SWIMMY_NOTIFIER_METRICS_INTERVAL_SEC", "--metrics-interval",
            _seconds(0.05, 3600), "5", "seconds between metrics snapshots"),
    Setting("dedupe_window", "SWIMMY_NOTIFIER_DEDUPE_WINDOW_SEC", "--dedupe-window",
            _seconds(0, 86400), "180", "duplicate suppression window, 0 disables"),
    Setting("metrics_file", "SWIMMY_NOTIFIER_METRICS_FILE", "--metrics-file", _path, None,
            "metrics snapshot (default: $SWIMMY_HOME/data/notifier_metrics.sexp)"),
    Setting("log_file", "SWIMMY_NOTIFIER_LOG_FILE", "--log-file", _path, None,
            "log file, reopened after rotation (default: standard error)"),
    Setting("log_level", "SWIMMY_NOTIFIER_LOG_LEVEL", "--log-level",
            _choice("debug", "info", "warning", "error"), "info",
            "least severe log lines written: debug adds a line per message accepted and "
            "delivered"),
    Setting("log_format", "SWIMMY_NOTIFIER_LOG_FORMAT", "--log-format", _choice("text", "json"),
            "text", "log lines as text or as one JSON object each"),
    Setting("prometheus_file", "SWIMMY_NOTIFIER_PROMETHEUS_FILE", "--prometheus-file", _path,
            None, "Prometheus text file rewritten every interval, for node_exporter's textfile "
            "collector (needs the 'prometheus' extra; default: none)"),
    Setting("metrics_listen", "SWIMMY_NOTIFIER_METRICS_LISTEN", "--metrics-listen", _listen,
            None, "ADDRESS:PORT serving Prometheus /metrics (needs the 'prometheus' extra; "
            "default: none)"),
    Setting("allowed_hosts", "SWIMMY_NOTIFIER_ALLOWED_HOSTS", "--allowed-hosts",
            parse_allowed_hosts, "",
            "extra webhook hosts allowed, comma-separated host[:port]; plain http is allowed "
            "only for these (local stand-ins and tests)"),
    Setting("senders", "SWIMMY_NOTIFIER_SENDERS", "--senders", _whole(1, 64), "8",
            "sender threads: up to this many webhooks can hang at once before the others "
            "wait"),
    Setting("drain_sec", "SWIMMY_NOTIFIER_DRAIN_SEC", "--drain-sec", _seconds(0, 600),
            "5", "on SIGTERM, seconds spent delivering what is pending before persisting it"),
    Setting("durable", "SWIMMY_NOTIFIER_DURABLE", "--durable", _boolean, "1",
            "commit every message taken off the socket to the store before posting it, so "
            "that a crash, SIGKILL or power cut loses nothing taken; 0 holds messages in "
            "memory and writes them to the store at SIGTERM"),
    Setting("store", "SWIMMY_NOTIFIER_STORE", "--store", _path, None,
            "the store of held messages, one relay each (default: "
            "$SWIMMY_HOME/data/notifier_store.sqlite3)"),
    Setting("global_rate", "SWIMMY_NOTIFIER_GLOBAL_RATE", "--global-rate", _whole(1, 10_000),
            "45", "most requests per second to Discord, all webhooks together (Discord "
            "allows an IP 50)"),
    Setting("channel_period", "SWIMMY_NOTIFIER_CHANNEL_PERIOD_SEC", "--channel-period",
            _seconds(1, 3600), "60", "the window of Discord's hidden per-channel limit (about 30 "
            "messages per 60 s), over which a channel's pace is learned"),
    Setting("request_deadline", "SWIMMY_NOTIFIER_REQUEST_DEADLINE_SEC", "--request-deadline",
            _seconds(0.5, 600), "20", "the longest one request to Discord may take, connect and "
            "the whole answer"),
    Setting("max_age", "SWIMMY_NOTIFIER_MAX_AGE_SEC", "--max-age", _seconds(1, 2_592_000), "21600",
            "seconds after which a message whose requests keep failing (network errors, "
            "5xx) is given up; until then an outage is waited out"),
    Setting("curve_secret_key", "SWIMMY_NOTIFIER_CURVE_SECRET_KEY", "--curve-secret-key", _path,
            None, "the relay's secret certificate (NAME.key_secret, mode 0600); with "
            "--curve-clients, only the producers listed there can connect, encrypted"),
    Setting("curve_clients", "SWIMMY_NOTIFIER_CURVE_CLIENTS", "--curve-clients", _path, None,
            "directory of the allowed producers' public certificates (NAME.key), re-read on "
            "SIGHUP"),
    Setting("insecure_bind", "SWIMMY_NOTIFIER_INSECURE_BIND", "--insecure-bind", _boolean, "0",
            "1 lets the relay bind an address other than loopback without CURVE"),
    Setting("curve_server_key", "SWIMMY_NOTIFIER_CURVE_SERVER_KEY", "--curve-server-key", _path,
            None, "send: the relay's public certificate (its NAME.key)"),
    Setting("curve_client_key", "SWIMMY_NOTIFIER_CURVE_CLIENT_KEY", "--curve-client-key", _path,
            None, "send: this producer's secret certificate (NAME.key_secret, mode 0600)"),
)


@dataclasses.dataclass(frozen=True)
class Config:
    home: Path
    port: int = 5562
    bind_addr: str = "127.0.0.1"
    queue_max: int = 1000
    metrics_interval: float = 5.0
    dedupe_window: float = 180.0
    metrics_file: Path | None = None
    log_file: Path | None = None
    log_level: str = "info"
    log_format: str = "text"
    prometheus_file: Path | None = None
    metrics_listen: tuple[str, int] | None = None
    allowed_hosts: tuple[tuple[str, int | None], ...] = ()
    senders: int = 8
    drain_sec: float = 5.0
    durable: bool = True
    store: Path | None = None
    global_rate: int = 45
    channel_period: float = 60.0
    request_deadline: float = 20.0
    max_age: float = 21600.0
    curve_secret_key: Path | None = None
    curve_clients: Path | None = None
    insecure_bind: bool = False
    curve_server_key: Path | None = None
    curve_client_key: Path | None = None

    def __post_init__(self):
        if self.metrics_file is None:
            object.__setattr__(self, "metrics_file", self.data_dir / "notifier_metrics.sexp")
        if self.store is None:
            object.__setattr__(self, "store", self.data_dir / "notifier_store.sqlite3")

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def curve(self) -> bool:
        """Whether the relay's socket is a CURVE server: both of its settings are given
        (the relay refuses to start with only one)."""
        return self.curve_secret_key is not None and self.curve_clients is not None

    @property
    def dead_letter_file(self) -> Path:
        """Where every message given up on is kept (mode 0600: it holds webhook URLs)."""
        return self.data_dir / "notifier_failed.sexp"

    @property
    def ipv6(self) -> bool:
        """Whether `bind_addr` is an IPv6 address (its socket needs ZeroMQ's IPV6 option)."""
        try:
            return ipaddress.ip_address(self.bind_addr).version == 6
        except ValueError:
            return False

    @property
    def endpoint(self) -> str:
        host = f"[{self.bind_addr}]" if self.ipv6 else self.bind_addr
        return f"tcp://{host}:{self.port}"


def add_arguments(parser: argparse.ArgumentParser, fields: tuple[str, ...] | None = None) -> None:
    """Add the flags of `fields` (all by default) to `parser`; values stay strings and
    are absent from the namespace unless given, so `load` sees only real flags."""
    for setting in SETTINGS:
        if fields is None or setting.field in fields:
            switch = {"nargs": "?", "const": "1"} if setting.parse is _boolean else {}
            parser.add_argument(setting.flag, dest=setting.field, metavar="VALUE",
                                default=argparse.SUPPRESS, help=f"{setting.help} [{setting.env}]",
                                **switch)


def load(environ: Mapping[str, str], flags: Mapping[str, Any] | None = None) -> Config:
    """Build the configuration: a flag wins over its environment variable, which wins
    over the default. Raises `ConfigError` naming every bad setting."""
    flags = flags or {}
    values: dict[str, Any] = {}
    problems = []
    for setting in SETTINGS:
        flag_value = flags.get(setting.field)
        if flag_value is not None:
            text, source = str(flag_value), setting.flag
        elif setting.env in environ:
            text, source = environ[setting.env], setting.env
        elif setting.default is not None:
            text, source = setting.default, "default"
        else:
            continue
        try:
            values[setting.field] = setting.parse(text)
        except ValueError as exc:
            problems.append(f"{source}: {exc}, got {text!r}")
    if problems:
        raise ConfigError(problems)
    values.setdefault("home", Path(os.getcwd()))
    return Config(**values)
