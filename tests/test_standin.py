"""The Discord stand-in behaves like Discord's webhook API, over real HTTP."""

import math
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from notifier.standin import DiscordStandIn

DEADLINE = 5.0  # generous: the machine may be loaded


@pytest.fixture
def http():
    """A keep-alive session that ignores proxy settings from the environment."""
    with requests.Session() as session:
        session.trust_env = False
        yield session


@pytest.fixture
def discord():
    with DiscordStandIn() as standin:
        yield standin


def post(http, url, payload=None, wait=True, **kwargs):
    return http.post(url, params={"wait": "true"} if wait else None,
                     json={"content": "hi"} if payload is None else payload, timeout=DEADLINE, **kwargs)


def post_in_thread(http, url):
    """Post from a thread (for requests that hang); the outcome lands in the returned dict."""
    outcome = {}

    def run():
        try:
            outcome["response"] = post(http, url)
        except requests.RequestException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


# Accepted messages


def test_wait_true_answers_a_message_object_and_records_it(discord, http):
    payload = {"content": "hello", "embeds": [{"title": "Swimmy"}]}
    r = post(http, discord.webhook_url(1, "tok"), payload, headers={"User-Agent": "DiscordBot (x, 1)"})
    assert r.status_code == 200
    body = r.json()
    assert body["content"] == "hello" and body["embeds"] == [{"title": "Swimmy"}]
    assert body["id"].isdigit() and body["channel_id"] and body["webhook_id"] == "1"
    assert discord.messages() == [payload] == discord.messages("1")
    assert discord.messages(2) == []
    (req,) = discord.requests
    assert (req.webhook_id, req.token, req.json, req.status) == ("1", "tok", payload, 200)
    assert req.query == {"wait": "true"}
    assert req.headers["user-agent"] == "DiscordBot (x, 1)"
    assert req.time <= time.monotonic()


def test_message_ids_increase(discord, http):
    ids = [int(post(http, discord.webhook_url()).json()["id"]) for _ in range(3)]
    assert ids == sorted(ids) and len(set(ids)) == 3


def test_without_wait_answers_204_with_no_body(discord, http):
    r = post(http, discord.webhook_url(), wait=False)
    assert r.status_code == 204 and r.content == b""
    assert discord.messages() == [{"content": "hi"}]


def test_unknown_path_and_method_are_refused_and_recorded(discord, http):
    r = http.post(discord.url + "/api/channels/1/messages", json={"content": "x"}, timeout=DEADLINE)
    assert r.status_code == 404
    assert discord.requests[0].webhook_id is None and discord.count_status(404) == 1
    assert http.get(discord.webhook_url(), timeout=DEADLINE).status_code == 405


def test_a_webhook_id_of_other_digits_is_answered_not_a_crash(discord):
    """A raw 0xB2 byte in the path reads as '\u00b2', a digit to str.isdigit but not to
    int(): the stand-in still answers, as Discord would, and records it."""
    body = b'{"content": "hi"}'
    with socket.create_connection(("127.0.0.1", discord.port), timeout=DEADLINE) as conn:
        conn.sendall(b"POST /api/webhooks/\xb2/tok?wait=true HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        answer = conn.makefile("rb").readline()
    assert answer.startswith(b"HTTP/1.1 200")
    assert discord.wait_for(1, timeout=DEADLINE)


def test_wait_for_counts_and_predicates(discord, http):
    assert discord.wait_for(1, timeout=0.05) is False
    assert discord.wait_for(lambda d: d.count_status(200) > 0, timeout=0.05) is False
    post(http, discord.webhook_url())
    assert discord.wait_for(1, timeout=DEADLINE) is True
    assert discord.wait_for(lambda d: d.count_status(200) == 1, timeout=DEADLINE) is True
    discord.clear()
    assert discord.requests == [] and discord.wait_for(1, timeout=0.05) is False


def test_wait_for_wakes_when_a_message_arrives_from_another_thread(discord, http):
    thread, _ = post_in_thread(http, discord.webhook_url())
    assert discord.wait_for(1, timeout=DEADLINE)
    thread.join(DEADLINE)


# Rate limits


def rate_headers(r):
    return {k: r.headers[f"X-RateLimit-{k}"] for k in ("Limit", "Remaining", "Reset", "Reset-After", "Bucket")}


def test_rate_limit_headers_429_and_window_reset(http):
    with DiscordStandIn(rate_limit=(2, 1.0)) as discord:
        url = discord.webhook_url()
        first, second, third = (post(http, url) for _ in range(3))
        assert [first.status_code, second.status_code, third.status_code] == [200, 200, 429]
        h = rate_headers(first)
        assert h["Limit"] == "2" and h["Remaining"] == "1" and rate_headers(second)["Remaining"] == "0"
        assert 0 < float(h["Reset-After"]) <= 1.0 and len(h["Reset-After"].split(".")[1]) == 3
        assert abs(float(h["Reset"]) - time.time()) < 1 and "." in h["Reset"]
        assert int(h["Bucket"], 16) >= 0

        body = third.json()
        assert body["message"] == "You are being rate limited." and body["global"] is False
        assert 0 < body["retry_after"] <= 1.0
        assert third.headers["Retry-After"] == str(math.ceil(body["retry_after"])) == "1"
        assert third.headers["X-RateLimit-Scope"] == "user"
        assert rate_headers(third)["Remaining"] == "0"
        assert discord.count_status(429) == 1 and discord.count_status(429, "1") == 1
        assert len(discord.messages()) == 2

        time.sleep(float(third.headers["X-RateLimit-Reset-After"]) + 0.01)
        again = post(http, url)
        assert again.status_code == 200 and again.headers["X-RateLimit-Remaining"] == "1"


def test_no_rate_limit_means_no_headers(discord, http):
    r = post(http, discord.webhook_url())
    assert not any(k.lower().startswith("x-ratelimit") for k in r.headers)


def test_every_webhook_reports_one_bucket_hash_and_is_counted_on_its_own(http):
    with DiscordStandIn(rate_limit=(2, 10.0)) as discord:
        answers = [post(http, discord.webhook_url(hook)) for hook in (1, 1, 2)]
        assert len({r.headers["X-RateLimit-Bucket"] for r in answers}) == 1
        assert [r.headers["X-RateLimit-Remaining"] for r in answers] == ["1", "0", "1"]
        assert post(http, discord.webhook_url(1)).status_code == 429
        assert post(http, discord.webhook_url(2)).status_code == 200


def test_the_global_limit_answers_global_429s_beyond_it_in_a_second(http):
    with DiscordStandIn(global_limit=3) as discord:
        statuses = [post(http, discord.webhook_url(hook)).status_code for hook in (1, 2, 3, 4)]
        refused = discord.requests[-1]
        assert statuses[3] == 429 or refused.time - discord.requests[0].time >= 1.0
        if statuses[3] == 429:
            assert refused.response["global"] is True and 0 < refused.response["retry_after"] <= 1.0


def test_the_hidden_channel_limit_answers_shared_429s_with_remaining_above_zero(http):
    with DiscordStandIn(rate_limit=(5, 2.0), channel_limit=(2, 60.0),
                        channels={"900": ["1", "2"]}) as discord:
        first, second = post(http, discord.webhook_url(1)), post(http, discord.webhook_url(2))
        assert first.json()["channel_id"] == second.json()["channel_id"] == "900"
        third = post(http, discord.webhook_url(1))
        assert third.status_code == 429 and third.headers["X-RateLimit-Scope"] == "shared"
        assert third.json()["retry_after"] > 50 and int(third.headers["X-RateLimit-Remaining"]) > 0
        assert post(http, discord.webhook_url(3)).status_code == 200  # another channel


def test_thread_urls_and_api_versions_of_one_webhook_share_its_bucket(http):
    """One webhook is one webhook, whatever follows its id and token in the URL."""
    with DiscordStandIn(rate_limit=(5, 10.0)) as discord:
        urls = [discord.webhook_url(1, thread=100 + i) for i in range(4)] + \
               [discord.webhook_url(1, version=10), discord.webhook_url(1, thread=7, version=9)]
        assert urls[0].endswith("/api/webhooks/1/tok?thread_id=100")
        assert urls[4].endswith("/api/v10/webhooks/1/tok")
        answers = [http.post(url, params={"wait": "true"}, json={"content": "hi"}, timeout=DEADLINE)
                   for url in urls]
        assert [r.status_code for r in answers] == [200] * 5 + [429]
        assert [r.headers["X-RateLimit-Remaining"] for r in answers[:5]] == ["4", "3", "2", "1", "0"]
        assert answers[0].json()["channel_id"] == "100"  # a thread's messages are in the thread
        assert post(http, discord.webhook_url(2)).status_code == 200


def test_use_channel_takes_part_of_a_hidden_limit_as_another_poster_would(http):
    with DiscordStandIn(channel_limit=(3, 60.0), channels={"900": ["1"]}) as discord:
        discord.use_channel("900", 2)
        assert post(http, discord.webhook_url(1)).status_code == 200
        refused = post(http, discord.webhook_url(1))
        assert refused.status_code == 429 and refused.headers["X-RateLimit-Scope"] == "shared"
        assert 55 < refused.json()["retry_after"] <= 60


@pytest.mark.parametrize("retry_after, text", [(None, None), (-1, "-1"), (float("nan"), "NaN"),
                                               (0.75, "0.75")])
def test_route_429_writes_any_retry_after_beside_valid_headers(discord, http, retry_after, text):
    discord.set_mode("1", "route_429", retry_after=retry_after, times=1)
    r = post(http, discord.webhook_url(1))
    assert r.status_code == 429 and r.headers["X-RateLimit-Scope"] == "user"
    assert (r.headers["Retry-After"], r.headers["X-RateLimit-Reset-After"]) == ("1", "0.5")
    assert '"global": false' in r.text
    if text is None:
        assert "retry_after" not in r.text
    else:
        assert f'"retry_after": {text}' in r.text
    assert post(http, discord.webhook_url(1)).status_code == 200


@pytest.mark.parametrize("framing, header, value", [
    ("length", "Content-Length", None), ("chunked", "Transfer-Encoding", "chunked"),
    ("close", "Connection", "close"), ("none", None, None)])
def test_trickle_frames_the_body_as_asked(discord, http, framing, header, value):
    discord.set_mode("1", "trickle", interval=0.001, framing=framing, times=1)
    r = post(http, discord.webhook_url(1))
    assert r.status_code == 200 and r.json()["content"] == "hi"
    assert header is None or header in r.headers and value in (None, r.headers[header])
    if framing != "length":
        assert "Content-Length" not in r.headers
    with pytest.raises(ValueError):
        discord.set_mode("1", "trickle", framing="gzip")


def test_reset_breaks_the_body_off_after_a_200_and_the_message_is_saved(discord, http):
    discord.set_mode("1", "reset", times=1)
    r = http.post(discord.webhook_url(1), params={"wait": "true"}, json={"content": "hi"},
                  timeout=DEADLINE, stream=True)
    assert r.status_code == 200 and int(r.headers["Content-Length"]) > 0
    with pytest.raises(requests.RequestException):
        r.content
    assert discord.messages("1") == [{"content": "hi"}]


def test_a_forum_needs_a_thread_and_thread_name_creates_one(http):
    with DiscordStandIn(forums={"7"}) as discord:
        refused = post(http, discord.webhook_url(7), {"content": "hi"})
        assert refused.status_code == 400 and refused.json()["code"] == 220001
        created = post(http, discord.webhook_url(7), {"content": "hi", "thread_name": "Report"})
        thread = created.json()["channel_id"]
        assert discord.threads("7") == [(thread, "Report")]
        inside = post(http, discord.webhook_url(7) + f"?thread_id={thread}", {"content": "more"})
        assert inside.json()["channel_id"] == thread and len(discord.threads()) == 1


# Payload validation


def embed_total(chars):
    """Embeds within every per-field limit whose text adds up to `chars` characters."""
    return [{"description": "d" * 4096}, {"description": "d" * (chars - 4096)}]


INVALID = {
    "not an object": (["content"], None),
    "empty": ({}, "content"),
    "blank content": ({"content": "  "}, "content"),
    "empty embeds": ({"content": "", "embeds": []}, "content"),
    "content 2001": ({"content": "x" * 2001}, "content"),
    "content not a string": ({"content": 5}, "content"),
    "11 embeds": ({"embeds": [{"title": "t"}] * 11}, "embeds"),
    "title 257": ({"embeds": [{"title": "t" * 257}]}, "embeds"),
    "description 4097": ({"embeds": [{"description": "d" * 4097}]}, "embeds"),
    "26 fields": ({"embeds": [{"fields": [{"name": "n", "value": "v"}] * 26}]}, "embeds"),
    "field name 257": ({"embeds": [{"fields": [{"name": "n" * 257, "value": "v"}]}]}, "embeds"),
    "field value 1025": ({"embeds": [{"fields": [{"name": "n", "value": "v" * 1025}]}]}, "embeds"),
    "footer 2049": ({"embeds": [{"footer": {"text": "f" * 2049}}]}, "embeds"),
    "author 257": ({"embeds": [{"author": {"name": "a" * 257}}]}, "embeds"),
    "total 6001": ({"embeds": embed_total(6001)}, "embeds"),
}


@pytest.mark.parametrize("payload, error_key", INVALID.values(), ids=INVALID.keys())
def test_invalid_payload_is_400_invalid_form_body(discord, http, payload, error_key):
    r = post(http, discord.webhook_url(), payload)
    assert r.status_code == 400
    body = r.json()
    assert body["code"] == 50035 and body["message"] == "Invalid Form Body"
    assert (error_key in body["errors"]) if error_key else body["errors"]
    assert discord.messages() == [] and discord.count_status(400) == 1


def test_invalid_json_is_400(discord, http):
    r = http.post(discord.webhook_url(), data=b"{not json", headers={"Content-Type": "application/json"},
                  timeout=DEADLINE)
    assert r.status_code == 400 and r.json()["code"] == 50035
    assert discord.requests[0].json is None


def test_errors_name_the_offending_field(discord, http):
    payload = {"embeds": [{"title": "ok"}, {"fields": [{"name": "n", "value": "v"}, {"name": "n", "value": "v" * 1025}]}]}
    errors = post(http, discord.webhook_url(), payload).json()["errors"]
    (error,) = errors["embeds"]["1"]["fields"]["1"]["value"]["_errors"]
    assert error["code"] == "BASE_TYPE_MAX_LENGTH" and "1024" in error["message"] and "1025" in error["message"]


def test_payload_at_every_limit_is_accepted(discord, http):
    """Exactly at each limit is fine; lengths are code points, not UTF-8 bytes."""
    at_limits = {
        "content": "é" * 1999 + "😀",
        "embeds": [
            {"title": "t" * 256, "description": "d" * 2000, "footer": {"text": "f" * 1000},
             "author": {"name": "a" * 256}, "fields": [{"name": "n", "value": "v" * 59}] * 25},
            *[{"title": "x"}] * 9,
        ],
    }
    assert 256 + 2000 + 1000 + 256 + 25 * 60 + 9 == 5021
    assert post(http, discord.webhook_url(), at_limits).status_code == 200
    assert post(http, discord.webhook_url(), {"embeds": embed_total(6000)}).status_code == 200
    big_field = {"embeds": [{"fields": [{"name": "n" * 256, "value": "v" * 1024}]}]}
    assert post(http, discord.webhook_url(), big_field).status_code == 200
    assert post(http, discord.webhook_url(), {"embeds": [{"footer": {"text": "f" * 2048}}]}).status_code == 200
    assert discord.count_status(200) == 4


# Scripted faults


def test_status_mode_times_reverts_to_ok(discord, http):
    discord.set_mode("1", "status", status=500, times=2)
    codes = [post(http, discord.webhook_url(1)).status_code for _ in range(3)]
    assert codes == [500, 500, 200]
    assert discord.count_status(500, "1") == 2 and len(discord.messages()) == 1


@pytest.mark.parametrize("status, code", [(404, 10015), (401, 50027), (403, 50001)])
def test_dead_webhook_statuses_have_discord_bodies(discord, http, status, code):
    discord.set_mode("1", "status", status=status)
    r = post(http, discord.webhook_url(1))
    assert r.status_code == status and r.json()["code"] == code
    assert post(http, discord.webhook_url(2)).status_code == 200


@pytest.mark.parametrize("status", [500, 502, 503])
def test_server_errors_have_short_bodies(discord, http, status):
    discord.set_mode("1", "status", status=status)
    r = post(http, discord.webhook_url(1))
    assert r.status_code == status and 0 < len(r.content) < 200


def test_status_mode_with_custom_body(discord, http):
    discord.set_mode("1", "status", status=503, body={"message": "overloaded"})
    assert post(http, discord.webhook_url(1)).json() == {"message": "overloaded"}


def test_mode_for_all_webhooks_replaces_per_webhook_modes(discord, http):
    discord.set_mode("1", "status", status=404)
    discord.set_mode(None, "status", status=500)
    assert [post(http, discord.webhook_url(i)).status_code for i in (1, 2)] == [500, 500]
    discord.set_mode(None, "ok")
    assert post(http, discord.webhook_url(1)).status_code == 200


def test_set_mode_rejects_unknown_modes_and_parameters(discord):
    with pytest.raises(ValueError):
        discord.set_mode("1", "flaky")
    with pytest.raises(TypeError):
        discord.set_mode("1", "hang", status=500)


def test_global_429(discord, http):
    discord.set_mode(None, "global_429", retry_after=0.5, times=1)
    r = post(http, discord.webhook_url())
    assert r.status_code == 429
    assert r.json() == {"message": "You are being rate limited.", "retry_after": 0.5, "global": True}
    assert r.headers["X-RateLimit-Global"] == "true" and r.headers["X-RateLimit-Scope"] == "global"
    assert r.headers["Retry-After"] == "1"
    assert post(http, discord.webhook_url()).status_code == 200


def test_channel_429_keeps_remaining_above_zero(http):
    with DiscordStandIn(rate_limit=(5, 2.0)) as discord:
        discord.set_mode("1", "channel_429")
        r = post(http, discord.webhook_url(1))
        assert r.status_code == 429
        assert r.json() == {"message": "You are being rate limited.", "retry_after": 40.0, "global": False}
        assert r.headers["X-RateLimit-Scope"] == "shared" and r.headers["Retry-After"] == "40"
        assert int(r.headers["X-RateLimit-Remaining"]) > 0


def test_channel_429_without_configured_limit_still_shows_headers(discord, http):
    discord.set_mode("1", "channel_429", retry_after=41.5)
    r = post(http, discord.webhook_url(1))
    assert r.json()["retry_after"] == 41.5 and r.headers["Retry-After"] == "42"
    assert int(r.headers["X-RateLimit-Remaining"]) > 0


def test_html_429_is_a_cloudflare_page_without_rate_limit_headers(discord, http):
    discord.set_mode("1", "html_429")
    r = post(http, discord.webhook_url(1))
    assert r.status_code == 429 and r.headers["Content-Type"].startswith("text/html")
    assert "<html" in r.text and "Retry-After" not in r.headers
    assert not any(k.lower().startswith("x-ratelimit") for k in r.headers)


def test_hang_is_answered_when_released(discord, http):
    discord.set_mode("1", "hang", times=1)
    thread, outcome = post_in_thread(http, discord.webhook_url(1))
    assert discord.wait_for(lambda d: d.hanging == 1, DEADLINE)
    assert discord.requests == []
    discord.release_hangs()
    thread.join(DEADLINE)
    assert outcome["response"].status_code == 200
    assert discord.messages("1") == [{"content": "hi"}] and discord.hanging == 0


def test_hang_holds_only_its_webhook(discord, http):
    discord.set_mode("1", "hang")
    with requests.Session() as other:
        other.trust_env = False
        thread, _ = post_in_thread(other, discord.webhook_url(1))
        assert discord.wait_for(lambda d: d.hanging == 1, DEADLINE)
        assert post(http, discord.webhook_url(2)).status_code == 200
        discord.release_hangs()
        thread.join(DEADLINE)


def test_a_trailing_slash_is_not_found_as_on_discord(discord, http):
    response = post(http, discord.webhook_url(1) + "/")
    assert response.status_code == 404 and discord.messages() == []


def test_requests_in_flight_at_once_are_counted_per_webhook(discord, http):
    """What the soak checks the relay by: one request per webhook in flight at a time,
    whatever URL it is addressed through."""
    for thread in (None, 5, 6):
        assert post(http, discord.webhook_url(1, thread=thread)).status_code == 200
    assert discord.most_in_flight("1") == 1
    discord.set_mode("1", "hang", times=1)
    with requests.Session() as other:
        other.trust_env = False
        thread, _ = post_in_thread(other, discord.webhook_url(1, thread=7))
        assert discord.wait_for(lambda d: d.hanging == 1, DEADLINE)
        assert post(http, discord.webhook_url(1, version=10)).status_code == 200
        discord.release_hangs()
        thread.join(DEADLINE)
    assert discord.most_in_flight("1") == 2 and discord.most_in_flight("2") == 0
    hung = next(r for r in discord.requests if r.mode == "hang")
    later = max(r.time for r in discord.requests)
    assert discord.most_in_flight("1", deadline=(later - hung.time) / 2) == 1  # given up
    assert discord.most_in_flight("1", until=hung.time) == 1
    assert all(r.time <= r.answered for r in discord.requests)


def test_stop_returns_promptly_while_a_request_hangs(http):
    discord = DiscordStandIn().start()
    discord.set_mode(None, "hang")
    thread, outcome = post_in_thread(http, discord.webhook_url())
    assert discord.wait_for(lambda d: d.hanging == 1, DEADLINE)
    started = time.monotonic()
    discord.stop()
    assert time.monotonic() - started < 2.0
    thread.join(DEADLINE)
    assert not thread.is_alive() and outcome


# Outage: stop, then start again on the same port


def test_restart_on_the_same_port(http):
    first = DiscordStandIn().start()
    url = first.webhook_url()
    assert post(http, url).status_code == 200  # leaves a keep-alive connection in the session
    first.stop()
    with pytest.raises(requests.ConnectionError):
        post(http, url)
    with DiscordStandIn(port=first.port) as second:
        assert post(http, url).status_code == 200
        assert second.messages() == [{"content": "hi"}]
    assert len(first.messages()) == 1


# Command line


def test_main_prints_url_and_messages_and_exits_0_on_sigterm(http):
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "notifier.standin", "--rate-limit", "5/2"],
                            cwd=root, stdout=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline().strip()
        assert first.startswith("standin listening on http://127.0.0.1:")
        base = first.rsplit(" ", 1)[1]
        assert proc.stdout.readline().strip() == f"webhook URL: {base}/api/webhooks/1/tok"
        assert proc.stdout.readline().strip() == \
            f"relay setting: SWIMMY_NOTIFIER_ALLOWED_HOSTS={base.removeprefix('http://')}"
        r = post(http, f"{base}/api/webhooks/7/tok", {"content": "line one\nline two " + "x" * 100})
        assert r.headers["X-RateLimit-Limit"] == "5"
        assert proc.stdout.readline().rstrip("\n") == "7 line one line two " + "x" * 62
        post(http, f"{base}/api/webhooks/7/tok", {"embeds": [{"title": "Swimmy"}]})
        assert proc.stdout.readline().strip() == "7 Swimmy"
        post(http, f"{base}/api/webhooks/7/tok", {})
        assert proc.stdout.readline().startswith("7  -> 400 ")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(DEADLINE) == 0
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
