"""Discord webhook payloads: fit one within Discord's limits, combine a backlog, report loss.

Discord refuses a webhook message over any of these limits (400, code 50035), counting
characters as code points:

    content          2000        embeds per message   10
    embed title       256        embed description  4096
    fields per embed   25        field name 256, field value 1024
    footer text      2048        author name         256
    all embed text   6000 per message: titles, descriptions, field names and values,
                     footer texts and author names of every embed together

and a message needs non-empty content, an embed or a poll.

`fit` turns one payload into the messages to post, in order, losing as little as it
can: long content is split (code blocks and inline code closed and reopened around each
cut, so a mention they quote never pings), an embed
with too many fields or too much text is continued in further embeds, embeds beyond one
message go in further messages, and only a single text over its own limit is cut, with
a visible "…". `combine` merges the front of one webhook's backlog into one request
without changing what a reader sees or in which order. `loss_notice` is the message
that tells a channel notifications meant for it were lost.

Everything here is a pure function of its arguments: no I/O, no clock. The caller's
dicts are never modified; results are new dicts that may share unchanged nested values
(an untouched embed, an `allowed_mentions` dict) with the input.
"""

from __future__ import annotations

import re
import unicodedata
from bisect import bisect_left, bisect_right
from datetime import datetime, timezone
from types import MappingProxyType

__all__ = [
    # limits
    "LIMITS", "ELLIPSIS", "fits", "embed_chars",
    # shaping
    "fit", "combine", "loss_notice",
]

LIMITS = MappingProxyType({
    "content": 2000,
    "embeds": 10,
    "title": 256,
    "description": 4096,
    "fields": 25,
    "field.name": 256,
    "field.value": 1024,
    "footer.text": 2048,
    "author.name": 256,
    "embed_total": 6000,
})
"""Discord's limits: characters (code points), or a count for "embeds" and "fields"."""

ELLIPSIS = "…"
"""Ends a text cut to its limit, so the reader sees that something is missing."""

_ONCE_KEYS = ("poll", "attachments", "components", "files")
"""Parts of a message that exist once: a split payload carries them on its last message
only (a poll or buttons posted twice would be two polls), and a message with one is
never combined with others."""

_ALONE_KEYS = ("thread_name",)
"""A message with one is always a request of its own, never combined: Discord makes a
new forum post of every request that names a thread, so two of them are two posts."""

_TAIL_KEYS = ("image", "footer", "timestamp")
"""Embed parts Discord draws below the fields: a continued embed carries them last."""

_SOFT_WINDOW = 500
"""How far back from the limit a content cut looks for a line break or a space."""

_CLOSING = "\n```"
_FENCE_INFO = re.compile(r"([\w+#.-]{0,20})\n")
_SPACE = re.compile(r"\s*")
_TICKS = re.compile(r"`+")
_ATOM = re.compile(r"\\?(?:<[^<>\s]{1,100}>|@everyone|@here)|\\[^0-9A-Za-z\s]")
"""What a cut must not split: a mention, emoji, channel or timestamp tag (``<...>``),
@everyone and @here, and a backslash with the character it escapes (split, a mention
it disarmed would ping)."""


# Limits


def embed_chars(payload: dict) -> int:
    """The characters of a message's embeds that count towards Discord's 6000 total."""
    embeds = payload.get("embeds")
    return sum(_size(_texts(embed)) for embed in embeds) if isinstance(embeds, list) else 0


def fits(payload: dict) -> bool:
    """Whether Discord accepts the payload's sizes as they are.

    Only sizes: a blank message or a wrongly typed value is Discord's to refuse, since
    nothing here could repair it.
    """
    content, embeds = payload.get("content"), payload.get("embeds")
    if isinstance(content, str) and len(content) > LIMITS["content"]:
        return False
    if not isinstance(embeds, list):
        return True
    if len(embeds) > LIMITS["embeds"]:
        return False
    total = 0
    for embed in embeds:  # one pass over each embed's texts: every envelope comes here
        if len(_fields(embed)) > LIMITS["fields"]:
            return False
        for text, limit in _texts(embed):
            if isinstance(text, str):
                if len(text) > limit:
                    return False
                total += len(text)
    return total <= LIMITS["embed_total"]


def _texts(embed):
    """(text, limit) for each text of an embed that counts towards the 6000 total."""
    if not isinstance(embed, dict):
        return
    yield embed.get("title"), LIMITS["title"]
    yield embed.get("description"), LIMITS["description"]
    for part, key in (("footer", "text"), ("author", "name")):
        if isinstance(embed.get(part), dict):
            yield embed[part].get(key), LIMITS[f"{part}.{key}"]
    for field in _fields(embed):
        yield from _field_texts(field)


def _field_texts(field):
    if isinstance(field, dict):
        yield field.get("name"), LIMITS["field.name"]
        yield field.get("value"), LIMITS["field.value"]


def _fields(embed):
    fields = embed.get("fields") if isinstance(embed, dict) else None
    return fields if isinstance(fields, list) else []


def _size(texts):
    return sum(len(text) for text, _ in texts if isinstance(text, str))


# Fitting one payload


def fit(payload: dict) -> list[dict]:
    """The messages to post for `payload`, in order, each within Discord's limits.

    A payload within the limits comes back as the only message, equal to itself. Else:
    content over 2000 characters is split into several messages (see `_split`); the
    embeds go with the last piece of content, and those that do not fit there (over 10,
    or over 6000 characters together) follow in further messages of their own. Every
    message carries the payload's other keys (username, avatar_url, allowed_mentions,
    tts, flags, thread_name...), except poll, attachments, components and files, which
    go on the last message only.
    """
    if fits(payload):
        return [dict(payload)]
    content, embeds = payload.get("content"), payload.get("embeds")
    shared = {key: value for key, value in payload.items()
              if key not in ("content", "embeds", *_ONCE_KEYS)}
    texts = _split(content) if isinstance(content, str) else [content]
    groups = _embed_groups(embeds) if isinstance(embeds, list) else [embeds]
    groups = [group for group in groups if group]
    messages = [{**shared, "content": text} for text in texts if text]
    if messages and groups:
        messages[-1]["embeds"] = groups.pop(0)
    messages += [{**shared, "embeds": group} for group in groups]
    once = {key: payload[key] for key in _ONCE_KEYS if key in payload}
    if once:
        if not messages:
            messages.append(dict(shared))
        messages[-1].update(once)
    # Only blank content leaves nothing to post: pass it on, and Discord's refusal says why.
    return messages or [dict(payload)]


def _split(text):
    """Content as chunks of at most 2000 characters, cut after the last line in the
    last 500 characters before the limit, else after the last word there, else anywhere
    that splits neither a code fence, a mention or an escape nor, if a few characters
    back avoid it, an emoji or an accented letter. A cut inside inline code is the last
    resort of each kind.

    Joined back, the chunks give the original text but for whitespace at the cuts,
    which is dropped: Discord trims it from each message anyway, and a chunk of
    whitespace alone would be refused. (Indentation opening a chunk inside a code
    block stays.) A code block cut in two is closed at the end of one chunk ("\\n```")
    and reopened with its language at the start of the next ("```py\\n"), and inline
    code likewise with its backticks, so what they quote (a mention above all) stays
    quoted. Other markdown that spans a cut (bold, spoilers, a ">>> " quote) is not
    carried over: it ends with its message.
    """
    limit = LIMITS["content"]
    if len(text) <= limit:
        return [text]
    fences = [match.start() for match in re.finditer("```", text)]
    spans = _code_spans(text, fences)
    marks = _Marks(text, fences, spans)
    reserve = len(_CLOSING) if fences or spans else 0  # room kept for closing a block
    chunks, pos = [], 0
    while True:
        language = _open_block(text, fences, pos)
        if language is None:
            pos = _SPACE.match(text, pos).end()
        if pos == len(text):
            return chunks
        opening = marks.ticks(pos) if language is None else f"```{language}\n"
        room = limit - len(opening)
        if len(text) - pos <= room:
            return chunks + [opening + text[pos:]]
        cut, drop = _cut(text, marks, pos, pos + room - reserve)
        closing = marks.ticks(cut) if _open_block(text, fences, cut) is None else _CLOSING
        chunks.append(opening + text[pos:cut].rstrip() + closing)
        pos = cut + drop


def _code_spans(text, fences):
    """(start, end) of each inline code span outside code blocks: a run of one or two
    backticks up to the next run of as many, with no fence between (longer runs are
    fences)."""
    runs = [(m.start(), m.end()) for m in _TICKS.finditer(text)
            if m.end() - m.start() < 3 and _open_block(text, fences, m.start()) is None]
    spans, i = [], 0
    while i < len(runs):
        start, end = runs[i]
        fence = bisect_left(fences, end)
        limit = fences[fence] if fence < len(fences) else len(text)
        closing = next((j for j in range(i + 1, len(runs)) if runs[j][0] >= limit
                        or runs[j][1] - runs[j][0] == end - start), None)
        if closing is not None and runs[closing][0] < limit:
            spans.append((start, runs[closing][1]))
            i = closing + 1
        else:
            i += 1
    return spans


class _Marks:
    """Where a cut in `text` falls: inside which inline code span, inside which atom."""

    def __init__(self, text, fences, spans):
        self.text, self.fences, self.spans = text, fences, spans
        self.starts = [start for start, _ in spans]
        self.atoms = [(m.start(), m.end()) for m in _ATOM.finditer(text)]
        self.atom_starts = [start for start, _ in self.atoms]

    def span(self, at):
        """The inline code span a cut at `at` would split, or None."""
        index = bisect_right(self.starts, at - 1) - 1
        if index >= 0 and at < self.spans[index][1]:
            return self.spans[index]
        return None

    def ticks(self, at):
        """The backticks that close (before `at`) or reopen (after it) its span."""
        span = self.span(at)
        if span is None:
            return ""
        start, _ = span
        return _TICKS.match(self.text, start).group()

    def in_span_badly(self, at, drop):
        """Whether a cut at `at` (dropping `drop` characters) splits a span where one
        side would keep none of its text (closed and reopened around nothing), or its
        backticks."""
        span = self.span(at)
        if span is None:
            return False
        start, end = span
        ticks = len(self.ticks(at))
        return (not self.text[start + ticks:at].strip()
                or not self.text[at + drop:end - ticks].strip())

    def splits_atom(self, at):
        index = bisect_right(self.atom_starts, at - 1) - 1
        return index >= 0 and at < self.atoms[index][1]


def _open_block(text, fences, index):
    """The language of the code block open at `index` ("" when it names none), or None
    outside code blocks. `fences` are the start positions of every "```" in `text`."""
    count = bisect_right(fences, index - 3)
    if count % 2 == 0:
        return None
    info = _FENCE_INFO.match(text, fences[count - 1] + 3)
    return info.group(1) if info else ""


def _cut(text, marks, start, end):
    """(cut, characters dropped there) to end a chunk text[start:cut], cut <= end."""
    low = max(start + 1, end - _SOFT_WINDOW)
    for inside_code in (False, True):
        for separator in ("\n", " "):
            at = text.rfind(separator, low, end + 1)
            while at != -1:
                if (marks.span(at) is not None) == inside_code and \
                        not marks.in_span_badly(at, 1):
                    return at, 1
                at = text.rfind(separator, low, at)
    fences = marks.fences
    for inside_code in (False, True):
        for at in range(end, max(start, end - 32), -1):
            if (_fence_around(fences, at) is None and not _joined(text, at)
                    and not marks.splits_atom(at)
                    and (marks.span(at) is not None) == inside_code
                    and not marks.in_span_badly(at, 0)):
                return at, 0
    fence = _fence_around(fences, end)
    return end if fence is None else fence, 0


def _fence_around(fences, at):
    """The start of the "```" a cut at `at` would split, or None."""
    index = bisect_left(fences, at) - 1
    return fences[index] if index >= 0 and at < fences[index] + 3 else None


def _joined(text, at):
    """Whether text[at - 1] and text[at] are parts of one visible character (or of one
    run of backticks)."""
    before, after = text[at - 1], text[at]
    if "\u200d" in (before, after):  # zero-width joiner
        return True
    if before == after == "`":  # cut in two, a run of backticks opens or closes another
        return True
    if (unicodedata.category(after) in ("Mn", "Mc", "Me")  # accents, variation selectors, keycaps
            or "\U0001f3fb" <= after <= "\U0001f3ff"  # skin tones
            or "\U000e0020" <= after <= "\U000e007f"):  # tag sequences (subdivision flags)
        return True
    if _is_regional(before) and _is_regional(after):  # flags pair up from the start of a run
        run = at - 1
        while run > 0 and _is_regional(text[run - 1]):
            run -= 1
        return (at - run) % 2 == 1
    return False


def _is_regional(char):
    return "\U0001f1e6" <= char <= "\U0001f1ff"


def _embed_groups(embeds):
    """Embeds, each continued as needed, grouped in order into messages' worth: at most
    10 and 6000 characters a message."""
    groups, size = [], 0
    for piece in (piece for embed in embeds for piece in _pieces(embed)):
        chars = _size(_texts(piece))
        if (not groups or len(groups[-1]) == LIMITS["embeds"]
                or size + chars > LIMITS["embed_total"]):
            groups.append([])
            size = 0
        groups[-1].append(piece)
        size += chars
    return groups


def _pieces(embed):
    """One embed as the embeds it takes: its texts clipped to their own limits, then,
    if it has over 25 fields or 6000 characters, continued in further embeds (which
    `_embed_groups` puts in further messages when together they pass the 6000).

    Continuing rather than cutting loses no field. The first piece keeps all that
    Discord draws above the fields, the last what it draws below them (image, footer,
    timestamp), and every piece the colour, so the pieces read as one card continued.
    A piece needs no further cut: title, description and author come to 4608 characters
    at most, a field to 1280, a footer to 2048.
    """
    if not isinstance(embed, dict):
        return [embed]
    embed = _clipped(embed)
    fields = _fields(embed)
    if len(fields) <= LIMITS["fields"] and _size(_texts(embed)) <= LIMITS["embed_total"]:
        return [embed]
    head = {key: value for key, value in embed.items() if key not in (*_TAIL_KEYS, "fields")}
    tail = {key: embed[key] for key in _TAIL_KEYS if key in embed}
    groups, size = [[]], _size(_texts(head))
    for field in fields:
        chars = _size(_field_texts(field))
        if groups[-1] and (len(groups[-1]) == LIMITS["fields"]
                           or size + chars > LIMITS["embed_total"]):
            groups.append([])
            size = 0
        groups[-1].append(field)
        size += chars
    if size + _size(_texts(tail)) > LIMITS["embed_total"]:
        groups.append([])
    link = {"color": embed["color"]} if "color" in embed else {}
    pieces = [head] + [dict(link) for _ in groups[1:]]
    for piece, group in zip(pieces, groups):
        if group:
            piece["fields"] = group
    pieces[-1].update(tail)
    return pieces


def _clipped(embed):
    """A copy of the embed with each text over its own limit cut to it."""
    embed = _clip_keys(embed, ("title", "description"))
    for part, key in (("footer", "text"), ("author", "name")):
        if isinstance(embed.get(part), dict):
            embed[part] = _clip_keys(embed[part], (key,), part + ".")
    if isinstance(embed.get("fields"), list):
        embed["fields"] = [_clip_keys(field, ("name", "value"), "field.") if isinstance(field, dict)
                           else field for field in embed["fields"]]
    return embed


def _clip_keys(part, keys, prefix=""):
    return {**part, **{key: _clip(part[key], LIMITS[prefix + key]) for key in keys if key in part}}


def _clip(text, limit):
    """`text` cut to exactly `limit` characters, the last one an ellipsis, if it is longer."""
    if isinstance(text, str) and len(text) > limit:
        return text[:limit - 1] + ELLIPSIS
    return text


# Combining a backlog


def combine(payloads: list[dict]) -> tuple[int, dict]:
    """How many messages from the front of one webhook's backlog go out as one request,
    and that request.

    `payloads` are fitted messages in posting order; at least the first is always taken,
    and alone it comes back as it is. Messages join while all of these hold, so only
    the messages a request replaces are ever looked at:

    * every key but content and embeds is equal (username, avatar_url, tts, flags,
      allowed_mentions...), and none has poll, attachments, components or files (each
      message keeps its own) or thread_name (each is a new forum post);
    * reading order is kept: Discord shows a message's content above its embeds, so no
      content may follow an embed. A run reads as content-only messages, then at most
      one with both, then embed-only messages;
    * content is not appended after content that leaves a code block, inline code or a
      ">>> " quote open, which would swallow it;
    * the joined content (each message's on its own line) stays within 2000
      characters, and the embeds within 10 and 6000 characters.
    """
    first = payloads[0]
    shared, taken = _shared(first), 0
    contents, embeds, length, chars = [], [], -1, 0  # length of the joined content so far
    for message in payloads:
        parts = _parts(message)
        if parts is None or _shared(message) != shared:
            break
        content, items = parts
        size = embed_chars(message)
        if content and (embeds or length + 1 + len(content) > LIMITS["content"]
                        or (contents and not _closed(contents[-1]))):
            break
        if len(embeds) + len(items) > LIMITS["embeds"] or chars + size > LIMITS["embed_total"]:
            break
        if content:
            contents.append(content)
            length += 1 + len(content)
        embeds += items
        chars += size
        taken += 1
    if taken < 2:
        return 1, first
    combined = dict(shared)
    if contents:
        combined["content"] = "\n".join(contents)
    if embeds:
        combined["embeds"] = embeds
    return taken, combined


def _shared(message):
    return {key: value for key, value in message.items() if key not in ("content", "embeds")}


def _parts(message):
    """(content, embeds) of a message that may join others, or None if it must go alone."""
    content, embeds = message.get("content") or "", message.get("embeds") or []
    if (not isinstance(content, str) or not isinstance(embeds, list) or not (content or embeds)
            or any(key in message for key in (*_ONCE_KEYS, *_ALONE_KEYS))):
        return None
    return content, embeds


def _closed(content):
    """Whether text on a new line after `content` reads as it would on its own: no
    code block or ">>> " quote left open, and no lone backtick that would make inline
    code of it (quoting a mention it has, or setting one free)."""
    if content.count("```") % 2 or ">>> " in content:
        return False
    if "`" not in content:
        return True
    fences = [match.start() for match in re.finditer("```", content)]
    ticks = sum(1 for m in _TICKS.finditer(content)
                if m.end() - m.start() < 3 and _open_block(content, fences, m.start()) is None)
    return ticks == 2 * len(_code_spans(content, fences))


# Reporting loss

LOSS_THREAD_NAME = "Notifications lost"


def loss_notice(dropped: int, failed: int, since_unix: float | None, *,
                forum: bool = False) -> dict:
    """The message posted to a webhook after notifications meant for it were lost, so
    the loss shows where they were expected, e.g. "⚠️ Notifications lost since
    2024-06-01 14:03 UTC: 37 dropped (relay queue full), 2 failed — see the relay log."

    A zero count is left out; `since_unix` (None to leave it out) is when the first of
    them was lost. Mentions are disabled: a notice never pings anyone. In a forum
    channel (`forum`) a message must create a thread: the notice gets one of its own.
    A webhook URL with ``?thread_id=`` posts it in that thread like the messages.
    """
    if dropped < 0 or failed < 0 or not dropped + failed:
        raise ValueError(f"nothing lost to report (dropped={dropped}, failed={failed})")
    counts = []
    if dropped:
        counts.append(f"{dropped} dropped (relay queue full)")
    if failed:
        counts.append(f"{failed} failed")
    since = ""
    if since_unix is not None:
        when = datetime.fromtimestamp(since_unix, timezone.utc)
        since = when.strftime(" since %Y-%m-%d %H:%M UTC")
    content = f"⚠️ Notifications lost{since}: {', '.join(counts)} — see the relay log."
    notice = {"content": content, "allowed_mentions": {"parse": []}}
    if forum:
        notice["thread_name"] = LOSS_THREAD_NAME
    return notice
