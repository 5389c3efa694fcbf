"""The Rust producer kit built by cargo, offline, from Debian's crates (librust-zmq-dev,
librust-serde-json-dev), against real ZeroMQ on loopback, the relay as a real process and
the Discord stand-in. The crate's own unit tests run with `cargo test --offline`; the
scenarios with the relay go through a small driver (tests/kit_drivers/rust). Skips, saying
why, where cargo or the Debian crates are missing. Built once per session."""

import json
import re

import pytest

from notifier import curve
from notifier.standin import DiscordStandIn
from tests import kits
from tests.harness import contents
from tests.test_client import receive, unused_endpoint

HOOK = "https://discord.com/api/webhooks/1/made-up-token"


@pytest.fixture(scope="session")
def rust_kit(tmp_path_factory):
    return kits.built(kits.build_rust, tmp_path_factory.mktemp("rust-kit"))


@pytest.fixture
def rust(rust_kit):
    with rust_kit.start() as producer:
        yield producer


@pytest.fixture
def discord():
    with DiscordStandIn() as standin:
        yield standin


def tricky(i: int) -> str:
    return (f'#{i} "quoted" \\back\\slash (paren . dot) {"é中🐟" * (i % 4)}\n'
            f"line two\ttab {'x' * (i * 7)}")


def test_the_crates_own_tests_pass_under_cargo_test_offline(rust_kit):
    done = rust_kit.cargo_run("test", "--offline", "--quiet", cwd=rust_kit.crate)
    assert done.returncode == 0, done.stdout + done.stderr
    passed = re.search(r"test result: ok\. (\d+) passed; 0 failed", done.stdout)
    assert passed and int(passed[1]) >= 9, done.stdout  # the unit tests ran, and passed


def test_a_hundred_notifications_from_rust_arrive_with_their_payloads_unchanged(
        rust, discord, relays):
    relay = relays(allowed=f"127.0.0.1:{discord.port}")
    assert rust.call(op="new", endpoint=relay.endpoint) == {"endpoint": relay.endpoint}
    payloads = [{"username": f"guardian-{i}", "content": tricky(i),
                 "embeds": [{"title": "💀 BRAIN DEAD DETECTED 💀", "color": 16711680}]}
                for i in range(100)]
    assert rust.call(op="send", webhook=discord.webhook_url(1), payloads=payloads) == {
        "queued": 100, "dropped": 0, "failed": 0, "drops": 0, "errors": 0}
    snapshot = relay.wait_metrics(lambda m: m["delivered"] == 100, what="100 delivered")
    assert (snapshot["received"], snapshot["rejected"], snapshot["drops"]) == (100, 0, 0)
    assert discord.messages("1") == payloads
    assert relay.stop() == 0


def test_with_the_relay_down_sends_return_at_once_and_the_queue_arrives_when_it_is_up(
        rust, discord, relays):
    endpoint = unused_endpoint()
    hook = discord.webhook_url(1)
    assert rust.call(op="new", endpoint=endpoint) == {"endpoint": endpoint}
    payloads = [{"content": f"n{i}"} for i in range(10_000)]
    # None blocks: a blocking send would never answer, and the call would time out.
    assert rust.call(op="send", webhook=hook, payloads=payloads, timeout=120) == {
        "queued": 1000, "dropped": 9000, "failed": 0, "drops": 9000, "errors": 0}

    relay = relays(allowed=f"127.0.0.1:{discord.port}", port=int(endpoint.rsplit(":", 1)[1]),
                   queue_max="2000")
    snapshot = relay.wait_metrics(lambda m: m["delivered"] == 1000, timeout=60,
                                  what="the 1000 queued delivered")
    assert (snapshot["received"], snapshot["drops"]) == (1000, 0)
    assert contents(discord, "1") == [f"n{i}" for i in range(1000)]
    assert rust.call(op="send", webhook=hook, payloads=[{"content": "again"}]) == {
        "queued": 1, "dropped": 0, "failed": 0, "drops": 9000, "errors": 0}
    log = rust.stderr()
    assert "dropping them" in log and "again (9000 dropped in all)" in log


def test_an_endpoint_zeromq_refuses_is_an_error_and_from_env_reads_the_lisp_variables(
        rust_kit, discord, relays):
    relay = relays(allowed=f"127.0.0.1:{discord.port}")
    with rust_kit.start(SWIMMY_ZMQ_HOST="127.0.0.1", SWIMMY_PORT_NOTIFIER=str(relay.port)) as rust:
        assert rust.call(op="new", endpoint="bogus://x") == {"error": "Protocol not supported"}
        assert rust.call(op="from_env") == {"endpoint": relay.endpoint}
        assert rust.call(op="send", webhook=discord.webhook_url(1),
                         payloads=[{"content": "from the environment"}])["queued"] == 1
        relay.wait_metrics(lambda m: m["delivered"] == 1, what="delivered")
    assert contents(discord, "1") == ["from the environment"]
    with rust_kit.start(SWIMMY_ZMQ_HOST="", SWIMMY_PORT_NOTIFIER="") as rust:
        assert rust.call(op="from_env") == {"endpoint": "tcp://127.0.0.1:5562"}


def test_two_threads_sending_at_once_lose_and_garble_nothing(rust):
    lists = [[{"content": f"thread {t} #{i} {tricky(i % 5)}"} for i in range(500)]
             for t in range(2)]
    with kits.pull_socket() as (pull, endpoint):
        rust.call(op="new", endpoint=endpoint)
        assert rust.call(op="threads", webhook=HOOK, payloads=lists)["queued"] == 1000
        received = receive(pull, 1000)
    envelopes = [json.loads(data) for data in received]
    assert all(list(e) == ["type", "schema_version", "action", "webhook", "payload"]
               for e in envelopes)
    assert sorted(json.dumps(e["payload"]) for e in envelopes) == sorted(
        json.dumps(payload) for payloads in lists for payload in payloads)
    assert {(e["type"], e["schema_version"], e["action"], e["webhook"]) for e in envelopes} == {
        ("NOTIFIER", 1, "SEND", HOOK)}


def test_with_curve_certificates_the_kit_reaches_a_curve_relay_and_is_named(
        rust, discord, relays, tmp_path):
    keys, clients = tmp_path / "keys", tmp_path / "clients"
    for name in ("relay", "guardian"):
        curve.keygen(keys, name)
    clients.mkdir()
    (clients / "guardian.key").write_bytes((keys / "guardian.key").read_bytes())
    relay = relays(allowed=f"127.0.0.1:{discord.port}",
                   curve_secret_key=str(keys / "relay.key_secret"), curve_clients=str(clients))
    assert rust.call(op="new_curve", endpoint=relay.endpoint,
                     server_certificate=str(keys / "relay.key"),
                     secret_certificate=str(keys / "guardian.key_secret")) == {
        "endpoint": relay.endpoint}
    assert rust.call(op="send", webhook=discord.webhook_url(1),
                     payloads=[{"content": "over CURVE"}])["queued"] == 1
    snapshot = relay.wait_metrics(lambda m: m["delivered"] == 1, what="delivered over CURVE")
    assert [producer["name"] for producer in snapshot["producers"]] == ["guardian"]
    assert contents(discord, "1") == ["over CURVE"]
