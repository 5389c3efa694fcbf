"""Discord's limits on a webhook message's other fields, at the door (issue 18, item 6):
a username over 80 characters is cut, a name with a word Discord refuses is refused,
and so on for every field Discord documents, so that Discord never answers 400 for one.
The stand-in's validator (written apart, as Discord's copy) is the judge."""

import json
import subprocess
import sys

import pytest
from hypothesis import given, strategies as st

from notifier import envelope, message_fields, payload
from notifier.standin import DiscordStandIn, validate
from tests.harness import assert_balanced

HOOK = "http://127.0.0.1:8099/api/webhooks/7/tok"
LOCAL = (("127.0.0.1", 8099),)


def parsed(body: dict) -> envelope.Message:
    return envelope.parse(json.dumps({"type": "NOTIFIER", "webhook": HOOK, "payload": body}),
                          LOCAL)


def refusal(body: dict) -> str:
    with pytest.raises(envelope.EnvelopeError) as caught:
        parsed(body)
    return caught.value.reason


@pytest.mark.parametrize("field, value, limit", [
    ("username", "u" * 81, 80),
    ("username", "é" * 200, 80),
    ("thread_name", "t" * 101, 100),
])
def test_a_name_over_its_limit_is_cut_with_an_ellipsis(field, value, limit):
    message = parsed({"content": "x", field: value})
    assert message.payload[field] == value[:limit - 1] + payload.ELLIPSIS
    assert all(validate(part) == {} for part in message.requests)


def test_poll_texts_over_their_limits_are_cut():
    poll = {"question": {"text": "q" * 301}, "answers": [{"poll_media": {"text": "a" * 56}},
                                                         {"poll_media": {"text": "b"}}],
            "duration": 768}
    held = parsed({"poll": poll}).payload["poll"]
    assert len(held["question"]["text"]) == 300 and held["question"]["text"][-1] == "…"
    assert [len(answer["poll_media"]["text"]) for answer in held["answers"]] == [55, 1]
    assert validate({"poll": held}) == {} and validate({"poll": poll}) != {}


@pytest.mark.parametrize("body, reason", [
    ({"username": "Discord alerts"}, "payload.username contains 'discord'"),
    ({"username": "my CLYDE"}, "payload.username contains 'clyde'"),
    ({"username": "  "}, "payload.username is blank"),
    ({"username": ""}, "payload.username is blank"),
    ({"username": 7}, "payload.username must be a string"),
    ({"avatar_url": "ftp://example.com/a.png"}, "payload.avatar_url must be an http or https URL"),
    ({"avatar_url": "not a url"}, "payload.avatar_url must be an http or https URL"),
    ({"avatar_url": "https://"}, "payload.avatar_url must be an http or https URL"),
    ({"thread_name": " "}, "payload.thread_name is blank"),
    ({"tts": "yes"}, "payload.tts must be true or false"),
    ({"flags": 1 << 15}, "payload.flags may set only SUPPRESS_EMBEDS (4) and "
                         "SUPPRESS_NOTIFICATIONS (4096)"),
    ({"flags": True}, "payload.flags may set only"),
    ({"applied_tags": ["1"] * 6}, "payload.applied_tags holds 6 ids; Discord takes at most 5"),
    ({"applied_tags": ["x"]}, "payload.applied_tags must be a list of ids"),
    ({"allowed_mentions": {"parse": ["users"], "users": ["1"]}},
     "payload.allowed_mentions names 'users' in parse and lists users too"),
    ({"allowed_mentions": {"parse": ["nobody"]}}, "payload.allowed_mentions.parse must be"),
    ({"allowed_mentions": {"roles": [str(i) for i in range(101)]}},
     "payload.allowed_mentions.roles holds 101 ids; Discord takes at most 100"),
    ({"allowed_mentions": []}, "payload.allowed_mentions must be an object"),
    ({"poll": {"question": {"text": "q"}, "answers": []}}, "payload.poll.answers must be"),
    ({"poll": {"question": {"text": "q"}, "answers": [{"poll_media": {"text": "a"}}] * 11}},
     "payload.poll.answers must be a list of 1 to 10"),
    ({"poll": {"question": {"text": "q"}, "answers": [{"poll_media": {"text": "a"}}],
               "duration": 769}}, "payload.poll.duration must be 1 to 768 hours"),
    ({"poll": {"question": {"text": ""}, "answers": [{"poll_media": {"text": "a"}}]}},
     "payload.poll.question.text is blank"),
])
def test_a_field_discord_would_refuse_is_refused_at_the_door(body, reason):
    body = {"content": "x", **body} if "poll" not in body else body
    assert refusal(body).startswith(reason)
    assert validate(body) != {}  # Discord's copy refuses it too


def test_null_stands_for_a_field_left_out_and_good_values_pass_unchanged():
    body = {"content": "x", "username": "Swimmy", "avatar_url": "https://example.com/a.png",
            "tts": False, "flags": 4 | 4096, "thread_name": "Alerts", "applied_tags": ["1", 2],
            "allowed_mentions": {"parse": ["roles"], "users": ["3"], "replied_user": False},
            "poll": None}
    assert parsed(body).payload == body
    assert parsed({"content": "x", "username": None}).payload == {"content": "x", "username": None}


FIELD_VALUES = {
    "username": st.one_of(st.text(max_size=120), st.integers(), st.none()),
    "avatar_url": st.one_of(st.sampled_from(["https://example.com/a.png", "http://x", "ftp://x",
                                             "https://", "", "https://a b"]), st.text()),
    "thread_name": st.one_of(st.text(max_size=130), st.booleans()),
    "tts": st.one_of(st.booleans(), st.integers(0, 1), st.text(max_size=3)),
    "flags": st.one_of(st.integers(-1, 1 << 16), st.booleans()),
    "applied_tags": st.lists(st.one_of(st.integers(0, 10 ** 20), st.text(max_size=21)),
                             max_size=7),
    "allowed_mentions": st.fixed_dictionaries({}, optional={
        "parse": st.lists(st.sampled_from(["roles", "users", "everyone", "all"]), max_size=3),
        "users": st.lists(st.sampled_from(["1", "22", 3]), max_size=3),
        "roles": st.lists(st.sampled_from(["1", "x"]), max_size=3),
        "replied_user": st.one_of(st.booleans(), st.none(), st.integers(0, 1))}),
    "poll": st.fixed_dictionaries({
        "question": st.fixed_dictionaries({"text": st.text(max_size=320)}),
        "answers": st.lists(st.fixed_dictionaries(
            {"poll_media": st.fixed_dictionaries({"text": st.text(max_size=60)})}), max_size=12)},
        optional={"duration": st.integers(-2, 800), "allow_multiselect": st.booleans()}),
}


@given(st.fixed_dictionaries({}, optional=FIELD_VALUES), st.booleans())
def test_what_the_door_accepts_discord_accepts(fields, with_content):
    """Any mix of the fields, any values: refused at the door, or every request the relay
    would post passes Discord's copy of the rules."""
    body = {**({"content": "x"} if with_content or "poll" not in fields else {}), **fields}
    try:
        message = parsed(body)
    except envelope.EnvelopeError as exc:
        assert exc.reason.startswith("payload.")
        return
    for part in message.requests:
        assert validate(part) == {}, (validate(part), part)


def test_the_limits_are_the_documented_ones():
    assert dict(message_fields.LIMITS) == {
        "username": 80, "thread_name": 100, "applied_tags": 5, "allowed_mentions.ids": 100,
        "poll.question": 300, "poll.answers": 10, "poll.answer": 55, "poll.duration": 768}


def test_an_81_character_username_is_delivered_cut_and_check_shows_it(relays, pushers):
    """Issue 18: an 81-character username passed `check`, Discord answered 400 and the
    message failed. Now `check` shows it cut to 80, and the relay delivers it so."""
    with DiscordStandIn() as discord:
        relay = relays(allowed=f"127.0.0.1:{discord.port}")
        url = discord.webhook_url(1)
        name = "Swimmy trading alerts, production cluster, primary region, order gateway 01-A"
        name += "x" * (81 - len(name))
        data = [json.dumps({"type": "NOTIFIER", "webhook": url, "payload": body}).encode()
                for body in ({"content": "long name", "username": name},
                             {"content": "refused", "username": "Discord bridge"})]
        shown = subprocess.run([sys.executable, "-m", "notifier", "check", "--allowed-hosts",
                                f"127.0.0.1:{discord.port}"], input=data[0],
                               capture_output=True, timeout=60)
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["payload"]["username"] == name[:79] + "…"
        pusher = pushers(relay.endpoint)
        for item in data:
            pusher.send(item)
        snapshot = relay.wait_metrics(lambda m: m["delivered"] == 1 and m["rejected"] == 1
                                      and m["pending"] == 0, what="one delivered, one refused")
        assert_balanced(snapshot)
        assert snapshot["failed"] == snapshot["errors"] == 0
        assert [message["username"] for message in discord.messages("1")] == [name[:79] + "…"]
        assert "reason=payload.username contains 'discord'" in relay.log()
        assert relay.stop() == 0
