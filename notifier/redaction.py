"""What a person reads of hostile input: no token, no fragment of one, no control character.

Text quoted from an envelope (the preview of a refused one, a value a reason names) goes
through `hide_tokens`, then `escape_controls`, then is cut (`shorten`), in that order, so
that a cut never leaves the head of a token behind nor an escape makes it longer:

- everything after a webhook-like path is redacted: ``/webhook`` or ``/webhooks`` in any
  case, after and followed by any number of slashes however they are written (``/``,
  ``\\``, ``\\/``, ``%2F``, ``%252F``, ``\\u002f``), with the id after it kept when a
  slash ends it (digits glued to what follows may be the head of a token). A
  malformed URL (a doubled slash, ``/webhook/`` for ``/webhooks/``) carries its token as
  surely as a well-formed one, which `envelope.scrub` (the exact shape) redacts;
- so is every token-like run: TOKEN_RUN characters or more of a token's alphabet (a
  Discord token has 68), or a run of any length that a "…" cut off (it may be the head
  of a token).

`escape_controls` writes C0 and C1 control characters, and the Unicode line and
paragraph separators, as JSON-style escapes (``\\n``, ``\\u001b``), so that one log line
stays one line, no terminal sequence gets through, and JSON stays JSON.
"""

from __future__ import annotations

import re

TOKEN_RUN = 24
"""Characters of a token's alphabet in a row that are hidden wherever they appear: far
shorter than a Discord token, longer than the words and numbers a preview shows."""

REDACTED = "<redacted>"
CUT = "…"

_SLASH = r"(?:[/\\]|%(?:25)*(?:2f|5c)|u00(?:2f|5c))"
_AFTER_WEBHOOK_PATH = re.compile(
    rf"({_SLASH}+webhooks?(?:{_SLASH}*\d{{1,25}}(?={_SLASH}))?{_SLASH}*).+",
    re.IGNORECASE | re.DOTALL)
_TOKEN_RUN = re.compile(rf"[A-Za-z0-9_-]{{{TOKEN_RUN},}}|[A-Za-z0-9_-]+(?={CUT})")

_CONTROLS = [*range(0x20), *range(0x7f, 0xa0), 0x2028, 0x2029]
_ESCAPES = {code: f"\\u{code:04x}" for code in _CONTROLS}
_ESCAPES.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
"""Characters that would break a line, or could in a reader."""
_ESCAPES_BUT_NEWLINE = {code: text for code, text in _ESCAPES.items() if code != ord("\n")}
_CONTROL_BUT_NEWLINE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def hide_tokens(text: str) -> str:
    """`text` with whatever may be a webhook token replaced by REDACTED (see above)."""
    text = _AFTER_WEBHOOK_PATH.sub(rf"\1{REDACTED}", text, count=1)
    return _TOKEN_RUN.sub(REDACTED, text)


def shorten(text: str, limit: int) -> str:
    """`text` token-free and escaped, then cut to at most `limit` characters, ending in
    "…" if cut."""
    text = escape_controls(hide_tokens(text))
    return text if len(text) <= limit else text[:limit - 1] + CUT


def escape_controls(text: str, keep_newlines: bool = False) -> str:
    """`text` with every control character escaped (line feeds kept if asked: the lines
    of a traceback, the layout of indented JSON)."""
    pattern, table = ((_CONTROL_BUT_NEWLINE, _ESCAPES_BUT_NEWLINE) if keep_newlines
                      else (CONTROL, _ESCAPES))
    return text.translate(table) if pattern.search(text) else text
