"""`python -m notifier validate` is the relay's own start check: run side by side on the
same settings, `validate` and the relay give the same verdict and the same exit code."""

import os
import socket
import subprocess
import sys

import pytest
import requests
import zmq

from notifier import config, curve, validate as checks
from notifier.demo import free_port
from tests.harness import RelayProcess, wait_until


def validate(home, *args, **environ):
    return subprocess.run([sys.executable, "-m", "notifier", "validate", *args],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SWIMMY_HOME": str(home), **environ})


def side_by_side(home, port=None, **settings):
    """(validate's result, the relay's exit code, the relay's log) for one set of settings."""
    relay = RelayProcess(home, "", port, **settings)
    checked = subprocess.run([sys.executable, "-m", "notifier", "validate"], env=relay.env,
                             capture_output=True, text=True, timeout=60)
    started = subprocess.run(relay.command, env=relay.env, capture_output=True, text=True,
                             timeout=60)
    return checked, started.returncode, relay.log()


@pytest.fixture
def keys(tmp_path):
    """The relay's secret key, a clients directory, and a copy of the key others can read."""
    directory, clients = tmp_path / "keys", tmp_path / "clients"
    for name in ("relay", "producer"):
        curve.keygen(directory, name)
    clients.mkdir()
    (clients / "producer.key").write_bytes((directory / "producer.key").read_bytes())
    loose = tmp_path / "loose.key_secret"
    loose.write_bytes((directory / "relay.key_secret").read_bytes())
    loose.chmod(0o644)
    return directory / "relay.key_secret", clients, loose


def bad_settings(keys, tmp_path):
    secret, clients, loose = keys
    return {
        "bind 0 without CURVE": ({"bind_addr": "0"}, "refusing to bind 0 without CURVE"),
        "bind 0.0.0.0 without CURVE": ({"bind_addr": "0.0.0.0"}, "refusing to bind 0.0.0.0"),
        "secret key without clients": ({"curve_secret_key": str(secret)},
                                       "CURVE needs both SWIMMY_NOTIFIER_CURVE_SECRET_KEY"),
        "clients without secret key": ({"curve_clients": str(clients)},
                                       "CURVE needs both"),
        "missing secret key": ({"curve_secret_key": str(tmp_path / "nowhere.key_secret"),
                                "curve_clients": str(clients)},
                               "No such file or directory"),
        "loose secret key": ({"curve_secret_key": str(loose), "curve_clients": str(clients)},
                             "has mode 0644: group and others must not read or write it"),
        "unknown log level": ({"log_level": "verbose"}, "SWIMMY_NOTIFIER_LOG_LEVEL"),
    }


@pytest.mark.parametrize("case", ["bind 0 without CURVE", "bind 0.0.0.0 without CURVE",
                                  "secret key without clients", "clients without secret key",
                                  "missing secret key", "loose secret key",
                                  "unknown log level"])
def test_a_setting_the_relay_refuses_is_exit_2_in_validate_and_in_the_relay(
        tmp_path, keys, case):
    settings, words = bad_settings(keys, tmp_path)[case]
    checked, relay_code, relay_log = side_by_side(tmp_path / "home", **settings)
    assert (checked.returncode, relay_code) == (2, 2), (checked.stderr, relay_log)
    assert words in checked.stderr
    if case != "unknown log level":  # refused before the log is configured
        assert words in relay_log and "ERROR notifier.relay cannot start" in relay_log
    assert not (tmp_path / "home" / "data" / "notifier_metrics.sexp").exists()


def test_a_port_in_use_is_exit_1_in_validate_and_in_the_relay(tmp_path):
    context = zmq.Context()
    taken = context.socket(zmq.PULL)
    port = taken.bind_to_random_port("tcp://127.0.0.1")
    try:
        checked, relay_code, relay_log = side_by_side(tmp_path, port)
    finally:
        context.destroy(linger=0)
    assert (checked.returncode, relay_code) == (1, 1), (checked.stderr, relay_log)
    assert f"cannot bind tcp://127.0.0.1:{port}: Address already in use" in checked.stderr
    assert f"cannot start: cannot bind tcp://127.0.0.1:{port}" in relay_log


@pytest.mark.parametrize("address", ["127.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_every_loopback_spelling_is_accepted_by_both(tmp_path, address, relays):
    relay = RelayProcess(tmp_path, "", bind_addr=address)
    checked = subprocess.run([sys.executable, "-m", "notifier", "validate"], env=relay.env,
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    relay = relays(allowed="", bind_addr=address)
    assert "refusing" not in relay.log()
    ip = curve.ip_address(address) or curve.ip_address("127.0.0.1")
    host = f"[{ip}]" if ip.version == 6 else str(ip)
    context = zmq.Context()
    try:
        push = context.socket(zmq.PUSH)
        push.setsockopt(zmq.IPV6, ip.version == 6)
        push.connect(f"tcp://{host}:{relay.port}")
        push.send(b"not an envelope")
        relay.wait_metrics(lambda m: m["rejected"] == 1, what="the envelope over " + host)
    finally:
        context.destroy(linger=0)
    assert relay.stop() == 0


def test_an_ipv6_metrics_listener_is_accepted_by_validate_and_served_by_the_relay(
        tmp_path, relays):
    pytest.importorskip("prometheus_client")
    port = free_port()
    listen = f"[::1]:{port}"
    checked = validate(tmp_path, "--port", str(free_port()),
                       SWIMMY_NOTIFIER_METRICS_LISTEN=listen)
    assert checked.returncode == 0, checked.stderr
    relay = relays(allowed="", metrics_listen=listen)
    page = wait_until(lambda: _get(f"http://[::1]:{port}/metrics"), 30, what="/metrics")
    assert "notifier_received_total" in page
    assert relay.stop() == 0


def _get(url):
    try:
        return requests.get(url, timeout=5).text
    except requests.RequestException:
        return None


def test_a_ready_environment_passes_and_nothing_is_left_behind(tmp_path):
    port = str(free_port())
    result = validate(tmp_path, "--port", port, "--log-file", str(tmp_path / "logs" / "n.log"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"notifier validate: OK: settings valid, tcp://127.0.0.1:{port}")
    assert list(tmp_path.iterdir()) == []  # checked, not created


def test_every_bad_setting_is_listed_and_exits_2(tmp_path):
    result = validate(tmp_path, "--queue-max", "0", SWIMMY_PORT_NOTIFIER="http",
                      SWIMMY_NOTIFIER_ALLOWED_HOSTS="http://x")
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert [line.split(":")[1].strip() for line in lines] == [
        "SWIMMY_PORT_NOTIFIER", "--queue-max", "SWIMMY_NOTIFIER_ALLOWED_HOSTS"], lines


def test_every_problem_is_listed_with_the_code_of_the_worst(tmp_path):
    """A taken port may pass by itself (1); a file where a directory belongs, or a
    directory where a file belongs, needs an operator (2): the verdict is 2."""
    context = zmq.Context()
    taken = context.socket(zmq.PULL)
    port = taken.bind_to_random_port("tcp://127.0.0.1")
    try:
        blocker = tmp_path / "a-file"
        blocker.write_text("")
        (tmp_path / "log-dir").mkdir()
        result = validate(tmp_path, "--port", str(port), "--metrics-file",
                          str(blocker / "metrics.sexp"), "--log-file", str(tmp_path / "log-dir"))
    finally:
        context.destroy(linger=0)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"notifier validate: metrics file {blocker}: {blocker} is not a directory",
        f"notifier validate: log file {tmp_path}/log-dir is not a regular file",
        f"notifier validate: cannot bind tcp://127.0.0.1:{port}: Address already in use",
    ], result.stderr


def test_a_non_loopback_address_is_judged_without_binding_it(tmp_path, keys, monkeypatch):
    """With CURVE, 0.0.0.0 may be bound, but checking must not open it: the port's use
    is read from the kernel's table (here: a listener on loopback, which a bind of every
    address would meet too)."""
    bound = []
    real_zmq_bind, real_bind = zmq.Socket.bind, socket.socket.bind
    monkeypatch.setattr(zmq.Socket, "bind", lambda self, a: (bound.append(a),
                                                             real_zmq_bind(self, a))[1])
    monkeypatch.setattr(socket.socket, "bind", lambda self, a: (bound.append(a),
                                                                real_bind(self, a))[1])
    secret, clients, _ = keys
    listener = socket.create_server(("127.0.0.1", 0))
    port, other_ports = listener.getsockname()[1], (free_port(), free_port())
    bound.clear()
    try:
        settings = config.Config(home=tmp_path, port=port, bind_addr="0.0.0.0",
                                 curve_secret_key=secret, curve_clients=clients,
                                 metrics_listen=("0.0.0.0", port))
        found = checks.problems(settings)
    finally:
        listener.close()
    assert bound == []
    assert [(p.code, p.text) for p in found] == [
        (checks.TRANSIENT, f"cannot bind tcp://0.0.0.0:{port}: Address already in use"),
        (checks.TRANSIENT, f"cannot bind metrics on 0.0.0.0:{port}: Address already in use")]
    free = config.Config(home=tmp_path, port=other_ports[0], bind_addr="0.0.0.0",
                         curve_secret_key=secret, curve_clients=clients)
    assert checks.problems(free) == [] and bound == []
    elsewhere = config.Config(home=tmp_path, port=other_ports[1], bind_addr="192.0.2.123",
                              curve_secret_key=secret, curve_clients=clients)
    assert [p.text for p in checks.problems(elsewhere)] == [
        f"cannot bind tcp://192.0.2.123:{elsewhere.port}: 192.0.2.123 is not an address "
        "of this host (yet?)"]
