"""The log an operator tunes and parses: levels, JSON lines, a summary per interval."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys

import pytest

from notifier import logs, metrics
from notifier.standin import DiscordStandIn
from tests.harness import Clock, envelope_text

BEFORE = dict.fromkeys(("received", "delivered", "rejected", "deduplicated", "drops", "failed",
                        "retries", "rate_limited", "pending"), 0)


def test_the_summary_says_what_changed_and_nothing_when_nothing_did():
    after = {**BEFORE, "received": 1234, "delivered": 1230, "rejected": 2, "pending": 2}
    assert metrics.summary(BEFORE, after, 60.2) == (
        "last 60 s: received 1234, delivered 1230, rejected 2, deduplicated 0, dropped 0, "
        "failed 0, retries 0, rate-limited 0; pending 2")
    assert metrics.summary(after, dict(after), 60.0) is None
    assert metrics.summary({}, after, 1.0).startswith("last 1 s: received 1234,")


def test_json_lines_carry_the_text_lines_fields_token_scrubbed():
    record = logging.LogRecord("notifier.relay", logging.WARNING, __file__, 1,
                               "retry url=%s", ("https://discord.com/api/webhooks/1/secret-tok",),
                               None)
    line = json.loads(logs.JsonFormatter().format(record))
    assert set(line) == {"time", "level", "logger", "message"}
    assert (line["level"], line["logger"]) == ("WARNING", "notifier.relay")
    assert line["time"].endswith("Z") and "secret-tok" not in line["message"]
    text = logs.ScrubbingFormatter().format(record)
    assert text.startswith(line["time"]) and text.endswith(line["message"])


def test_the_relay_at_info_in_json_logs_events_and_a_summary_not_every_message(relays, pushers):
    with DiscordStandIn() as discord:
        relay = relays(allowed=f"127.0.0.1:{discord.port}", log_level="info", log_format="json",
                       dedupe_window_sec="60")
        pusher = pushers(relay.endpoint)
        for content in ("same", "same"):
            pusher.send(envelope_text(discord.webhook_url(1), content))
        pusher.send(b'((type . "NOTIFIER") (schema_version . 1) (action . "SEND") '
                    b'(webhook . "https://discord.com/api/webhooks/5/tok"))')
        relay.wait_metrics(lambda m: (m["delivered"], m["deduplicated"], m["rejected"]) == (1, 1, 1))
        assert relay.stop() == 0
    lines = [json.loads(line) for line in relay.log().splitlines()]
    messages = [line["message"] for line in lines]
    assert not any(m.startswith(("accepted", "delivered")) for m in messages), messages
    assert any(m.startswith("duplicate suppressed webhook=1 window_s=60") for m in messages)
    assert any(m.startswith("rejected webhook=5 reason=") for m in messages), messages
    assert any(m.startswith("last ") and "received 3, delivered 1, rejected 1, deduplicated 1"
               in m for m in messages), messages
    assert "/tok" not in relay.log()


# ---------------------------------------------------------------------- a log that cannot stop anything


@pytest.fixture
def stderr(capfd):
    """What reached standard error (descriptor 2) so far: `stderr.read_text()`."""
    class Captured:
        text = ""

        def read_text(self) -> str:
            self.text += capfd.readouterr().err
            return self.text
    return Captured()


def a_logger(handler: logs.LogHandler) -> logging.Logger:
    handler.setFormatter(logs.ScrubbingFormatter())
    logger = logging.Logger("notifier.test")  # not registered: no other handler sees it
    logger.addHandler(handler)
    return logger


def test_a_removed_log_directory_falls_back_to_standard_error_says_so_once_and_comes_back(
        tmp_path, stderr):
    directory = tmp_path / "logs"
    directory.mkdir()
    clock = Clock()
    handler = logs.LogHandler(directory / "relay.log", retry_sec=5.0, clock=clock)
    logger = a_logger(handler)
    logger.warning("before")
    shutil.rmtree(directory)
    for i in range(3):
        logger.warning("during %d", i)  # never raises
    assert (handler.state, handler.reason) == ("failed", "No such file or directory")
    text = stderr.read_text()
    assert text.count("cannot write the log file") == 1
    assert [line.split(" ", 3)[3] for line in text.splitlines()[1:]] == [
        "during 0", "during 1", "during 2"]
    directory.mkdir()
    logger.warning("too soon")  # the file is tried again only every 5 s
    assert handler.check() == ("failed", "No such file or directory")
    clock.now = 5.0
    assert handler.check() == ("ok", None)  # a quiet relay notices it too
    logger.warning("after")
    lines = (directory / "relay.log").read_text().splitlines()
    assert "writable again; 4 lines went to standard error meanwhile" in lines[0]
    assert lines[1].endswith("after") and len(lines) == 2
    assert "writable again" in stderr.read_text().splitlines()[-1]


def test_sighup_tries_the_file_at_once(tmp_path, stderr):
    directory = tmp_path / "logs"
    directory.mkdir()
    handler = logs.LogHandler(directory / "relay.log", clock=Clock())
    logger = a_logger(handler)
    shutil.rmtree(directory)
    logger.error("lost file")
    directory.mkdir()
    handler.reopen()
    logger.error("back")
    assert handler.state == "ok" and (directory / "relay.log").read_text().endswith("back\n")


def test_a_moved_log_file_is_reopened_as_logrotate_expects(tmp_path, stderr):
    path = tmp_path / "relay.log"
    logger = a_logger(logs.LogHandler(path))
    logger.warning("one")
    path.rename(tmp_path / "relay.log.1")
    logger.warning("two")
    assert path.read_text().endswith("two\n") and "two" not in stderr.read_text()
    assert (tmp_path / "relay.log.1").read_text().endswith("one\n")


def test_a_fifo_in_place_of_the_log_file_never_blocks(tmp_path, stderr):
    path = tmp_path / "relay.log"
    handler = logs.LogHandler(path)
    logger = a_logger(handler)
    path.unlink()
    os.mkfifo(path)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a reader: opening alone works
    try:
        logger.warning("to the fifo?")
    finally:
        os.close(reader)
    assert (handler.state, handler.reason) == ("failed", "not a regular file")
    assert stderr.read_text().endswith("to the fifo?\n")


def test_standard_error_that_nobody_reads_costs_lines_never_a_blocked_thread(monkeypatch):
    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w")
    monkeypatch.setattr(sys, "stderr", stream)
    try:
        logger = a_logger(logs.LogHandler(None))
        for i in range(2000):  # ~170 KB: more than a pipe holds
            logger.warning("line %d %s", i, "x" * 60)
        handler = logger.handlers[0]
        assert handler.stderr.left_out > 0
        taken = b""
        while len(taken) < 60_000:
            taken += os.read(read_end, 65536)
        logger.warning("after")
        os.close(stream.fileno())
        rest = b"".join(iter(lambda: os.read(read_end, 65536), b""))
    finally:
        os.close(read_end)
    assert re.search(rb"\(\d+ log lines left out: standard error could not take them\)\n"
                     rb"\S+ WARNING notifier.test after\n$", rest)


def test_a_full_log_disk_falls_back_and_never_raises(tmp_path, stderr):
    from tests.test_deadletter import _mount_tmpfs

    directory = tmp_path / "logs"
    _mount_tmpfs(directory, "16k")
    try:
        handler = logs.LogHandler(directory / "relay.log")
        logger = a_logger(handler)
        for i in range(400):  # 40 KB
            logger.warning("line %d %s", i, "x" * 60)
        assert (handler.state, handler.reason) == ("failed", "No space left on device")
        assert "line 399" in stderr.read_text()
        text = (directory / "relay.log").read_text()
        assert text.endswith("\n") or text.count("\n") == len(text.splitlines())
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def test_a_message_cannot_forge_a_line_and_a_bad_format_is_said_not_raised(tmp_path, stderr):
    path = tmp_path / "relay.log"
    logger = a_logger(logs.LogHandler(path))
    logger.warning("producer=%s", "evil\n2026-01-01T00:00:00.000Z INFO notifier.relay forged")
    logger.warning("%d messages", "not a number")
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and "evil\\n2026" in lines[0]
    assert "unformattable log line from notifier.test (TypeError): '%d messages'" in lines[1]
