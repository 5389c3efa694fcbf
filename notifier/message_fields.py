"""A webhook message's fields besides content and embeds, held to Discord's rules at the
door, so that none of them earns a 400 from Discord.

What Discord documents for executing a webhook (its Webhook, Message, Poll and Channel
resources). A text over its limit is cut to it, ending in "…" (as `payload.fit` cuts
embed texts); any other value that breaks a rule is refused with `FieldError`:

    username          a string of 1-80 characters, not blank, without "clyde" or
                      "discord" in any case (words Discord refuses in a webhook's name)
    avatar_url        an http or https URL with a host
    thread_name       a string of 1-100 characters, not blank (a forum post's title)
    tts               true or false
    flags             SUPPRESS_EMBEDS (4) and SUPPRESS_NOTIFICATIONS (4096) only: the third
                      flag a webhook may set, IS_COMPONENTS_V2, excludes content, embeds
                      and polls, one of which every message the relay posts has
    applied_tags      at most 5 tag ids
    allowed_mentions  parse: "roles", "users", "everyone"; roles and users: at most 100
                      ids each, and not a list whose type parse names too
    poll              question: a text of at most 300 characters, not blank; answers: 1 to
                      10, each a text of at most 55; duration: 1 to 768 hours (32 days)

A null value stands for a field left out, as it does for Discord. Pure functions.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Callable
from urllib.parse import urlsplit

from notifier.payload import ELLIPSIS

LIMITS = MappingProxyType({
    "username": 80,
    "thread_name": 100,
    "applied_tags": 5,
    "allowed_mentions.ids": 100,
    "poll.question": 300,
    "poll.answers": 10,
    "poll.answer": 55,
    "poll.duration": 768,
})
"""Characters for a text, a count for a list, hours for a poll's duration."""

REFUSED_NAME_WORDS = ("clyde", "discord")
FLAGS = {"SUPPRESS_EMBEDS": 1 << 2, "SUPPRESS_NOTIFICATIONS": 1 << 12}
MENTION_TYPES = ("roles", "users", "everyone")


class FieldError(ValueError):
    """A field Discord would refuse; the message names it and says what to send."""


def conform(payload: dict) -> dict:
    """`payload` with its fields held to Discord's rules: itself if all hold, else a copy
    with the texts over their limits cut. Raises `FieldError` for a value that cannot
    be posted."""
    changed = {}
    for key in _CHECKS.keys() & payload.keys():
        value = payload[key]
        if value is not None:
            held = _CHECKS[key](value, key)
            if held is not value:
                changed[key] = held
    return {**payload, **changed} if changed else payload


def _text(value: Any, name: str, limit: int) -> str:
    """A string that is not blank, cut to `limit` characters."""
    if not isinstance(value, str):
        raise FieldError(f"{name} must be a string")
    if not value.strip():
        raise FieldError(f"{name} is blank")
    return value if len(value) <= limit else value[:limit - 1] + ELLIPSIS


def _username(value: Any, name: str) -> str:
    if isinstance(value, str):
        if not value.strip():
            raise FieldError(f"{name} is blank: leave it out to post under the webhook's "
                             "own name")
        for word in REFUSED_NAME_WORDS:
            if word in value.lower():
                raise FieldError(f"{name} contains {word!r}, which Discord refuses in a "
                                 "webhook's name")
    return _text(value, name, LIMITS["username"])


def _url(value: Any, name: str) -> str:
    try:
        parts = urlsplit(value) if isinstance(value, str) else None
    except ValueError:
        parts = None
    if (parts is None or parts.scheme.lower() not in ("http", "https") or not parts.hostname
            or not value.isprintable() or " " in value):
        raise FieldError(f"{name} must be an http or https URL")
    return value


def _thread_name(value: Any, name: str) -> str:
    return _text(value, name, LIMITS["thread_name"])


def _boolean(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise FieldError(f"{name} must be true or false")
    return value


def _flags(value: Any, name: str) -> int:
    allowed = sum(FLAGS.values())
    if not _is_int(value) or value < 0 or value & ~allowed:
        raise FieldError(f"{name} may set only " + " and ".join(
            f"{flag} ({bit})" for flag, bit in FLAGS.items()))
    return value


def _ids(value: Any, name: str, limit: int) -> list:
    if not isinstance(value, list) or not all(_is_id(item) for item in value):
        raise FieldError(f"{name} must be a list of ids (snowflakes)")
    if len(value) > limit:
        raise FieldError(f"{name} holds {len(value)} ids; Discord takes at most {limit}")
    return value


def _applied_tags(value: Any, name: str) -> list:
    return _ids(value, name, LIMITS["applied_tags"])


def _allowed_mentions(value: Any, name: str) -> dict:
    if not isinstance(value, dict):
        raise FieldError(f"{name} must be an object")
    parse = value.get("parse")
    if parse is not None and not (isinstance(parse, list)
                                  and all(kind in MENTION_TYPES for kind in parse)):
        raise FieldError(f"{name}.parse must be a list of " + ", ".join(map(repr, MENTION_TYPES)))
    for kind in ("roles", "users"):
        if value.get(kind) is not None:
            _ids(value[kind], f"{name}.{kind}", LIMITS["allowed_mentions.ids"])
            if value[kind] and parse and kind in parse:
                raise FieldError(f"{name} names {kind!r} in parse and lists {kind} too: "
                                 "give one or the other")
    if value.get("replied_user") is not None:
        _boolean(value["replied_user"], f"{name}.replied_user")
    return value


def _poll(value: Any, name: str) -> dict:
    if not isinstance(value, dict):
        raise FieldError(f"{name} must be an object")
    question, answers = value.get("question"), value.get("answers")
    if not isinstance(question, dict):
        raise FieldError(f"{name}.question must be an object with a text")
    text = _text(question.get("text"), f"{name}.question.text", LIMITS["poll.question"])
    limit = LIMITS["poll.answers"]
    if not (isinstance(answers, list) and 0 < len(answers) <= limit
            and all(isinstance(answer, dict) and isinstance(answer.get("poll_media"), dict)
                    for answer in answers)):
        raise FieldError(f"{name}.answers must be a list of 1 to {limit} objects, each with "
                         "a poll_media object")
    held = [_answer(answer, f"{name}.answers[{i}]") for i, answer in enumerate(answers)]
    duration = value.get("duration")
    if duration is not None and not (_is_int(duration)
                                     and 0 < duration <= LIMITS["poll.duration"]):
        raise FieldError(f"{name}.duration must be 1 to {LIMITS['poll.duration']} hours")
    if value.get("allow_multiselect") is not None:
        _boolean(value["allow_multiselect"], f"{name}.allow_multiselect")
    if text is question["text"] and all(new is old for new, old in zip(held, answers)):
        return value
    return {**value, "question": {**question, "text": text}, "answers": held}


def _answer(answer: dict, name: str) -> dict:
    media = answer["poll_media"]
    text = _text(media.get("text"), f"{name}.poll_media.text", LIMITS["poll.answer"])
    return answer if text is media["text"] else {**answer, "poll_media": {**media, "text": text}}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_id(value: Any) -> bool:
    """A snowflake as JSON carries one: a string of digits or a non-negative integer."""
    if isinstance(value, str):
        return 0 < len(value) <= 20 and value.isascii() and value.isdigit()
    return _is_int(value) and 0 <= value < 1 << 64


_CHECKS: dict[str, Callable[[Any, str], Any]] = {
    "username": _username,
    "avatar_url": _url,
    "thread_name": _thread_name,
    "tts": _boolean,
    "flags": _flags,
    "applied_tags": _applied_tags,
    "allowed_mentions": _allowed_mentions,
    "poll": _poll,
}
