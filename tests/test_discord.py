"""Reading Discord's answers: every status and kind of 429, rate-limit headers, caps, and
the retry policy's exact backoff.

Headers go through `requests`' case-insensitive dict, as they do in the relay, so a test
also shows the names are looked up the way Discord may spell them.
"""

import json
import random

import pytest
from requests.structures import CaseInsensitiveDict

from notifier.discord import (BAN_COOLDOWN_SEC, MAX_WAIT_SEC, UNKNOWN_WAIT_SEC, RateLimit,
                              RetryPolicy, classify, network_error, read_rate_limit)

RATE_HEADERS = {"X-RateLimit-Limit": "5", "X-RateLimit-Remaining": "3",
                "X-RateLimit-Reset": "1470173023.123", "X-RateLimit-Reset-After": "1.234",
                "X-RateLimit-Bucket": "abcd1234"}
RATE = RateLimit(bucket="abcd1234", limit=5, remaining=3, reset_after=1.234,
                 reset=1470173023.123)


def answer(status, body=b"", **headers):
    """classify() of a response; header names as keyword arguments use _ for -."""
    names = CaseInsensitiveDict({name.replace("_", "-"): value for name, value in headers.items()})
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return classify(status, names, data)


def rate_limited(retry_after=1.5, is_global=False, **headers):
    body = {"message": "You are being rate limited.", "retry_after": retry_after,
            "global": is_global}
    return answer(429, body, **headers)


# Statuses


@pytest.mark.parametrize("status", [200, 204])
def test_success_is_delivered_and_keeps_the_rate_limit(status):
    outcome = classify(status, CaseInsensitiveDict(RATE_HEADERS), b"")
    assert (outcome.kind, outcome.invalid, outcome.rate) == ("delivered", False, RATE)
    assert not outcome.unconfirmed


def test_a_saved_message_names_its_channel():
    outcome = answer(200, {"id": "1", "channel_id": "900"})
    assert (outcome.kind, outcome.channel) == ("delivered", "900")


@pytest.mark.parametrize("broken", ["the answer broke off (ChunkedEncodingError)",
                                    "no whole answer within 20 s"])
def test_a_2xx_whose_body_broke_off_is_delivered_unconfirmed(broken):
    """With ?wait=true a 2xx status line means Discord saved the message: posting it
    again would post it twice."""
    outcome = classify(200, CaseInsensitiveDict(RATE_HEADERS), b'{"id": "1", "chan', broken)
    assert (outcome.kind, outcome.unconfirmed, outcome.channel) == ("delivered", True, None)
    assert outcome.reason == f"HTTP 200, then {broken}" and outcome.rate == RATE


@pytest.mark.parametrize("status, kind", [(400, "refused"), (404, "dead"), (500, "retry")])
def test_another_status_whose_body_broke_off_is_read_from_its_status(status, kind):
    outcome = classify(status, CaseInsensitiveDict(), b'{"message": "Unknown', "reset")
    assert outcome.kind == kind and not outcome.unconfirmed


def test_400_is_a_bad_payload_with_discords_reason_and_first_field():
    too_long = {"code": "BASE_TYPE_MAX_LENGTH", "message": "Must be 256 or fewer in length."}
    body = {"code": 50035, "message": "Invalid Form Body",
            "errors": {"embeds": {"0": {"title": {"_errors": [too_long]}}}}}
    outcome = answer(400, body)
    assert outcome.kind == "refused" and not outcome.invalid
    assert outcome.reason == ("HTTP 400: Invalid Form Body (code 50035): "
                              "embeds.0.title: Must be 256 or fewer in length.")


def test_400_without_a_json_body_still_says_what_came_back():
    outcome = answer(400, b"<html>Bad Request</html>")
    assert (outcome.kind, outcome.reason) == ("refused", "HTTP 400: no JSON error body")


@pytest.mark.parametrize("status", [301, 405, 413])
def test_redirects_and_other_client_errors_are_refused(status):
    outcome = answer(status, {"message": "no", "code": 0})
    assert (outcome.kind, outcome.reason) == ("refused", f"HTTP {status}: no (code 0)")


@pytest.mark.parametrize("status, code", [(401, 50027), (403, 50001)])
def test_401_and_403_mean_a_dead_webhook_that_may_come_back(status, code):
    outcome = answer(status, {"message": "Invalid Webhook Token", "code": code})
    assert (outcome.kind, outcome.gone) == ("dead", False)
    assert outcome.invalid  # Discord counts them towards its ban threshold
    assert outcome.reason == f"HTTP {status}: Invalid Webhook Token (code {code})"


def test_404_unknown_webhook_is_gone_and_not_an_invalid_request():
    outcome = answer(404, {"message": "Unknown Webhook", "code": 10015})
    assert (outcome.kind, outcome.gone, outcome.invalid) == ("dead", True, False)
    assert "Unknown Webhook (code 10015)" in outcome.reason


@pytest.mark.parametrize("status", [408, 500, 502, 503, 504])
def test_server_errors_and_timeouts_are_retried(status):
    outcome = answer(status, b"error code: 502")
    assert (outcome.kind, outcome.reason, outcome.invalid) == ("retry", f"HTTP {status}", False)


def test_a_network_error_is_retried_and_named():
    outcome = network_error(TimeoutError("read timed out"))
    assert (outcome.kind, outcome.reason, outcome.rate) == ("retry", "TimeoutError", RateLimit())


# 429s by kind


def test_a_route_429_waits_its_fractional_retry_after_for_this_webhook_only():
    outcome = rate_limited(0.75, X_RateLimit_Scope="user", X_RateLimit_Remaining="0")
    assert (outcome.kind, outcome.scope, outcome.wait) == ("rate_limited", "route", 0.75)
    assert outcome.invalid and outcome.rate.remaining == 0


def test_a_429_with_no_scope_header_is_per_route():
    assert rate_limited(2.0).scope == "route"


@pytest.mark.parametrize("body_global, headers", [
    (True, {}),
    (False, {"X_RateLimit_Scope": "global"}),
    (False, {"X_RateLimit_Global": "true"}),
])
def test_a_global_429_pauses_everyone(body_global, headers):
    outcome = rate_limited(1.25, is_global=body_global, **headers)
    assert (outcome.scope, outcome.wait, outcome.invalid) == ("global", 1.25, True)


def test_a_shared_429_is_honoured_even_when_long_but_not_counted_as_invalid():
    """Per-channel limits answer 429 with scope shared and waits of 40 s or more while
    the webhook's own Remaining is still above 0."""
    outcome = rate_limited(40.0, X_RateLimit_Scope="shared", X_RateLimit_Remaining="4")
    assert (outcome.scope, outcome.wait, outcome.invalid) == ("shared", 40.0, False)
    assert outcome.rate.remaining == 4


@pytest.mark.parametrize("body", [
    b"<!DOCTYPE html><html><h1>Error 1015</h1>You are being rate limited</html>",
    b"",
    b"[1, 2]",
])
def test_a_429_without_any_rate_limit_evidence_is_a_long_pause_for_everyone(body):
    """Cloudflare's ban page: no JSON, no X-RateLimit-* header (Retry-After alone is
    no evidence of Discord's limits: Cloudflare sends it too)."""
    outcome = answer(429, body, Retry_After="30")
    assert (outcome.kind, outcome.scope, outcome.wait) == ("rate_limited", "ban", BAN_COOLDOWN_SEC)
    assert outcome.invalid


BAD_RETRY_AFTER = [{"retry_after": bad} for bad in ("soon", None, -1, [1], True, float("nan"))] + [{}]


@pytest.mark.parametrize("extra", BAD_RETRY_AFTER)
def test_a_bad_retry_after_falls_back_to_reset_after_and_keeps_the_scope(extra):
    """The issue's case: a JSON 429 with valid headers but retry_after missing,
    negative or NaN was taken for a ban that paused every webhook for 120 s."""
    body = json.dumps({"message": "You are being rate limited.", "global": False, **extra})
    outcome = answer(429, body.encode(), X_RateLimit_Scope="user", Retry_After="1",
                     X_RateLimit_Reset_After="0.5")
    assert (outcome.kind, outcome.scope, outcome.wait) == ("rate_limited", "route", 0.5)
    assert outcome.reason == "HTTP 429 (route), retry after 0.5 s"


def test_without_reset_after_the_retry_after_header_gives_the_wait():
    outcome = answer(429, {"message": "You are being rate limited."},
                     X_RateLimit_Scope="shared", Retry_After="41")
    assert (outcome.scope, outcome.wait, outcome.invalid) == ("shared", 41.0, False)


def test_the_body_s_retry_after_is_the_best_evidence():
    outcome = rate_limited(0.25, X_RateLimit_Reset_After="0.5", Retry_After="1")
    assert outcome.wait == 0.25


def test_headers_without_a_json_body_are_evidence_enough():
    outcome = answer(429, b"", X_RateLimit_Scope="global", Retry_After="2")
    assert (outcome.scope, outcome.wait) == ("global", 2.0)


def test_a_429_from_discord_with_no_usable_wait_anywhere_waits_a_few_seconds():
    outcome = answer(429, {"message": "You are being rate limited.", "retry_after": "NaN"},
                     Retry_After="soon")
    assert (outcome.scope, outcome.wait) == ("route", UNKNOWN_WAIT_SEC)
    assert "no usable wait" in outcome.reason


@pytest.mark.parametrize("retry_after", [86400, 1e300])
def test_a_huge_retry_after_in_the_body_is_capped(retry_after):
    assert rate_limited(retry_after).wait == MAX_WAIT_SEC


def test_a_retry_after_given_as_a_string_is_still_read():
    assert rate_limited("2.5").wait == 2.5


# Rate-limit headers


def test_headers_are_read_with_fractional_seconds_whatever_their_case():
    headers = CaseInsensitiveDict({name.lower(): value for name, value in RATE_HEADERS.items()})
    assert read_rate_limit(headers) == RATE


def test_missing_headers_are_none():
    assert read_rate_limit(CaseInsensitiveDict()) == RateLimit(None, None, None, None)


@pytest.mark.parametrize("bad", ["", "abc", "-1", "nan", "inf", "-inf", "1,5"])
def test_malformed_numbers_are_none_not_an_error(bad):
    headers = CaseInsensitiveDict({"X-RateLimit-Limit": bad, "X-RateLimit-Remaining": bad,
                                   "X-RateLimit-Reset-After": bad, "X-RateLimit-Bucket": ""})
    assert read_rate_limit(headers) == RateLimit(None, None, None, None)


def test_counts_given_as_decimals_are_truncated_and_a_long_reset_is_capped():
    headers = CaseInsensitiveDict({"X-RateLimit-Limit": "5.0", "X-RateLimit-Remaining": " 2 ",
                                   "X-RateLimit-Reset-After": "1e9"})
    assert read_rate_limit(headers) == RateLimit(None, 5, 2, MAX_WAIT_SEC)


# Retry policy


class FixedRandom:
    """An rng whose random() always returns `value`: pins the jitter to its ends."""

    def __init__(self, value):
        self.value = value

    def random(self):
        return self.value


CEILINGS = [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0]


def test_backoff_doubles_from_half_a_second_up_to_a_few_seconds():
    policy = RetryPolicy()
    assert [policy.backoff(n, FixedRandom(0.0)) for n in range(1, 11)] == [c / 2 for c in CEILINGS]
    assert [policy.backoff(n, FixedRandom(1.0)) for n in range(1, 11)] == CEILINGS


def test_backoff_with_a_seeded_rng_is_exact_and_within_half_to_all_of_the_ceiling():
    draws = random.Random(1234)
    expected = [c * (0.5 + 0.5 * draws.random()) for c in CEILINGS]
    rng = random.Random(1234)
    assert [RetryPolicy().backoff(n, rng) for n in range(1, 11)] == expected
    assert all(c / 2 <= value <= c for c, value in zip(CEILINGS, expected))


def test_backoff_of_a_huge_attempt_is_the_cap_without_overflow():
    assert RetryPolicy(base=1.0, cap=30.0).backoff(10**9, FixedRandom(1.0)) == 30.0


def test_a_custom_policy_uses_its_own_base_and_cap():
    policy = RetryPolicy(base=0.1, cap=0.3, max_attempts=3)
    assert [policy.backoff(n, FixedRandom(1.0)) for n in (1, 2, 3)] == [0.1, 0.2, 0.3]


def test_gives_up_after_max_attempts_failed_attempts():
    policy = RetryPolicy(max_attempts=4)
    assert [policy.gives_up(n) for n in range(1, 6)] == [False, False, False, True, True]
    assert RetryPolicy().gives_up(9) is False and RetryPolicy().gives_up(10) is True
