"""CURVE: only producers whose keys are allowed get in, each counted under its name;
binding off loopback without CURVE is refused. Real sockets on 127.0.0.1, the relay as a
real process, real key files made with zmq.auth."""

import os
import signal
import subprocess
import sys

import pytest
import zmq

from notifier import curve, status
from notifier.__main__ import main
from notifier.client import NotifierClient
from notifier.curve import CurveError
from notifier.standin import DiscordStandIn
from tests.harness import RelayProcess, contents, envelope_text, free_port, wait_until


@pytest.fixture
def discord():
    with DiscordStandIn() as standin:
        yield standin


@pytest.fixture
def keys(tmp_path):
    """Key pairs for the relay and producers a, b, c, and an allowlist with a and b."""
    directory = tmp_path / "keys"
    for name in ("relay", "a", "b", "c"):
        curve.keygen(directory, name)
    clients = tmp_path / "clients"
    clients.mkdir()
    for name in ("a", "b"):
        (clients / f"{name}.key").write_bytes((directory / f"{name}.key").read_bytes())
    return directory, clients


def curve_settings(keys):
    directory, clients = keys
    return {"curve_secret_key": str(directory / "relay.key_secret"),
            "curve_clients": str(clients)}


def producer(relay, keys, name, discord, server="relay"):
    directory, _ = keys
    return NotifierClient(relay.endpoint, webhook=discord.webhook_url(1), linger_ms=0,
                          allowed_hosts=(("127.0.0.1", discord.port),),
                          server_key=directory / f"{server}.key",
                          client_key=directory / f"{name}.key_secret")


def test_allowed_producers_are_delivered_and_counted_by_name(discord, keys, relays):
    relay = relays(allowed=f"127.0.0.1:{discord.port}", **curve_settings(keys))
    with producer(relay, keys, "a", discord) as a, producer(relay, keys, "b", discord) as b:
        a.notify("from a")
        b.notify("from b")
        snapshot = relay.wait_metrics(lambda m: m["delivered"] == 2)
    assert sorted(contents(discord, "1")) == ["from a", "from b"]
    assert snapshot["curve"] is True and snapshot["insecure_bind"] is None
    assert [(p["name"], p["received"]) for p in snapshot["producers"]] == [("a", 1), ("b", 1)]
    assert "CURVE on: 2 producers allowed" in relay.log()
    assert relay.stop() == 0


def test_refused_clients_get_nothing_in_and_are_logged(tmp_path, discord, keys, relays):
    """No keys, a key that is not allowed (with the right server key: ZAP must say no),
    and the wrong server key: the relay receives nothing from any of them."""
    relay = relays(allowed=f"127.0.0.1:{discord.port}", **curve_settings(keys))
    directory, _ = keys
    def stranger():
        return NotifierClient(relay.endpoint, webhook=discord.webhook_url(1), linger_ms=0,
                              allowed_hosts=(("127.0.0.1", discord.port),))
    # One at a time. Without keys, either side may notice first: a mechanism mismatch
    # or a hang-up.
    attempts = [(lambda: producer(relay, keys, "c", discord), "the key is not allowed"),
                (stranger, "refused a connection"),
                (lambda: producer(relay, keys, "a", discord, server="b"), "wrong server key")]
    for connect, logged in attempts:
        seen = relay.log().count(logged)
        with connect() as client:
            client.notify("must not arrive")  # queued, or dropped if refused already
            wait_until(lambda: relay.log().count(logged) > seen, 10, what=logged)
    with producer(relay, keys, "a", discord) as a:
        a.notify("allowed")
        snapshot = relay.wait_metrics(lambda m: m["delivered"] == 1)
    assert (snapshot["received"], snapshot["rejected"]) == (1, 0)
    assert contents(discord, "1") == ["allowed"]
    assert "refused a connection: CURVE handshake failed" in relay.log()
    assert relay.stop() == 0


def test_without_an_authenticator_no_client_gets_in(keys):
    """The socket options alone fail closed: a CURVE server socket whose ZAP handler is
    not running admits nobody, not even a client with the right server key."""
    directory, _ = keys
    context = zmq.Context()
    try:
        pull = context.socket(zmq.PULL)
        curve.set_server(pull, *curve.load_secret(directory / "relay.key_secret"))
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push = context.socket(zmq.PUSH)
        curve.set_client(push, curve.load_public(directory / "relay.key"),
                         *curve.load_secret(directory / "a.key_secret"))
        monitor = push.get_monitor_socket(curve.HANDSHAKE_FAILURES)
        push.connect(f"tcp://127.0.0.1:{port}")
        push.send(b"must not arrive")
        assert monitor.poll(10_000), "the handshake neither failed nor succeeded"
        assert pull.poll(0) == 0
        push.disable_monitor()
        monitor.close()
    finally:
        context.destroy(linger=0)


def test_revoking_a_key_and_sighup_stops_that_producer(discord, keys, relays):
    relay = relays(allowed=f"127.0.0.1:{discord.port}", **curve_settings(keys))
    directory, clients = keys
    with producer(relay, keys, "a", discord) as a, producer(relay, keys, "b", discord) as b:
        a.notify("a1")
        b.notify("b1")
        relay.wait_metrics(lambda m: m["delivered"] == 2)
        (clients / "b.key").unlink()
        (clients / "c.key").write_bytes((directory / "c.key").read_bytes())
        relay.process.send_signal(signal.SIGHUP)
        wait_until(lambda: "added=c removed=b" in relay.log(), 10, what="the reload")
        b.notify("b2 after revocation")  # b's connection was admitted before
        a.notify("a2")
        with producer(relay, keys, "c", discord) as c:
            c.notify("c1")
            snapshot = relay.wait_metrics(lambda m: m["delivered"] == 4)
    assert sorted(contents(discord, "1")) == ["a1", "a2", "b1", "c1"]
    counts = {p["name"]: (p["received"], p["rejected"]) for p in snapshot["producers"]}
    assert counts == {"a": (2, 0), "b": (2, 1), "c": (1, 0)}
    assert "rejected producer=b reason=the producer's key is no longer allowed" in relay.log()
    assert relay.process.poll() is None
    assert relay.stop() == 0


def test_sighup_reopens_the_log_and_never_stops_the_relay(tmp_path, discord, relays, pushers):
    relay = relays(allowed=f"127.0.0.1:{discord.port}")
    wait_until(lambda: "relay started" in relay.log(), 10, what="the first line")
    rotated = relay.log_file.with_name("relay.log.1")
    relay.log_file.rename(rotated)  # logrotate, then its postrotate: kill -HUP
    relay.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "SIGHUP: log reopened" in relay.log(), 10, what="a line in the new file")
    pushers(relay.endpoint).send(envelope_text(discord.webhook_url(1), "after"))
    relay.wait_metrics(lambda m: m["delivered"] == 1)
    assert "relay started" in rotated.read_text() and "SIGHUP" not in rotated.read_text()
    assert relay.process.poll() is None
    assert relay.stop() == 0


def test_per_producer_counters_add_up_to_the_totals(keys, relays):
    """Discord is down and the queue holds 5: drops; malformed and oversized envelopes:
    rejections, each line naming its producer."""
    down = free_port()
    webhook = f"http://127.0.0.1:{down}/api/webhooks/1/tok"
    relay = relays(allowed=f"127.0.0.1:{down}", queue_max="5", **curve_settings(keys))
    directory, _ = keys
    clients = {name: NotifierClient(relay.endpoint, server_key=directory / "relay.key",
                                    client_key=directory / f"{name}.key_secret")
               for name in ("a", "b")}
    try:
        for name, bad in (("a", 3), ("b", 1)):  # first, so that none of them is dropped
            for _ in range(bad):
                clients[name].send_envelope(b'((type . "NOTIFIER")')
            clients[name].send_envelope(b"(" + b" " * 70_000 + b")")
        relay.wait_metrics(lambda m: m["rejected"] == 6 and m["unparsed"] == 0)
        for i in range(20):
            for name, client in clients.items():
                client.send_envelope(envelope_text(webhook, f"{name}{i}"))
        snapshot = relay.wait_metrics(lambda m: m["received"] == 46 and m["unparsed"] == 0)
    finally:
        for client in clients.values():
            client.close()
    sent = {"a": 24, "b": 22}
    producers = {p["name"]: p for p in snapshot["producers"]}
    assert {name: p["received"] for name, p in producers.items()} == sent
    assert {name: p["rejected"] for name, p in producers.items()} == {"a": 4, "b": 2}
    for key in ("received", "rejected", "drops"):
        assert sum(p[key] for p in producers.values()) == snapshot[key], key
    assert snapshot["drops"] > 0
    log = relay.log()
    assert "rejected producer=a reason=" in log and "rejected producer=b reason=" in log
    assert relay.stop() == 0


def test_loose_permissions_are_refused(tmp_path, keys):
    directory, clients = keys
    secret = directory / "relay.key_secret"
    secret.chmod(0o640)
    with pytest.raises(CurveError, match=r"mode 0640: .*chmod 600"):
        curve.load_secret(secret)
    with pytest.raises(CurveError, match="mode 0640"):
        NotifierClient("tcp://127.0.0.1:1", server_key=directory / "a.key",
                       client_key=secret)
    secret.chmod(0o600)
    clients.chmod(0o775)
    with pytest.raises(CurveError, match=r"clients directory .* mode 0775"):
        curve.load_clients(clients)
    clients.chmod(0o755)
    (clients / "a.key").chmod(0o666)
    with pytest.raises(CurveError, match=r"client certificate .*a.key has mode 0666"):
        curve.load_clients(clients)
    (clients / "a.key").chmod(0o644)
    assert sorted(curve.load_clients(clients)[0].values()) == ["a", "b"]


def test_the_relay_refuses_to_start_with_a_loose_key(tmp_path, keys):
    directory, _ = keys
    (directory / "relay.key_secret").chmod(0o644)
    relay = RelayProcess(tmp_path, "", **curve_settings(keys))
    code = subprocess.run(relay.command, env=relay.env, timeout=60).returncode
    assert code == 2  # a loose key stays loose: systemd must not restart it
    assert "cannot start: CURVE: secret certificate" in relay.log()
    assert "chmod 600" in relay.log()


@pytest.mark.parametrize("address, curve_on, insecure, refused", [
    ("127.0.0.1", False, False, False), ("::1", False, False, False),
    ("[::1]", False, False, False), ("127.0.0.2", False, False, False),
    ("127.1", False, False, False), ("0x7f.1", False, False, False),
    ("2130706433", False, False, False), ("::ffff:127.0.0.1", False, False, False),
    ("localhost", False, False, False), ("0", False, False, True),
    ("0.0.0.0", False, False, True), ("*", False, False, True), ("::", False, False, True),
    ("128.0.0.1", False, False, True), ("lo", False, False, True),
    ("192.168.1.10", False, False, True), ("eth0", False, False, True),
    ("0.0.0.0", True, False, False), ("0.0.0.0", False, True, False),
])
def test_the_bind_decision(address, curve_on, insecure, refused):
    refusal = curve.bind_refusal(address, curve_on, insecure)
    assert (refusal is not None) == refused
    if refused:
        assert "SWIMMY_NOTIFIER_CURVE_SECRET_KEY" in refusal
        assert "SWIMMY_NOTIFIER_INSECURE_BIND=1" in refusal


def test_binding_every_address_without_curve_exits_with_the_explanation(tmp_path):
    """Refused before the bind: nothing listens even for a moment."""
    relay = RelayProcess(tmp_path, "", bind_addr="0.0.0.0")
    code = subprocess.run(relay.command, env=relay.env, timeout=60).returncode
    assert code == 2
    assert "refusing to bind 0.0.0.0 without CURVE" in relay.log()


def _can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "-n", "true"], timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.skipif(not _can_unshare(), reason="needs unshare -n (root) for a private network")
def test_an_insecure_bind_is_warned_and_shown_by_status(tmp_path):
    """Inside a network namespace of its own, binding 0.0.0.0 reaches no real network."""
    relay = RelayProcess(tmp_path, "", bind_addr="0.0.0.0", insecure_bind="1")
    relay.command = ["unshare", "-n", *relay.command]
    try:
        relay.start()
        snapshot = relay.wait_metrics(lambda m: True)
        assert snapshot["insecure_bind"] is True and snapshot["curve"] is None
        warning = "WARNING notifier.relay INSECURE: listening on 0.0.0.0 without CURVE"
        wait_until(lambda: warning in relay.log(), 10, what="the warning")
        report = status.judge(snapshot, now=snapshot["timestamp"])
        assert report.level == status.WARNING
        assert any("without CURVE" in problem for problem in report.problems)
        assert relay.stop() == 0
    finally:
        relay.kill()


def test_keygen_writes_a_private_pair_once(tmp_path, capsys):
    assert main(["keygen", str(tmp_path / "k"), "guardian"]) == 0
    public, secret = tmp_path / "k" / "guardian.key", tmp_path / "k" / "guardian.key_secret"
    assert oct(secret.stat().st_mode & 0o777) == "0o600"
    assert oct(public.stat().st_mode & 0o777) == "0o644"
    out = capsys.readouterr().out
    assert f"SWIMMY_NOTIFIER_CURVE_CLIENT_KEY={secret}" in out
    assert curve.load_public(public).decode() in out
    assert curve.load_secret(secret)[0] == curve.load_public(public)
    assert main(["keygen", str(tmp_path / "k"), "guardian"]) == 2
    assert "exists already" in capsys.readouterr().err
    assert main(["keygen", str(tmp_path / "k"), "../escape"]) == 2


@pytest.mark.parametrize("planted", ["relay.key", "relay.key_secret", "both"])
def test_keygen_never_writes_through_a_symlink_even_a_dangling_one(tmp_path, planted):
    """Links planted into a world-writable directory: keygen exits 2, nothing is
    written there, the links stay as they were, and no half of a pair is left."""
    keys, shared = tmp_path / "keys", tmp_path / "shared"
    keys.mkdir()
    shared.mkdir(mode=0o777)
    shared.chmod(0o1777)
    names = ["relay.key", "relay.key_secret"] if planted == "both" else [planted]
    for name in names:
        (keys / name).symlink_to(shared / f"stolen-{name}")
    result = subprocess.run([sys.executable, "-m", "notifier", "keygen", str(keys), "relay"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{keys / names[0]} exists already" in result.stderr
    assert list(shared.iterdir()) == []
    assert sorted(path.name for path in keys.iterdir()) == sorted(names)
    assert all((keys / name).is_symlink() for name in names)


def test_a_link_planted_while_keygen_runs_is_not_followed_either(tmp_path, monkeypatch):
    """The check before writing can race with whoever plants the link; the hard link
    that puts each file in place cannot."""
    shared = tmp_path / "shared"
    shared.mkdir()
    real = os.path.lexists

    def checked_then_planted(path):
        result = real(path)
        if str(path).endswith(".key_secret"):
            path.parent.mkdir(exist_ok=True)
            os.symlink(shared / "stolen", path)
        return result
    monkeypatch.setattr(os.path, "lexists", checked_then_planted)
    with pytest.raises(CurveError, match="relay.key_secret exists already"):
        curve.keygen(tmp_path / "keys", "relay")
    assert list(shared.iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["relay.key_secret"]


def test_keygen_owner_gives_the_pair_to_the_service_user(tmp_path, capsys):
    if os.geteuid() != 0:
        pytest.skip("only root can give files to another user")
    import pwd
    nobody = pwd.getpwnam("nobody")
    assert main(["keygen", "--owner", "nobody", str(tmp_path / "k"), "relay"]) == 0
    secret = tmp_path / "k" / "relay.key_secret"
    status = secret.stat()
    assert (status.st_uid, status.st_gid, status.st_mode & 0o777) == (
        nobody.pw_uid, nobody.pw_gid, 0o600)
    assert "owned by nobody" in capsys.readouterr().out


def test_keygen_owner_of_an_unknown_user_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["keygen", "--owner", "no-such-user-here", str(tmp_path / "k"), "x"])
    assert exit.value.code == 2 and "no such user" in capsys.readouterr().err
    assert not (tmp_path / "k").exists()


def test_send_with_and_without_an_allowed_key(tmp_path, discord, keys, relays):
    relay = relays(allowed=f"127.0.0.1:{discord.port}", **curve_settings(keys))
    directory, _ = keys

    def send(client_key):
        env = {**os.environ, "SWIMMY_DISCORD_WEBHOOK": discord.webhook_url(1),
               "SWIMMY_NOTIFIER_ALLOWED_HOSTS": f"127.0.0.1:{discord.port}",
               "SWIMMY_NOTIFIER_CURVE_SERVER_KEY": str(directory / "relay.key"),
               "SWIMMY_NOTIFIER_CURVE_CLIENT_KEY": str(directory / client_key)}
        return subprocess.run([sys.executable, "-m", "notifier", "send", "--endpoint",
                               relay.endpoint, f"with {client_key}"], env=env, timeout=60,
                              capture_output=True, text=True)
    allowed, refused = send("a.key_secret"), send("c.key_secret")
    assert allowed.returncode == 0, allowed.stderr
    assert refused.returncode == 1
    assert "refused the connection: the key is not allowed" in refused.stderr
    relay.wait_metrics(lambda m: m["delivered"] == 1)
    assert contents(discord, "1") == ["with a.key_secret"]
    assert relay.stop() == 0


# ---------------------------------------------------------------------- names from outside

FORGED = "x\n2026-01-01T00:00:00.000Z INFO notifier.relay forged line"


def plant_odd_names(keys) -> None:
    """c's certificate as ``caf\\xe9.key`` (not UTF-8) and under a name holding a newline
    that would forge a log line."""
    directory, clients = keys
    certificate = (directory / "c.key").read_bytes()
    for name in (b"caf\xe9.key", os.fsencode(FORGED + ".key")):
        with open(os.fsencode(clients) + b"/" + name, "wb") as handle:
            handle.write(certificate)


def test_odd_certificate_names_are_refused_at_load_and_said_escaped(keys):
    _, clients = keys
    plant_odd_names(keys)
    names, refused = curve.load_clients(clients)
    assert sorted(names.values()) == ["a", "b"]
    assert len(refused) == 2 and all("\n" not in text for text in refused)
    assert "'caf\\xe9.key'" in refused[0] and "is not valid UTF-8" in refused[0]
    assert "'x\\n2026-01-01T00:00:00.000Z" in refused[1] and "control character" in refused[1]


def test_odd_certificate_names_neither_kill_the_relay_nor_forge_a_line(discord, keys, relays):
    """A producer whose key sits under a name that is not UTF-8 used to kill the metrics
    thread (UnicodeEncodeError) at its first envelope: now its name is refused at load,
    so its handshake fails, and the relay runs on."""
    plant_odd_names(keys)
    relay = relays(allowed=f"127.0.0.1:{discord.port}", **curve_settings(keys))
    with producer(relay, keys, "c", discord) as c:
        c.notify("must not arrive")
        wait_until(lambda: "the key is not allowed" in relay.log(), 10, what="c refused")
    with producer(relay, keys, "a", discord) as a:
        a.notify("allowed")
        snapshot = relay.wait_metrics(lambda m: m["delivered"] == 1)
    relay.process.send_signal(signal.SIGHUP)  # reloaded: refused again, never a crash
    wait_until(lambda: "SIGHUP: log reopened; CURVE clients reloaded" in relay.log(), 10,
               what="the reload")
    relay.wait_metrics(lambda m: m["timestamp"] > snapshot["timestamp"], what="metrics on")
    assert [p["name"] for p in snapshot["producers"]] == ["a"]
    log = relay.log()
    assert log.count("client certificate 'caf\\xe9.key' in") == 2  # at start and SIGHUP
    assert "forged line" in log and not any(line.startswith("2026-01-01T00:00:00.000Z")
                                            for line in log.splitlines())
    assert relay.stop() == 0
