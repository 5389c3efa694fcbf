"""The log an operator tunes and parses: levels, JSON lines, a summary per interval."""

import json
import logging

from notifier import logs, metrics
from notifier.standin import DiscordStandIn
from tests.harness import envelope_text

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
