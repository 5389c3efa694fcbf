"""The hand-off between the receiver and the intake thread: in order, joined, bounded, and
closed without losing what was handed over."""

import threading

from notifier.intake import Intake
from tests.harness import wait_until


def test_batches_come_out_joined_and_in_order():
    intake = Intake()
    assert intake.take(0) == ([], None)
    intake.put([b"a", b"b"])
    intake.put([b"c"])
    assert intake.busy
    assert intake.take(0) == ([b"a", b"b", b"c"], None)
    assert not intake.busy
    intake.put([b"full"], more=True)
    intake.take(0)
    assert intake.busy  # the receiver said the socket had more
    intake.put([b"d"], ["guardian"])
    intake.put([b"e"], ["lisp"])
    assert intake.take(None) == ([b"d", b"e"], ["guardian", "lisp"])


def test_a_full_intake_holds_the_receiver_back_until_taken():
    intake = Intake(most=2)
    intake.put([b"1"])
    intake.put([b"2"])
    third = threading.Thread(target=intake.put, args=([b"3"],))
    third.start()
    third.join(0.05)
    assert third.is_alive()  # waiting for room, not dropping
    assert intake.take(0)[0] == [b"1", b"2"]
    third.join(10)
    assert intake.take(0)[0] == [b"3"]


def test_closing_lets_what_was_handed_over_out_then_refuses():
    intake = Intake()
    intake.put([b"kept"])
    intake.close()
    assert intake.put([b"late"]) is False  # the caller holds it itself
    assert intake.take(None) == ([b"kept"], None)
    assert intake.take(None) is None


def test_a_waiting_take_wakes_for_a_batch_or_the_close():
    intake = Intake()
    taken = []
    reader = threading.Thread(target=lambda: taken.append(intake.take(None)))
    reader.start()
    intake.put([b"x"])
    reader.join(10)
    assert taken == [([b"x"], None)]
    reader = threading.Thread(target=lambda: taken.append(intake.take(None)))
    reader.start()
    intake.close()
    wait_until(lambda: len(taken) == 2, 10, what="the close")
    assert taken[1] is None


def test_after_a_full_batch_the_receiver_says_when_the_socket_is_empty(tmp_path):
    """The intake thread parses only once the socket is empty, and waits for the receiver
    to say so after a full batch. A flood that ended on exactly a full batch left the
    receiver blocked on the socket and the intake waiting: nothing parsed, nothing sent,
    until the next envelope came."""
    import zmq

    from notifier import config
    from notifier.admission import Admission
    from notifier.outbox import Outbox
    from notifier.receiver import RECEIVE_BATCH, Receiver

    context = zmq.Context()
    pull, push = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    pull.bind("inproc://relay")
    push.connect("inproc://relay")
    for i in range(RECEIVE_BATCH):  # in the socket at once (inproc)
        push.send(b"envelope %d" % i)
    outbox = Outbox(10_000, 0.0)
    intake = Intake()
    receiver = Receiver(context, pull, None, Admission(outbox, config.load({})), intake)
    try:
        assert receiver.loop()
        assert intake.more  # a full batch: the socket may hold more
        turn = threading.Thread(target=receiver.loop)
        turn.start()
        turn.join(10)
        assert not turn.is_alive(), "the receiver blocked without saying the socket is empty"
        assert not intake.more  # said: the intake parses now
        assert intake.take(0)[0] == [b"envelope %d" % i for i in range(RECEIVE_BATCH)]
    finally:
        receiver.wake()
        turn.join(10)
        receiver.close()
        push.close(linger=0)
        context.term()
