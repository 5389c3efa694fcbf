"""Envelope parsing: every accepted form, every rejection reason, the webhook allowlist."""

import json
from urllib.parse import urlsplit

import pytest
import requests
from hypothesis import given, settings, strategies as st

from notifier import envelope, sexp
from notifier.envelope import EnvelopeError, Message
from tests.test_sexp import ENVELOPES

TOKEN = "SECRETtoken_123-abc"
HOOK = f"https://discord.com/api/webhooks/42/{TOKEN}"
PAYLOAD = {"embeds": [{"title": "Swimmy", "description": "hello", "color": 3447003}]}
PAYLOAD_JSON = json.dumps(PAYLOAD)


def lisp(**fields):
    return sexp.dumps(fields)


def rejected(data, allowed_hosts=()):
    with pytest.raises(EnvelopeError) as error:
        envelope.parse(data, allowed_hosts)
    assert TOKEN not in error.value.reason and TOKEN not in str(error.value)
    return error.value.reason


@pytest.mark.parametrize("case", [c for c in ENVELOPES if c["name"].startswith("notifier_")],
                         ids=lambda c: c["name"])
def test_every_lisp_notifier_fixture_is_accepted(case):
    message = envelope.parse(case["wire"])
    fields = sexp.loads(case["wire"])
    expected = (json.loads(fields["payload_json"]) if "payload_json" in fields
                else json.loads(json.dumps(fields["payload"])))
    assert message == Message("https://discord.com/api/webhooks/1/tok", expected)
    assert json.loads(json.dumps(message.payload)) == message.payload


def test_nested_alist_payload_becomes_discord_json():
    case = {c["name"]: c for c in ENVELOPES}["notifier_payload_nested_fields"]
    payload = envelope.parse(case["wire"]).payload
    assert payload["embeds"][0]["fields"] == [
        {"name": "PnL", "value": "+12.5", "inline": True},
        {"name": "DD", "value": "3%", "inline": None}]
    assert payload["embeds"][0]["footer"] == {"text": "swimmy"}
    assert type(payload) is dict and type(payload["embeds"][0]) is dict


@pytest.mark.parametrize("data", [
    lisp(type="NOTIFIER", schema_version=1, action="SEND", webhook=HOOK, payload_json=PAYLOAD_JSON),
    lisp(type="NOTIFIER", schema_version=1, action="SEND", webhook=HOOK, payload=PAYLOAD),
    lisp(type="NOTIFY", webhook=HOOK, payload=PAYLOAD),
    lisp(type="notifier", action="send", webhook=HOOK, data=PAYLOAD),
    f'((swimmy.core::type . "NOTIFIER") (:SCHEMA-VERSION . 1) (swimmy.core::Action . "SEND")'
    f' (WEBHOOK . "{HOOK}") (|payload_json| . {sexp.dumps(PAYLOAD_JSON)}))',
    "\ufeff  \n" + lisp(type="NOTIFIER", webhook=HOOK, payload_json=PAYLOAD_JSON),
    json.dumps({"type": "NOTIFIER", "schema_version": 1, "action": "SEND", "webhook": HOOK,
                "payload": PAYLOAD}),
    json.dumps({"type": "NOTIFIER", "schema-version": 1, "webhook": HOOK,
                "payload_json": PAYLOAD_JSON}),
    json.dumps({"Type": "NOTIFY", ":Schema_Version": 1, "webhook": HOOK, "data": PAYLOAD}),
    json.dumps({"webhook": HOOK, "data": PAYLOAD}),
    "\ufeff" + json.dumps({"webhook": HOOK, "data": PAYLOAD}),
], ids=["sexp-payload_json", "sexp-payload-alist", "sexp-legacy-notify", "sexp-data",
        "sexp-key-spellings", "sexp-bom-whitespace", "json-payload", "json-payload_json",
        "json-legacy-notify", "json-legacy-webhook-data", "json-bom"])
def test_every_accepted_form(data):
    assert envelope.parse(data) == Message(HOOK, PAYLOAD)
    assert envelope.parse(data.encode("utf-8")) == Message(HOOK, PAYLOAD)


def test_content_only_payload_and_unknown_extra_keys():
    data = lisp(type="NOTIFIER", webhook=HOOK, payload={"content": "hi"}, id="x", extra=[1, 2])
    assert envelope.parse(data).payload == {"content": "hi"}


@pytest.mark.parametrize("data, reason", [
    (lisp(type="HEARTBEAT", webhook=HOOK, payload=PAYLOAD), "unknown type 'HEARTBEAT'"),
    (lisp(webhook=HOOK, payload=PAYLOAD), "missing type"),
    (json.dumps({"webhook": HOOK, "payload": PAYLOAD}), "missing type"),
    (lisp(type="NOTIFIER", action="DELETE", webhook=HOOK, payload=PAYLOAD), "unknown action"),
    (lisp(type="NOTIFIER", schema_version=2, webhook=HOOK, payload=PAYLOAD),
     "unknown schema_version 2"),
    (lisp(type="NOTIFIER", schema_version="1", webhook=HOOK, payload=PAYLOAD),
     "unknown schema_version '1'"),
    (json.dumps({"type": "NOTIFIER", "schema_version": True, "webhook": HOOK,
                 "payload": PAYLOAD}), "unknown schema_version True"),
    (lisp(type="NOTIFIER", payload=PAYLOAD), "missing webhook"),
    (lisp(type="NOTIFIER", webhook=HOOK), "no payload"),
    (lisp(type="NOTIFIER", webhook=HOOK, payload=PAYLOAD, payload_json=PAYLOAD_JSON),
     "both payload and payload_json given"),
    (json.dumps({"webhook": HOOK, "data": PAYLOAD, "payload": PAYLOAD, "type": "NOTIFY"}),
     "both payload and data given"),
    (lisp(type="NOTIFIER", webhook=HOOK, payload_json=""), "payload_json is empty"),
    (lisp(type="NOTIFIER", webhook=HOOK, payload_json="{not json"),
     "payload_json is not valid JSON"),
    (lisp(type="NOTIFIER", webhook=HOOK, payload_json="[1]"), "payload_json must be an object"),
    (lisp(type="NOTIFIER", webhook=HOOK, payload_json=3), "payload_json must be a string"),
    (lisp(type="NOTIFIER", webhook=HOOK, payload_json="{}"), "payload_json is empty"),
    (lisp(type="NOTIFIER", webhook=HOOK, payload={"content": ""}), "has no content, embeds"),
    (f'((type . "NOTIFIER") (webhook . "{HOOK}") (payload))', "payload is empty"),
    (f'((type . "NOTIFIER") (webhook . "{HOOK}") (payload (content . hello)))',
     "payload.content is a symbol (hello)"),
    (f'((type . "NOTIFIER") (webhook . "{HOOK}") (payload (embeds ((color . 1/3)))))',
     "payload.embeds[0].color is a ratio"),
    (f'((type . "NOTIFIER") (webhook . "{HOOK}") (payload "a" "b"))',
     "payload must be an object (an alist), not a list"),
    (f'((type . "NOTIFIER") (webhook . "{HOOK}") (payload_json . "x")', "never closed"),
    (f'((type . "NOTIFIER")\n (x . #.(run-program "sh")))', "line 2, column 7"),
    ('(1 2 3)', "envelope must be an alist"),
    ('nil', "not an S-expression (does not start with '(') and not JSON"),
    ('[1, 2]', "a JSON envelope must be an object"),
    (b'{"webhook": "\xff"}', "invalid UTF-8"),
    (b'((type . "\xff"))', "invalid UTF-8"),
    (lisp(type="NOTIFIER", webhook=HOOK, payload={"content": "x" * 70_000}), "over the 65536"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 40 else None)
def test_each_rejection_has_a_reason(data, reason):
    assert reason in rejected(data)


@pytest.mark.parametrize("url, posted", [
    (HOOK, HOOK),
    (f"https://canary.discord.com/api/webhooks/42/{TOKEN}", None),
    (f"https://ptb.discordapp.com/api/webhooks/42/{TOKEN}", None),
    (f"https://discord.com/api/v10/webhooks/42/{TOKEN}", None),
    (f"https://discord.com/api/webhooks/42/{TOKEN}?thread_id=99", None),
    (f"https://DISCORD.com:443/api/v10/webhooks/42/{TOKEN}",
     f"https://discord.com/api/v10/webhooks/42/{TOKEN}"),
    (f"HTTPS://Ptb.Discord.com:/api/v9/webhooks/42/{TOKEN}?",
     f"https://ptb.discord.com/api/v9/webhooks/42/{TOKEN}"),
    (f"https://discord.com:0443/api/webhooks/42/{TOKEN}?thread_id=7",
     f"https://discord.com/api/webhooks/42/{TOKEN}?thread_id=7"),
])
def test_discord_webhook_urls_are_accepted_as_they_will_be_posted(url, posted):
    """Only what an HTTP client would change anyway is spelled anew (case, default
    port, empty query): the host, API version and thread stay."""
    assert envelope.check_webhook(url) == (posted or url)


SPELLINGS = [f"https://{host}/api{version}/webhooks/42/{TOKEN}{thread}"
             for host in sorted(envelope.DISCORD_HOSTS) + ["DISCORD.COM:443"]
             for version in ("", "/v6", "/v9", "/v10")
             for thread in ("", "?thread_id=99", "?thread_id=12345678901234567890")]


def test_every_spelling_of_one_webhook_gives_one_key_and_the_thread_is_the_messages():
    messages = [envelope.parse(json.dumps({"webhook": url, "data": PAYLOAD})) for url in SPELLINGS]
    assert {message.key for message in messages} == {HOOK}
    assert {message.thread for message in messages} == {None, "99", "12345678901234567890"}
    assert {message.webhook for message in messages} == {
        envelope.check_webhook(url) for url in SPELLINGS}  # each posted where it asked
    assert envelope.webhook_key(HOOK) == HOOK and envelope.webhook_id(HOOK) == "42"


def test_keys_tell_apart_what_is_not_one_webhook():
    hosts = (("127.0.0.1", None), ("localhost", None))
    keys = {envelope.webhook_key(envelope.check_webhook(url, hosts)) for url in (
        f"https://discord.com/api/webhooks/43/{TOKEN}", f"https://discord.com/api/webhooks/42/x{TOKEN}",
        f"http://127.0.0.1:8099/api/webhooks/42/{TOKEN}", f"http://127.0.0.1:8100/api/webhooks/42/{TOKEN}",
        f"http://localhost:8099/api/webhooks/42/{TOKEN}", HOOK)}
    assert len(keys) == 6
    assert {envelope.webhook_key(envelope.check_webhook(url, hosts)) for url in (
        f"http://127.0.0.1:80/api/webhooks/42/{TOKEN}", f"http://127.0.0.1/api/v10/webhooks/42/{TOKEN}",
        f"HTTP://127.0.0.1/api/webhooks/42/{TOKEN}?thread_id=5")} == {
        f"http://127.0.0.1/api/webhooks/42/{TOKEN}"}
    assert envelope.post_url(HOOK) == HOOK + "?wait=true"
    assert envelope.post_url(HOOK + "?thread_id=5") == HOOK + "?thread_id=5&wait=true"


@pytest.mark.parametrize("url, reason", [
    (f"https://evil.example/api/webhooks/42/{TOKEN}", "host 'evil.example' is not Discord's"),
    (f"https://discord.com.evil.example/api/webhooks/42/{TOKEN}", "is not Discord's"),
    (f"http://discord.com/api/webhooks/42/{TOKEN}", "must use https"),
    (f"https://discord.com:8443/api/webhooks/42/{TOKEN}", "must use https on Discord's default"),
    (f"https://user:pw@discord.com/api/webhooks/42/{TOKEN}", "must not carry user credentials"),
    (f"https://discord.com/api/channels/42/{TOKEN}", "path must be /api/webhooks/<id>/<token>"),
    (f"https://discord.com/api/webhooks/x42/{TOKEN}", "the id a Discord id"),
    (f"https://discord.com/api/webhooks/042/{TOKEN}", "the id a Discord id"),
    (f"https://discord.com/api/webhooks/%34%32/{TOKEN}", "the id a Discord id"),
    ("https://discord.com/api/webhooks/42/", "path must be"),
    (f"https://discord.com/api/webhooks/42//{TOKEN}", "path must be"),
    (f"https://discord.com/api/webhooks//42/{TOKEN}", "path must be"),
    (f"https://discord.com/api//webhooks/42/{TOKEN}", "path must be"),
    (f"https://discord.com/api/webhook/42/{TOKEN}", "path must be"),
    (f"https://discord.com/api/webhooks/42/{TOKEN}/extra", "path must be"),
    (f"https://discord.com/api/vX/webhooks/42/{TOKEN}", "path must be"),
    ("https://discord.com/api/webhooks/42/..", "the token of letters"),
    ("https://discord.com/api/webhooks/42/.", "the token of letters"),
    ("https://discord.com/api/webhooks/42/../", "without a trailing '/' (Discord answers 404"),
    (f"https://discord.com/api/webhooks/42/{TOKEN}/", "without a trailing '/' (Discord answers 404"),
    (f"https://discord.com/api/v10/webhooks/42/{TOKEN}/?thread_id=9", "without a trailing '/'"),
    ("https://discord.com/api/webhooks/42/%2e%2e", "the token of letters"),
    ("https://discord.com/api/webhooks/../42/tok", "path must be"),
    ("https://discord.com/api/webhooks/./42/tok", "path must be"),
    (f"https://discord.com/api/webhooks/42/{TOKEN}.", "the token of letters"),
    (f"https://discord.com/api/webhooks/42/{TOKEN}%41", "the token of letters"),
    (f"https://discord.com/api/webhooks/42/{TOKEN}" + "x" * 200, "the token of letters"),
    (f"https://discord.com/api/webhooks/42/{TOKEN}?thread_id=", "thread_id must be a thread's id"),
    (f"https://discord.com/api/webhooks/42/{TOKEN}?thread_id=x9", "thread_id must be a thread's id"),
    (f"https://discord.com/api/webhooks/42/{TOKEN}?thread_id=09", "thread_id must be a thread's id"),
    (f"https://discord.com/api/webhooks/42/{TOKEN}?thread_id=9;x", "thread_id must be a thread's id"),
    (f"https://discord.com/api/webhooks/42/{TOKEN}?thread_id=9&wait=false", "only carry a thread_id"),
    (f"https://discord.com/api/webhooks/42/{TOKEN}?thread_id", "thread_id must be a thread's id"),
    (f"https://discord.com/api/webhooks/42/{TOKEN}?Thread_id=9", "only carry a thread_id"),
    (f"https://discord.com/api/webhooks/42/{TOKEN}?wait=false", "only carry a thread_id"),
    (f"https://discord.com/api/webhooks/42/{TOKEN}#frag", "no fragment"),
    (f"https://discord.com/api/webhooks/42/{TOKEN}#", "no fragment"),
    (f"https://[::1/api/webhooks/42/{TOKEN}", "not a valid URL"),
    (f"ftp://127.0.0.1/api/webhooks/42/{TOKEN}", "is not Discord's"),
    ("", "non-empty string"),
    (42, "non-empty string"),
])
def test_webhook_allowlist_refuses_everything_else(url, reason):
    data = json.dumps({"webhook": url, "data": PAYLOAD})
    assert reason in rejected(data)


def test_extra_hosts_need_an_explicit_opt_in_and_may_use_http():
    local = f"http://127.0.0.1:8099/api/webhooks/42/{TOKEN}"
    data = lisp(type="NOTIFIER", webhook=local, payload=PAYLOAD)
    assert "not Discord's" in rejected(data)
    assert envelope.parse(data, (("127.0.0.1", 8099),)).webhook == local
    assert envelope.parse(data, (("127.0.0.1", None),)).webhook == local
    assert "not Discord's" in rejected(data, (("127.0.0.1", 8100),))
    assert "http or https" in rejected(
        lisp(type="NOTIFIER", webhook=local.replace("http", "ws"), payload=PAYLOAD),
        (("127.0.0.1", None),))


def test_redaction_keeps_only_the_webhook_id():
    assert envelope.webhook_id(HOOK) == "42"
    assert envelope.redact(HOOK) == "https://discord.com/api/webhooks/42/<token>"
    text = f"HTTPSConnectionPool: Max retries exceeded with url: /api/webhooks/42/{TOKEN}?wait=true"
    assert TOKEN not in envelope.scrub(text) and "/webhooks/42/<token>?wait=true" in envelope.scrub(text)
    assert envelope.webhook_id("not a url") == "?"


@given(st.text(max_size=80), st.text(max_size=80))
@settings(max_examples=300)
def test_no_rejection_ever_repeats_a_webhook_token(before, after):
    for data in (before + HOOK + after, lisp(type="NOTIFIER", webhook=before + HOOK + after),
                 "(" + before + f"(webhook . {HOOK})" + after):
        try:
            envelope.parse(data)
        except EnvelopeError as error:
            assert TOKEN not in error.reason


_URL_PARTS = st.sampled_from(["/", ".", "..", "%2e", "%2F", "?", "&", "#", ";", "=", ":", "@",
                              "thread_id=", "v10", "webhooks", "api", "42", "0", "-", "_"])


@given(host=st.sampled_from(sorted(envelope.DISCORD_HOSTS) + ["DISCORD.com", "discord.com:443",
                                                             "127.0.0.1:8099", "[::1]:80"]),
       version=st.sampled_from(["", "/v10", "/v6"]),
       token=st.lists(st.one_of(st.text("aZ9_-.", min_size=1, max_size=4), _URL_PARTS),
                      min_size=1, max_size=6).map("".join),
       tail=st.lists(_URL_PARTS, max_size=3).map("".join))
@settings(max_examples=500, derandomize=True)
def test_what_is_accepted_is_posted_as_checked_and_keyed_by_its_id_and_token(host, version, token, tail):
    """Whatever a producer writes after the webhook's id, the relay either refuses it or
    posts exactly the URL `check` shows (requests changes nothing in it, no dot segment
    is removed), and keys it by the id and token that URL carries."""
    scheme = "https" if "discord" in host.lower() else "http"
    url = f"{scheme}://{host}/api{version}/webhooks/42/{token}{tail}"
    try:
        checked = envelope.check_webhook(url, (("127.0.0.1", 8099), ("::1", None)))
    except EnvelopeError as error:
        quoted = error.reason.replace(envelope._PATH_RULE, "")  # the rule names "webhooks"
        assert token not in quoted or len(token) < 3
        return
    posted = envelope.post_url(checked)
    assert requests.Request("POST", posted).prepare().url == posted
    path = urlsplit(checked).path.rstrip("/")
    assert path.split("/")[-2:] == ["42", path.rsplit("/", 1)[1]]
    assert envelope.webhook_key(checked).endswith(f"/api/webhooks/42/{path.rsplit('/', 1)[1]}")
    assert not {".", ".."} & set(path.split("/"))


@pytest.mark.parametrize("data, webhook", [
    (json.dumps({"payload": {"content": "see https://discord.com/api/webhooks/2/other"},
                 "type": "NOTIFIER", "webhook": HOOK}).encode(), "42"),
    (lisp(payload_json=json.dumps({"content": "/webhooks/2/x"}), type="NOTIFIER",
          webhook=HOOK).encode(), "42"),
    (b'((webhook . "https://discord.com/api/v10/webhooks/77/t"))', "77"),
    (b'{"content": "https://discord.com/api/webhooks/2/other"}', None),  # no field of its own
    (b'{"webhook": 5}', None),
    (b'{"webhook": "https://discord.com/api/webhook/3/t"}', None),
    (b"junk /webhooks/2/x", None),
    (b"(" * 100_000, None),
])
def test_an_envelope_s_own_webhook_is_its_field_never_a_url_it_quotes(data, webhook):
    assert envelope.own_webhook_id(data) == webhook
