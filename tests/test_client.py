"""The producer client and ``send`` command, against real ZeroMQ sockets on loopback.

Every wait is a poll with a deadline; nothing sleeps for a fixed time.
"""

import argparse
import io
import logging
import os
import random
import socket
import threading
import time

import pytest
import zmq
from hypothesis import given, settings, strategies as st

from notifier import envelope
from notifier.client import NotifierClient, add_send_parser, build_envelope

TOKEN = "made-up_TOKEN-for-tests"
HOOK = f"https://discord.com/api/webhooks/1/{TOKEN}"
REDACTED = "https://discord.com/api/webhooks/1/<token>"
LOCAL_HOOK = f"http://127.0.0.1:8099/api/webhooks/7/{TOKEN}"
LOCAL_HOSTS = (("127.0.0.1", 8099),)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """The command reads the environment: start every test without SWIMMY_ settings."""
    for name in list(os.environ):
        if name.startswith("SWIMMY_"):
            monkeypatch.delenv(name)


@pytest.fixture
def context():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def bind_relay(context, endpoint=None):
    """A PULL socket standing in for the relay: (socket, endpoint)."""
    pull = context.socket(zmq.PULL)
    pull.linger = 0
    if endpoint is None:
        endpoint = f"tcp://127.0.0.1:{pull.bind_to_random_port('tcp://127.0.0.1')}"
    else:
        pull.bind(endpoint)
    return pull, endpoint


@pytest.fixture
def relay(context):
    return bind_relay(context)


def unused_endpoint():
    """A loopback endpoint nothing listens on, below Linux's ephemeral port range
    (32768 and up), so the client's own connection attempts can never be given it as
    their local port. Probed with a plain socket, whose close is synchronous."""
    for port in random.sample(range(20000, 30000), 200):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return f"tcp://127.0.0.1:{port}"
    raise RuntimeError("no free port from 20000 to 30000")


def receive(pull, count, timeout=10.0):
    """The next `count` messages, waiting at most `timeout` seconds in all."""
    deadline = time.monotonic() + timeout
    messages = []
    while len(messages) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not pull.poll(max(1, int(remaining * 1000))):
            break
        messages.append(pull.recv(zmq.NOBLOCK))
    assert len(messages) == count, f"{len(messages)} of {count} arrived within {timeout} s"
    return messages


def contents(messages):
    return [envelope.parse(data).payload["content"] for data in messages]


# ------------------------------------------------------------------------------ client

def test_messages_arrive_in_order_as_canonical_envelopes(context, relay):
    pull, endpoint = relay
    client = NotifierClient(endpoint, webhook=HOOK, context=context)
    payloads = [{"content": f"n{i}", "embeds": [{"title": "Swimmy", "color": i}]}
                for i in range(200)]
    assert all(client.send(payload) for payload in payloads)
    assert client.stats() == {"sent": 200, "dropped": 0, "errors": 0}
    messages = receive(pull, 200)
    assert [envelope.parse(data) for data in messages] == [
        envelope.Message(HOOK, payload) for payload in payloads]
    assert messages[0].startswith(b'((type . "NOTIFIER") (schema_version . 1) '
                                  b'(action . "SEND") (webhook . "')


def test_the_envelope_is_what_the_lisp_producer_prints():
    data = build_envelope("https://discord.com/api/webhooks/1/tok", {"content": 'say "hi"\ncafé'})
    assert data == (r'((type . "NOTIFIER") (schema_version . 1) (action . "SEND") '
                    r'(webhook . "https://discord.com/api/webhooks/1/tok") '
                    r'(payload_json . "{\"content\":\"say \\\"hi\\\"\\ncafé\"}"))').encode()


@settings(max_examples=150, deadline=None)
@given(st.text(min_size=1, max_size=200).filter(str.strip), st.text(max_size=50))
def test_any_text_survives_the_envelope(content, title):
    payload = {"content": content, "embeds": [{"title": title}]}
    assert envelope.parse(build_envelope(HOOK, payload)) == envelope.Message(HOOK, payload)


def test_notify_builds_content_and_one_embed(context, relay):
    pull, endpoint = relay
    with NotifierClient(endpoint, webhook=HOOK, context=context) as client:
        assert client.notify("plain")
        assert client.notify(title="Deploy", description="done", color=0x3498DB)
        with pytest.raises(ValueError, match="color needs a title or a description"):
            client.notify("text", color=1)
    assert [envelope.parse(data).payload for data in receive(pull, 2)] == [
        {"content": "plain"},
        {"embeds": [{"title": "Deploy", "description": "done", "color": 0x3498DB}]}]


def test_a_per_call_webhook_overrides_the_default(context, relay):
    pull, endpoint = relay
    other = "https://discord.com/api/webhooks/2/another-made-up-token"
    client = NotifierClient(endpoint, webhook=HOOK, context=context)
    assert client.send({"content": "a"}, webhook=other)
    assert envelope.parse(receive(pull, 1)[0]).webhook == other


def test_without_a_relay_sends_return_at_once_queue_up_to_the_hwm_then_drop(context, caplog):
    endpoint = unused_endpoint()
    client = NotifierClient(endpoint, webhook=HOOK, context=context, sndhwm=10)
    with caplog.at_level(logging.INFO, logger="notifier.client"):
        outcomes = [client.send({"content": f"n{i}"}) for i in range(25)]  # a block hangs
        assert outcomes == [True] * 10 + [False] * 15
        assert client.stats() == {"sent": 10, "dropped": 15, "errors": 0}

        # The relay comes (back) up: what was queued arrives, and sending works again.
        pull, _ = bind_relay(context, endpoint)
        assert contents(receive(pull, 10)) == [f"n{i}" for i in range(10)]
        # ZeroMQ tells the sender that its queue emptied a moment after the receiver read it.
        assert client._socket.poll(10_000, zmq.POLLOUT)
        assert client.send({"content": "after"})
        assert contents(receive(pull, 1)) == ["after"]
    notes = [record.getMessage() for record in caplog.records]
    assert notes == [
        f"the relay at {endpoint} is not taking notifications (high-water mark of 10 "
        "reached): dropping them",
        f"the relay at {endpoint} takes notifications again (15 dropped in all)"]


def test_a_waiting_send_waits_for_room_instead_of_dropping(context):
    """For operator commands: at the high-water mark it waits, bounded, and the envelope
    goes as soon as the relay takes what was queued."""
    endpoint = unused_endpoint()
    client = NotifierClient(endpoint, webhook=HOOK, context=context, sndhwm=2)
    data = [build_envelope(HOOK, {"content": f"n{i}"}) for i in range(4)]
    assert [client.send_envelope_waiting(item, 0.05) for item in data[:3]] == [True, True, False]
    assert client.stats() == {"sent": 2, "dropped": 1, "errors": 0}
    taken = threading.Event()

    def relay_comes_up():
        pull, _ = bind_relay(context, endpoint)
        assert contents(receive(pull, 3)) == ["n0", "n1", "n3"]
        taken.set()
    thread = threading.Thread(target=relay_comes_up)
    thread.start()
    assert client.send_envelope_waiting(data[3], 30.0)
    thread.join(30)
    assert taken.is_set() and client.stats() == {"sent": 3, "dropped": 1, "errors": 0}
    assert client._socket.getsockopt(zmq.SNDTIMEO) == -1  # plain sends stay non-blocking


def test_an_ipv6_endpoint_is_reached(context):
    pull = context.socket(zmq.PULL)
    pull.setsockopt(zmq.IPV6, 1)
    port = pull.bind_to_random_port("tcp://[::1]")
    with NotifierClient(f"tcp://[::1]:{port}", webhook=HOOK, context=context) as client:
        assert client.notify("over IPv6")
        assert contents(receive(pull, 1)) == ["over IPv6"]


def test_a_zmq_error_is_counted_and_the_next_send_reconnects(context, relay, caplog):
    pull, endpoint = relay
    client = NotifierClient(endpoint, webhook=HOOK, context=context)
    assert client.send({"content": "before"})
    assert contents(receive(pull, 1)) == ["before"]
    # No public way makes a live PUSH socket fail, so close it under the client: its
    # next send raises ENOTSOCK, the kind of error that leaves a socket unusable.
    client._socket.close(linger=0)
    assert client.send({"content": "lost"}) is False
    assert client.stats() == {"sent": 1, "dropped": 0, "errors": 1}
    assert "failed (Socket operation on non-socket); reconnecting" in caplog.text
    assert client.send({"content": "after"})
    assert contents(receive(pull, 1)) == ["after"]
    assert client.stats() == {"sent": 2, "dropped": 0, "errors": 1}


def test_a_destroyed_context_only_counts_errors(context):
    client = NotifierClient(unused_endpoint(), webhook=HOOK, context=context)
    context.destroy(linger=0)
    for _ in range(3):
        started = time.monotonic()
        assert client.send({"content": "x"}) is False
        assert time.monotonic() - started < 0.1
    assert client.stats() == {"sent": 0, "dropped": 0, "errors": 3}
    client.close()


@pytest.mark.parametrize("relay_up", [True, False], ids=["relay-up", "relay-down"])
def test_threads_share_one_client_and_every_send_is_counted_once(context, relay_up):
    threads, per_thread, hwm = 4, 250, 100
    if relay_up:
        pull, endpoint = bind_relay(context)
    else:
        endpoint = unused_endpoint()
    client = NotifierClient(endpoint, webhook=HOOK, context=context, sndhwm=hwm)
    start = threading.Barrier(threads)
    outcomes = [[] for _ in range(threads)]

    def produce(number):
        start.wait()
        for i in range(per_thread):
            outcomes[number].append(client.send({"content": f"{number}:{i}"}))

    workers = [threading.Thread(target=produce, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=30)
        assert not worker.is_alive()

    stats = client.stats()
    assert stats["sent"] + stats["dropped"] + stats["errors"] == threads * per_thread
    assert stats["errors"] == 0
    assert stats["sent"] == sum(map(sum, outcomes))
    if not relay_up:
        assert stats["sent"] == hwm
        pull, _ = bind_relay(context, endpoint)
    arrived = [tuple(map(int, text.split(":"))) for text in contents(receive(pull, stats["sent"]))]
    assert not pull.poll(100)  # nothing beyond what was counted as sent
    for number in range(threads):
        queued = [i for i, ok in enumerate(outcomes[number]) if ok]
        assert [i for n, i in arrived if n == number] == queued


@pytest.mark.parametrize("payload, error", [
    ({"content": float("nan")}, ValueError),
    ({"content": {1, 2}}, TypeError),
    ([{"content": "x"}], TypeError),
    ({}, ValueError),
    ({"embeds": []}, ValueError),
    ({"content": "x" * 70_000}, ValueError),
])
def test_a_bad_payload_raises_before_sending_and_is_not_counted(context, relay, payload, error):
    pull, endpoint = relay
    client = NotifierClient(endpoint, webhook=HOOK, context=context)
    with pytest.raises(error):
        client.send(payload)
    assert client.stats() == {"sent": 0, "dropped": 0, "errors": 0}
    assert client.send({"content": "good"})
    assert contents(receive(pull, 1)) == ["good"]  # the first thing that arrived


@pytest.mark.parametrize("webhook, reason", [
    (HOOK.replace("discord.com", "evil.example"), "webhook host 'evil.example' is not Discord's"),
    (HOOK.replace("https", "http"), "webhook must use https"),
    (f"https://discord.com/api/hooks/1/{TOKEN}", "webhook path must be"),
    (LOCAL_HOOK, "webhook host '127.0.0.1' is not Discord's"),
])
def test_a_bad_webhook_raises_value_error_without_the_token(context, relay, webhook, reason):
    pull, endpoint = relay
    with pytest.raises(ValueError, match=reason) as error:
        NotifierClient(endpoint, webhook=webhook, context=context)
    assert TOKEN not in str(error.value)
    client = NotifierClient(endpoint, webhook=HOOK, context=context)
    with pytest.raises(ValueError, match=reason) as error:
        client.send({"content": "x"}, webhook=webhook)
    assert TOKEN not in str(error.value)
    assert client.stats() == {"sent": 0, "dropped": 0, "errors": 0}


def test_allowed_hosts_admit_a_local_stand_in(context, relay):
    pull, endpoint = relay
    client = NotifierClient(endpoint, webhook=LOCAL_HOOK, allowed_hosts=LOCAL_HOSTS,
                            context=context)
    assert client.send({"content": "local"})
    assert envelope.parse(receive(pull, 1)[0], LOCAL_HOSTS).webhook == LOCAL_HOOK


def test_without_any_webhook_send_raises(context, relay):
    client = NotifierClient(relay[1], context=context)
    with pytest.raises(ValueError, match="no webhook"):
        client.send({"content": "x"})


def test_send_envelope_pushes_the_bytes_as_they_are(context, relay):
    pull, endpoint = relay
    client = NotifierClient(endpoint, context=context)
    assert client.send_envelope('{"webhook": "not checked", "data": {}}')
    assert client.send_envelope(b"(anything)")
    assert receive(pull, 2) == [b'{"webhook": "not checked", "data": {}}', b"(anything)"]
    with pytest.raises(TypeError):
        client.send_envelope(42)


def test_repr_shows_the_webhook_redacted(context):
    client = NotifierClient(unused_endpoint(), webhook=HOOK, context=context)
    assert repr(client) == (f"<NotifierClient {client.endpoint} webhook={REDACTED} "
                            "sent=0 dropped=0 errors=0>")


def test_close_delivers_what_is_queued_then_refuses_sends(relay):
    pull, endpoint = relay
    client = NotifierClient(endpoint, webhook=HOOK, linger_ms=10_000)  # its own context
    for i in range(50):
        assert client.send({"content": f"n{i}"})
    client.close()  # returns once all 50 have left, well before the linger runs out
    assert contents(receive(pull, 50)) == [f"n{i}" for i in range(50)]
    with pytest.raises(ValueError, match="closed"):
        client.send({"content": "late"})
    client.close()


def test_close_without_a_relay_waits_no_longer_than_the_linger():
    with NotifierClient(unused_endpoint(), webhook=HOOK, linger_ms=100) as client:
        assert client.send({"content": "never delivered"})
        started = time.monotonic()
    assert time.monotonic() - started < 5  # bounded: 0.1 s plus scheduling


def test_close_leaves_a_callers_context_open(context):
    NotifierClient(unused_endpoint(), context=context).close()
    context.socket(zmq.PUSH).close()  # still usable


@pytest.mark.parametrize("options", [{"sndhwm": 0}, {"linger_ms": -1}])
def test_unbounded_settings_are_refused(options):
    with pytest.raises(ValueError):
        NotifierClient(unused_endpoint(), **options)


def test_a_malformed_endpoint_raises_in_the_constructor():
    with pytest.raises(zmq.ZMQError):
        NotifierClient("tcp://127.0.0.1")


# ------------------------------------------------------------------------ command line

def run_send(capsys, *argv):
    """Run ``send`` as ``python -m notifier`` will: (exit code, stdout, stderr)."""
    parser = argparse.ArgumentParser(prog="python -m notifier")
    add_send_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["send", *argv])
    code = args.run(args)
    out, err = capsys.readouterr()
    assert TOKEN not in out + err
    return code, out, err


def test_send_command_sends_content_and_an_embed(capsys, relay):
    pull, endpoint = relay
    code, out, err = run_send(capsys, "--endpoint", endpoint, "--webhook", HOOK,
                              "--title", "Deploy", "--color", "#3498db", "--wait-sec", "10",
                              "all", "done")
    assert (code, out, err) == (0, f"sent to the relay at {endpoint} for {REDACTED}\n", "")
    assert envelope.parse(receive(pull, 1)[0]) == envelope.Message(
        HOOK, {"content": "all done", "embeds": [{"title": "Deploy", "color": 0x3498DB}]})


def test_send_command_takes_settings_and_webhook_from_the_environment(capsys, monkeypatch,
                                                                     relay):
    pull, endpoint = relay
    monkeypatch.setenv("SWIMMY_DISCORD_WEBHOOK", HOOK)
    monkeypatch.setenv("SWIMMY_NOTIFIER_BIND_ADDR", "*")  # a relay on every interface
    monkeypatch.setenv("SWIMMY_PORT_NOTIFIER", endpoint.rpartition(":")[2])
    code, out, _ = run_send(capsys, "--json", '{"content": "from json"}', "--wait-sec", "10")
    assert (code, out) == (0, f"sent to the relay at {endpoint} for {REDACTED}\n")
    assert envelope.parse(receive(pull, 1)[0]) == envelope.Message(HOOK, {"content": "from json"})


def test_send_command_sends_an_envelope_file_as_it_is(capsys, monkeypatch, tmp_path, relay):
    pull, endpoint = relay
    data = build_envelope(LOCAL_HOOK, {"content": "from a file"})
    path = tmp_path / "envelope.sexp"
    path.write_bytes(data)
    common = ("--endpoint", endpoint, "--allowed-hosts", "127.0.0.1:8099", "--wait-sec", "10")
    assert run_send(capsys, *common, "--file", str(path))[0] == 0
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data)))
    assert run_send(capsys, *common, "--file", "-")[0] == 0
    assert receive(pull, 2) == [data, data]


def test_send_command_without_a_relay_exits_1(capsys):
    endpoint = unused_endpoint()
    code, out, err = run_send(capsys, "--endpoint", endpoint, "--webhook", HOOK,
                              "--wait-sec", "0.2", "hello")
    assert (code, out) == (1, "")
    assert err == (f"notifier send: the relay at {endpoint} did not take the notification "
                   "within 0.2 s; it was discarded (is the relay running?)\n")


@pytest.mark.parametrize("argv, message", [
    (["hello"], "no webhook: pass --webhook or set SWIMMY_DISCORD_WEBHOOK"),
    (["--webhook", HOOK.replace("discord.com", "evil.example"), "hello"],
     "rejected: webhook host 'evil.example' is not Discord's"),
    (["--webhook", HOOK], "nothing to send"),
    (["--webhook", HOOK, "--color", "1", "hello"], "color needs a title"),
    (["--webhook", HOOK, "--json", "{not json"], "Expecting property name"),
    (["--webhook", HOOK, "--json", "[1]"], "payload must be a dict"),
    (["--webhook", HOOK, "--json", '{"content": NaN}'], "Out of range float"),
    (["--webhook", HOOK, "--json", '{"content": "x"}', "more"], "--json is the whole message"),
    (["--webhook", HOOK, "--file", "envelope.sexp"], "--file sends the envelope as it is"),
    (["--file", "/nonexistent/envelope.sexp"], "cannot read /nonexistent/envelope.sexp"),
    (["--file", os.devnull], "rejected: "),
    (["--port", "0", "--webhook", HOOK, "hello"], "--port: must be from 1 to 65535"),
    (["--endpoint", "tcp://127.0.0.1", "--webhook", HOOK, "hello"],
     "cannot connect to tcp://127.0.0.1"),
])
def test_send_command_usage_and_setting_errors_exit_2(capsys, argv, message):
    code, out, err = run_send(capsys, *argv)
    assert (code, out) == (2, "")
    assert err.startswith("notifier send: ") and message in err


@pytest.mark.parametrize("argv", [["--color", "blue"], ["--color", "0x1000000"],
                                  ["--wait-sec", "0"], ["--wait-sec", "nan"],
                                  ["--json", "{}", "--file", "-"]])
def test_send_command_refuses_bad_flags(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        run_send(capsys, "--webhook", HOOK, *argv, "hello")
    assert exit_.value.code == 2
