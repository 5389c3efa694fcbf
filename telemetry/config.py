"""The merge's settings: one frozen object, built once by the entry point and passed in.

`SWIMMY_HOME` and `SWIMMY_NOTIFIER_METRICS_FILE` mean what they mean to the relay (the
names are a contract with deployments); a flag overrides each. A bad value is a
`ConfigError` naming the variable or flag, never a silent default.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Mapping


class ConfigError(ValueError):
    """A setting the merge cannot use."""


@dataclasses.dataclass(frozen=True)
class Config:
    home: Path
    notifier_metrics: Path
    system_metrics: Path
    stale_after: float = 60.0
    """Seconds after which the relay's snapshot counts as stale: the relay writes one every
    few seconds (`SWIMMY_NOTIFIER_METRICS_INTERVAL_SEC`, default 5), so a minute means it
    is dead or stuck."""


def _path(text: str, source: str) -> Path:
    if not text.strip():
        raise ConfigError(f"{source}: must not be empty")
    return Path(text).expanduser()


def _pick(flags: Mapping[str, Any], field: str, flag: str, environ: Mapping[str, str],
          env: str | None = None) -> tuple[str, str] | None:
    """A setting's text and where it came from (the flag, else the variable), or None."""
    if flags.get(field) is not None:
        return str(flags[field]), flag
    if env is not None and env in environ:
        return environ[env], env
    return None


def load(environ: Mapping[str, str], flags: Mapping[str, Any], cwd: Path) -> Config:
    """Build the settings: a flag wins over its variable, which wins over the default;
    `cwd` is the default home."""
    picked = _pick(flags, "home", "--home", environ, "SWIMMY_HOME")
    home = _path(*picked) if picked else cwd
    if picked and not home.is_dir():
        raise ConfigError(f"{picked[1]}: {picked[0]!r} is not a directory")

    picked = _pick(flags, "notifier_metrics", "--notifier-metrics", environ,
                   "SWIMMY_NOTIFIER_METRICS_FILE")
    notifier = _path(*picked) if picked else home / "data" / "notifier_metrics.sexp"
    picked = _pick(flags, "system_metrics", "--system-metrics", environ)
    system = _path(*picked) if picked else home / "data" / "system_metrics.sexp"
    if notifier.resolve() == system.resolve():
        raise ConfigError(f"the notifier's and the system's metrics are the same file: {system}")

    picked = _pick(flags, "stale_after", "--stale-after", environ)
    if picked is None:
        return Config(home, notifier, system)
    text, source = picked
    try:
        stale_after = float(text)
    except ValueError:
        stale_after = math.nan
    if not 0 < stale_after < math.inf:
        raise ConfigError(f"{source}: must be a positive number of seconds, got {text!r}")
    return Config(home, notifier, system, stale_after)
