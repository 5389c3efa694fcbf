"""The PULL socket's door (issue 18, item 1): frames over the cap cost the connection
that sent them, never memory, and the monitor tells those disconnects from a producer
closing its socket. Real ZeroMQ on loopback; conditions waited for with deadlines."""

import socket

import pytest
import zmq

from notifier import door
from tests.harness import wait_until


@pytest.fixture
def pull():
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    door.configure(pull)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    gate = door.Door(pull, name_at=lambda address: "guardian" if address == "127.0.0.2" else None)
    yield pull, gate, f"tcp://127.0.0.1:{port}", context
    gate.close()
    context.destroy(linger=0)


def push(context, endpoint, *frames, source=None):
    sender = context.socket(zmq.PUSH)
    sender.setsockopt(zmq.LINGER, 2000)
    sender.connect(endpoint if source is None else endpoint.replace("tcp://", f"tcp://{source}:0;"))
    for frame in frames:
        sender.send(frame)
    return sender


def watch(pull, gate, until, timeout=20.0):
    """Receive and read the monitor until `until(received, found)`."""
    received, found = [], []
    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)
    poller.register(gate.socket, zmq.POLLIN)

    def step():  # as the relay's receiver: woken by either socket
        events = dict(poller.poll(50))
        if gate.socket in events:
            found.extend(gate.read())
        while pull.poll(0):
            received.append(pull.recv())
        return until(received, found)
    wait_until(step, timeout, interval=0, what="the door's events")
    return received, found


def test_a_frame_over_the_cap_costs_its_connection_and_is_counted(pull):
    pull, gate, endpoint, context = pull
    first = push(context, endpoint, b"before")
    watch(pull, gate, lambda received, _: received == [b"before"])
    first.send(b"x" * (door.MAX_FRAME_BYTES + 1))
    first.send(b"queued behind it")
    watch(pull, gate, lambda _, found: door.Oversized("127.0.0.1") in found)
    assert gate.oversized == {"127.0.0.1": 1}
    first.close()
    other = push(context, endpoint, b"y" * door.MAX_FRAME_BYTES, b"after")
    received, found = watch(pull, gate, lambda received, _: b"after" in received)
    assert received[0] == b"y" * door.MAX_FRAME_BYTES  # the cap itself still arrives
    other.close()
    watch(pull, gate, lambda *_: not gate._kept)
    assert gate.oversized == {"127.0.0.1": 1}  # closing a socket is not counted


def test_a_producer_closing_or_dying_is_no_oversized_disconnect(pull):
    pull, gate, endpoint, context = pull
    for _ in range(3):
        sender = push(context, endpoint, b"hello")
        watch(pull, gate, lambda received, _: received == [b"hello"])
        sender.close()
        watch(pull, gate, lambda *_: not gate._kept)
    host, port = endpoint[len("tcp://"):].rsplit(":", 1)
    raw = socket.create_connection((host, int(port)))
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")  # reset
    wait_until(lambda: gate.read() or gate._kept, 20, what="the connection seen")
    raw.close()
    watch(pull, gate, lambda *_: not gate._kept)
    assert gate.oversized == {}


def test_a_client_that_is_not_zeromq_is_not_counted(pull):
    pull, gate, endpoint, context = pull
    host, port = endpoint[len("tcp://"):].rsplit(":", 1)
    raw = socket.create_connection((host, int(port)))
    raw.sendall(b"GET / HTTP/1.0\r\n\r\n" * 100)
    wait_until(lambda: gate.read() or gate._kept, 20, what="the connection seen")
    raw.close()
    watch(pull, gate, lambda *_: not gate._kept)
    assert gate.oversized == {}


def test_the_producer_is_named_where_it_can_be_told(pull):
    """(A frame sent the moment the connection opens may beat the receiver to the
    monitor's event: the count is a floor. Here the producer has sent before.)"""
    pull, gate, endpoint, context = pull
    sender = push(context, endpoint, b"hi", source="127.0.0.2")
    watch(pull, gate, lambda received, _: received == [b"hi"])
    sender.send(b"z" * (door.MAX_FRAME_BYTES + 1))
    watch(pull, gate, lambda _, found: door.Oversized("guardian") in found)
    sender.close()
