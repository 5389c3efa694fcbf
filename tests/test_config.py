"""Configuration: defaults, environment, flags over environment, and clear errors."""

import re
from pathlib import Path

import pytest

from notifier import config
from notifier.config import ConfigError


def test_defaults_follow_the_design_table(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = config.load({})
    assert settings.home == tmp_path
    assert (settings.port, settings.bind_addr, settings.queue_max) == (5562, "127.0.0.1", 1000)
    assert (settings.metrics_interval, settings.dedupe_window) == (5.0, 180.0)
    assert settings.metrics_file == tmp_path / "data" / "notifier_metrics.sexp"
    assert settings.store == tmp_path / "data" / "notifier_store.sqlite3"
    assert settings.durable is True
    assert settings.log_file is None and settings.allowed_hosts == ()
    assert settings.endpoint == "tcp://127.0.0.1:5562"


def test_environment_then_flags_win(tmp_path):
    environ = {"SWIMMY_HOME": str(tmp_path), "SWIMMY_PORT_NOTIFIER": "6000",
               "SWIMMY_NOTIFIER_QUEUE_MAX": "50", "SWIMMY_NOTIFIER_DEDUPE_WINDOW_SEC": "0",
               "SWIMMY_NOTIFIER_ALLOWED_HOSTS": "127.0.0.1:8099, Localhost ,[::1]:9000",
               "SWIMMY_NOTIFIER_BIND_ADDR": "::1", "SWIMMY_NOTIFIER_LOG_FILE": "/tmp/n.log"}
    settings = config.load(environ, {"port": "7000", "queue_max": None})
    assert settings.port == 7000 and settings.queue_max == 50 and settings.dedupe_window == 0
    assert settings.allowed_hosts == (("127.0.0.1", 8099), ("localhost", None), ("::1", 9000))
    assert settings.endpoint == "tcp://[::1]:7000"
    assert settings.log_file == Path("/tmp/n.log")
    assert settings.metrics_file == tmp_path / "data" / "notifier_metrics.sexp"


@pytest.mark.parametrize("variable, value, message", [
    ("SWIMMY_PORT_NOTIFIER", "http", "SWIMMY_PORT_NOTIFIER: must be a whole number, got 'http'"),
    ("SWIMMY_PORT_NOTIFIER", "70000", "must be from 1 to 65535"),
    ("SWIMMY_NOTIFIER_QUEUE_MAX", "0", "SWIMMY_NOTIFIER_QUEUE_MAX: must be from 1 to 10000000"),
    ("SWIMMY_NOTIFIER_QUEUE_MAX", "1e3", "must be a whole number"),
    ("SWIMMY_NOTIFIER_METRICS_INTERVAL_SEC", "0", "must be a finite number of seconds"),
    ("SWIMMY_NOTIFIER_METRICS_INTERVAL_SEC", "nan", "must be a finite number of seconds"),
    ("SWIMMY_NOTIFIER_DEDUPE_WINDOW_SEC", "-1", "seconds from 0 to 86400"),
    ("SWIMMY_NOTIFIER_DEDUPE_WINDOW_SEC", "inf", "finite"),
    ("SWIMMY_NOTIFIER_METRICS_INTERVAL_SEC", "1e10", "SWIMMY_NOTIFIER_METRICS_INTERVAL_SEC: must "
     "be a finite number of seconds from 0.05 to 3600, got '1e10'"),
    ("SWIMMY_NOTIFIER_METRICS_INTERVAL_SEC", "1e300", "from 0.05 to 3600"),
    ("SWIMMY_NOTIFIER_DEDUPE_WINDOW_SEC", "86401", "from 0 to 86400"),
    ("SWIMMY_NOTIFIER_DRAIN_SEC", "601", "SWIMMY_NOTIFIER_DRAIN_SEC: must be a finite number "
     "of seconds from 0 to 600"),
    ("SWIMMY_NOTIFIER_CHANNEL_PERIOD_SEC", "3601", "from 1 to 3600"),
    ("SWIMMY_NOTIFIER_REQUEST_DEADLINE_SEC", "1e10", "from 0.5 to 600"),
    ("SWIMMY_NOTIFIER_MAX_AGE_SEC", "1e10", "from 1 to 2592000"),
    ("SWIMMY_NOTIFIER_BIND_ADDR", "", "must be an IP address"),
    ("SWIMMY_NOTIFIER_ALLOWED_HOSTS", "http://x", "is not host[:port]"),
    ("SWIMMY_NOTIFIER_METRICS_FILE", " ", "must not be empty"),
    ("SWIMMY_NOTIFIER_SENDERS", "0", "SWIMMY_NOTIFIER_SENDERS: must be from 1 to 64"),
    ("SWIMMY_NOTIFIER_LOG_LEVEL", "loud", "SWIMMY_NOTIFIER_LOG_LEVEL: must be one of debug, "
     "info, warning, error, got 'loud'"),
    ("SWIMMY_NOTIFIER_LOG_FORMAT", "xml", "must be one of text, json"),
    ("SWIMMY_NOTIFIER_INSECURE_BIND", "maybe", "SWIMMY_NOTIFIER_INSECURE_BIND: must be 1 or 0"),
    ("SWIMMY_NOTIFIER_CURVE_CLIENTS", "", "must not be empty"),
])
def test_a_bad_value_is_an_error_naming_the_variable(variable, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config.load({variable: value})


def test_every_bad_setting_is_named_at_once():
    with pytest.raises(ConfigError) as error:
        config.load({"SWIMMY_PORT_NOTIFIER": "http", "SWIMMY_NOTIFIER_LOG_LEVEL": "Debug"},
                    {"queue_max": "0"})
    assert [p.split(":")[0] for p in error.value.problems] == ["SWIMMY_PORT_NOTIFIER", "--queue-max"]


def test_a_bad_flag_names_the_flag():
    with pytest.raises(ConfigError, match="--queue-max: must be from 1 to 10000000"):
        config.load({"SWIMMY_NOTIFIER_QUEUE_MAX": "10"}, {"queue_max": "-5"})


def test_every_interval_and_timeout_has_an_upper_bound():
    """A setting in seconds takes its largest value and refuses anything past it: no
    interval or timeout can reach a wait that overflows (1e10 did)."""
    for setting in config.SETTINGS:
        if setting.env and setting.env.endswith("_SEC"):
            with pytest.raises(ConfigError, match="from .* to "):
                config.load({setting.env: "1e10"})
    largest = {"SWIMMY_NOTIFIER_METRICS_INTERVAL_SEC": "3600",
               "SWIMMY_NOTIFIER_DEDUPE_WINDOW_SEC": "86400", "SWIMMY_NOTIFIER_DRAIN_SEC": "600",
               "SWIMMY_NOTIFIER_CHANNEL_PERIOD_SEC": "3600",
               "SWIMMY_NOTIFIER_REQUEST_DEADLINE_SEC": "600",
               "SWIMMY_NOTIFIER_MAX_AGE_SEC": "2592000"}
    settings = config.load(largest)
    assert (settings.metrics_interval, settings.max_age) == (3600.0, 2592000.0)
