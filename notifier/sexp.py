"""S-expressions shared with the Lisp (SBCL) side: a safe reader, a writer, the Python view.

The reader is a data parser, never an evaluator: it knows lists, dotted pairs, strings,
numbers, symbols and a few ``#`` forms SBCL prints (``#A((n) base-char . "...")``,
``#t``/``#f``), and refuses everything else (``#.`` above all) with a `SexpError` that
carries the line and column. It is iterative, so nesting is limited by `max_depth`, not
by Python's recursion limit, and input over `max_bytes` is refused before any work.
Each token means what it means to SBCL 2.2.9's reader, number or symbol, value, case
and all (`notifier.sbcl_tokens`); whitespace and invalid characters are SBCL's too.

Two views of what was read:

* the Lisp view (`read`): ``nil``/``()`` -> None, ``t``/``#t`` -> True, ``#f`` -> False,
  integers, `Fraction` for ratios, floats (`WrittenFloat`, keeping the token, with
  ``written_floats=True``), strings, `Symbol`, proper lists -> `list`, improper lists ->
  `DottedList`;
* the Python view (`loads` or `to_python`): the same, except that an alist (a non-empty
  proper list whose every element is a cons with a symbol car) becomes an `Alist`, an
  ordered dict whose values are each entry's cdr and whose lookups ignore package prefix,
  case, a leading ``:`` and ``-``/``_``.

The writer (`dumps`) prints Python data so that SBCL reads back the same data: only ``"``
and ``\\`` are escaped in strings, floats carry ``d`` (double), True/False/None are
``t``/``nil``/``nil``, mappings become alists with lowercase symbol keys (bars where the
key is not a plain lowercase name), and NaN or infinities are refused.

`read_entries` keeps the exact source text of each entry of a top-level alist, so a file
written by Lisp can be rewritten with the untouched entries byte for byte as they were.
"""

from __future__ import annotations

import decimal
import functools
import math
import re
import sys
from fractions import Fraction
from typing import Any, NamedTuple

from notifier import sbcl_tokens

__all__ = [
    # errors and limits
    "SexpError", "MAX_DEPTH", "MAX_BYTES", "quote",
    # data types
    "Symbol", "DottedList", "Alist", "WrittenFloat",
    # reading
    "read", "read_alist", "loads", "to_python", "alist_entries", "read_entries", "Entry", "normalize_key",
    # writing
    "dumps", "symbol_token",
]

MAX_DEPTH = 64
"""Deepest list nesting accepted; real envelopes and metrics files nest 7 levels at most."""

MAX_BYTES = 1 << 20
"""Largest input accepted (1 MiB); the relay applies its own, smaller envelope cap first."""


class SexpError(ValueError):
    """Any input the reader refuses, or data the writer cannot print, with its position."""

    def __init__(self, message: str, line: int = 0, column: int = 0):
        self.reason = message
        self.line = line
        self.column = column
        where = f" at line {line}, column {column}" if line else ""
        super().__init__(message + where)


class Symbol:
    """A Lisp symbol as data (immutable): its name as Lisp holds it and its package.

    `package` is None for an unqualified symbol, ``"KEYWORD"`` for ``:foo``, otherwise the
    package name as written (upcased like the name). `text` is the name as SBCL prints it
    with ``*print-case* :downcase``, without package: the key in the Python view.
    """

    __slots__ = ("name", "package", "text")

    def __init__(self, name: str, package: str | None = None):
        set_slot = object.__setattr__
        set_slot(self, "name", name)
        set_slot(self, "package", package)
        set_slot(self, "text", sbcl_tokens.printed_case(name))

    def __setattr__(self, attribute: str, value: Any) -> None:
        raise AttributeError("Symbol is immutable")

    @property
    def is_keyword(self) -> bool:
        return self.package == "KEYWORD"

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Symbol) and self.name == other.name
                and self.package == other.package)

    def __hash__(self) -> int:
        return hash((self.name, self.package))

    def __repr__(self) -> str:
        return f"Symbol({symbol_token(self)!r})"


class DottedList:
    """An improper list ``(a b . c)``: `items` then a non-list `tail`."""

    __slots__ = ("items", "tail")

    def __init__(self, items: list, tail: Any):
        self.items = items
        self.tail = tail

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, DottedList) and self.items == other.items
                and self.tail == other.tail)

    __hash__ = None  # mutable, like list

    def __repr__(self) -> str:
        return f"DottedList({self.items!r}, {self.tail!r})"


class WrittenFloat(float):
    """A float that keeps the token it was read from (``read(..., written_floats=True)``),
    for a reader of Lisp's files who wants them shown as Lisp printed them: `dumps`
    prints the token. `single`: SBCL holds it as a single float (no marker, or ``e``,
    ``s``, ``f``), not a double (``d``, ``l``)."""

    __slots__ = ("token",)

    def __new__(cls, value: float, token: str):
        self = super().__new__(cls, value)
        self.token = token
        return self

    @property
    def single(self) -> bool:
        return not any(marker in self.token for marker in "dDlL")

    def __repr__(self) -> str:
        return f"WrittenFloat({float(self)!r}, {self.token!r})"


@functools.lru_cache(maxsize=1024)
def normalize_key(key: str) -> str:
    """The form under which alist keys are compared: ``swimmy.core::Schema-Version`` and
    ``:schema_version`` are both ``schema_version``. (Memoized: keys repeat endlessly.)"""
    key = key.rpartition(":")[2] if ":" in key else key
    return key.lower().replace("-", "_")


class Alist(dict):
    """An alist read from Lisp: an ordered dict keyed by each symbol's printed name.

    Lookups (`[]`, `get`, `in`) that miss the exact key retry with `normalize_key`, so
    ``metrics["heap_used_mb"]`` finds ``swimmy.school::heap_used_mb``; they find the first
    entry under that name, as Lisp's ``assoc`` does. Of entries printed alike, only the
    first is kept.
    """

    __slots__ = ("_index",)

    def __init__(self, entries=()):
        entries = list(entries)
        super().__init__(entries)
        if len(self) != len(entries):  # a repeated key: keep the first, like assoc
            dict.clear(self)
            for key, value in entries:
                self.setdefault(key, value)
        self._index: dict[str, str] | None = None  # built on the first inexact lookup

    def _resolve(self, key: Any) -> Any:
        if isinstance(key, str) and not dict.__contains__(self, key):
            if self._index is None:
                self._index = {}
                for name in self:
                    self._index.setdefault(normalize_key(name), name)
            return self._index.get(normalize_key(key), key)
        return key

    def __getitem__(self, key: Any) -> Any:
        return dict.__getitem__(self, self._resolve(key))

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, self._resolve(key))

    def get(self, key: Any, default: Any = None) -> Any:
        return dict.get(self, self._resolve(key), default)

    def __setitem__(self, key: str, value: Any) -> None:
        dict.__setitem__(self, self._resolve(key), value)
        self._index = None

    def __delitem__(self, key: str) -> None:
        dict.__delitem__(self, self._resolve(key))
        self._index = None


# --------------------------------------------------------------------------- reader

# SBCL's standard syntax: whitespace is space, tab, newline, return and page (not
# vertical tab, a constituent); backspace and rubout are invalid in a token unless escaped.
_WS = r"[ \t\n\r\f]"
_STR = r'[^"\\]*+(?:\\.[^"\\]*+)*+'
_BAR = r"\|[^|\\]*+(?:\\.[^|\\]*+)*+\|"
_ATOM_RE = (rf"""(?:[^ \t\n\r\f()";'`,|\\\#\x08\x7f]|\\.|{_BAR})"""
            rf"""(?:[^ \t\n\r\f()";'`,|\\\x08\x7f]++|\\.|{_BAR})*+""")

# One alternative per token kind; `lastindex` tells which matched. A whole
# ``(key . "string")`` or ``(key . atom)`` entry, by far the most common list in envelopes
# and metrics files, is one token. The last alternatives match any single character and
# the end, so that finditer never skips text silently.
_TOKEN = re.compile(rf"""
    {_WS}*+
    (?:
      ( \( {_WS}*+ ({_ATOM_RE}) {_WS}++ \. {_WS}++
        (?: "({_STR})" | ({_ATOM_RE}) ) {_WS}*+ \) )   # 1 pair: 2 key, 3 string or 4 atom
    | (\()                                              # 5 open
    | (\))                                              # 6 close
    | "({_STR})"                                        # 7 string body
    | ({_ATOM_RE})                                      # 8 atom
    | (\#.?)                                            # 9 dispatch macro
    | (;[^\n]*+)                                        # 10 comment
    | (.)                                               # 11 anything else: an error
    | ()\Z                                              # 12 end of input
    )""", re.VERBOSE | re.DOTALL)

# The fast path of `read_alist`: a flat alist read one whole entry per step.
_FLAT_OPEN = re.compile(rf"{_WS}*+\(")
_FLAT_PAIR = re.compile(rf"""{_WS}*+ \( {_WS}*+ ({_ATOM_RE}) {_WS}++ \. {_WS}++
                            (?: "({_STR})" | ({_ATOM_RE}) ) {_WS}*+ \)""", re.VERBOSE | re.DOTALL)
_FLAT_CLOSE = re.compile(rf"{_WS}*+\){_WS}*+\Z")

_PAIR, _OPEN, _CLOSE, _STRING, _ATOM, _HASH, _COMMENT, _OTHER, _END = 1, *range(5, 13)

_ESCAPED = re.compile(r"\\(.)", re.DOTALL)
_DOT = object()  # the consing dot inside a list


def _unescape(body: str) -> str:
    """Lisp string escapes: a backslash makes the next character literal, whatever it is.

    Lisp itself only escapes ``"`` and ``\\``; those are undone with `str.replace`, which
    pairs backslashes left to right just as the reader does (a run of backslashes always
    starts a new escape), at a fraction of the cost of the general regex."""
    if "\\" not in body:
        return body
    if "\0" not in body:
        plain = body.replace("\\\\", "\0").replace('\\"', '"')
        if "\\" not in plain:
            return plain.replace("\0", "\\")
    return "".join(_ESCAPED.split(body))


def _position(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    return line, offset - text.rfind("\n", 0, offset)


QUOTE_CHARS = 40
"""Most characters of the input an error message quotes: a hostile token of a megabyte
must not travel into a log line or a file that reports the error."""


def quote(value: Any) -> str:
    """`value` as an error message shows it: its repr, cut to QUOTE_CHARS characters."""
    shown = repr(value)
    return shown if len(shown) <= QUOTE_CHARS else shown[:QUOTE_CHARS - 1] + "…"


def _fail(text: str, offset: int, message: str) -> SexpError:
    return SexpError(message, *_position(text, offset))


def _decode(data: bytes | str, max_bytes: int) -> str:
    if isinstance(data, str):
        if len(data) > max_bytes:
            raise SexpError(f"input of {len(data)} characters is over the {max_bytes} limit")
        text = data
    else:
        if len(data) > max_bytes:
            raise SexpError(f"input of {len(data)} bytes is over the {max_bytes} limit")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            column = exc.start - data.rfind(b"\n", 0, exc.start)
            raise SexpError(f"invalid UTF-8 (byte 0x{data[exc.start]:02x})",
                            line, column) from None
    return text[1:] if text.startswith("\ufeff") else text


_LISP_PACKAGES = {"CL", "COMMON-LISP", "CL-USER", "COMMON-LISP-USER"}


def _symbol_parts(token: str) -> tuple[str | None, str]:
    """The package (None if unqualified) and name of a symbol token, as SBCL's reader
    makes them: bars and backslashes escape, each run of unescaped characters goes through
    `sbcl_tokens.name_case` (a run goes on across empty bars ``||``, which add no
    character), and one package marker (``:`` or ``::``) at most, with something after
    it. ``:x`` and ``::x`` are keywords; ``||:x`` names the package ``""``. A colon right
    after a sign and a dot is part of the name (``+.:x``): SBCL's reader has no package
    marker in that state."""
    package, parts, plain, barred = None, [], [], False
    i, n = 0, len(token)
    plain_colon = 2 if token[:3] in ("+.:", "-.:") else -1

    def escaped(text: str) -> None:
        if text:
            parts.append(sbcl_tokens.name_case("".join(plain)))
            plain.clear()
            parts.append(text)

    while i < n:
        c = token[i]
        if c == "\\":
            escaped(token[i + 1])
            i += 2
        elif c == "|":
            end = i + 1
            while token[end] != "|":
                end += 2 if token[end] == "\\" else 1
            escaped(_unescape(token[i + 1:end]))
            barred = True
            i = end + 1
        elif c == ":" and i != plain_colon:
            if package is not None:
                raise SexpError(f"bad package marker in symbol {quote(token)}: more than one")
            package = ("".join(parts) + sbcl_tokens.name_case("".join(plain))
                       if parts or plain or barred else "KEYWORD")
            parts, plain = [], []
            i += 2 if token.startswith("::", i) else 1
            if i == n:
                raise SexpError(f"bad package marker in symbol {quote(token)}: nothing after it")
        else:
            end = i
            while end < n and (token[end] not in "\\|:" or end == plain_colon):
                end += 1
            plain.append(token[i:end])
            i = end
    return package, "".join(parts) + sbcl_tokens.name_case("".join(plain))


def _symbol(package: str | None, name: str) -> Any:
    if name in ("NIL", "T") and (package is None or package in _LISP_PACKAGES):
        return None if name == "NIL" else True
    return Symbol(name, package)


_ESCAPES_OR_MARKER = re.compile(r"[|\\:]")


@functools.lru_cache(maxsize=1024)
def _atom_value(token: str) -> Any:
    """What an atom token means, as SBCL's reader decides (`sbcl_tokens`). Memoized:
    keys and small values repeat endlessly, and every result is immutable."""
    if _ESCAPES_OR_MARKER.search(token) is not None:  # a symbol
        return _symbol(*_symbol_parts(token))
    try:
        value = sbcl_tokens.number(token)
    except ValueError as exc:
        raise SexpError(f"{exc}: {quote(token)}") from None
    if value is not sbcl_tokens.NOT_A_NUMBER:
        return value
    if not token.strip("."):
        raise SexpError(f"a token of only dots {quote(token)} is not data")
    return _symbol(None, sbcl_tokens.name_case(token))


def _atom(token: str, text: str, offset: int) -> Any:
    try:
        return _atom_value(token)
    except SexpError as exc:
        raise _fail(text, offset, exc.reason) from None


def _written_atom(token: str, text: str, offset: int) -> Any:
    """`_atom`, floats kept with their token (see `WrittenFloat`)."""
    value = _atom(token, text, offset)
    return WrittenFloat(value, token) if type(value) is float else value


def _base_string(form: Any, text: str, offset: int) -> str:
    """``#A((n) base-char . "...")``: SBCL's readable print of a base string."""
    if (isinstance(form, DottedList) and len(form.items) == 2
            and isinstance(form.tail, str) and isinstance(form.items[0], list)
            and form.items[0] == [len(form.tail)]
            and isinstance(form.items[1], Symbol)
            and form.items[1].name in ("BASE-CHAR", "CHARACTER")):
        return form.tail
    raise _fail(text, offset, "unsupported #A array (only base strings are data here)")


class _Frame:
    """A list being read: its items, where it opened, and the state of a dotted tail."""

    __slots__ = ("items", "start", "dot", "tail", "base_string")

    def __init__(self, start: int, base_string: bool = False):
        self.items: list = []
        self.start = start
        self.dot = 0  # 0: no dot yet, 1: dot seen, expecting the tail, 2: tail read
        self.tail: Any = None
        self.base_string = base_string


def _parse(text: str, max_depth: int, spans: list | None = None,
           written_floats: bool = False) -> Any:
    """Read exactly one datum from `text`; if `spans` is a list, append the (start, end)
    offsets of each element of a top-level list to it."""
    atom = _written_atom if written_floats else _atom
    stack: list[_Frame] = []
    frame: _Frame | None = None
    result: Any = _DOT  # sentinel: nothing read yet
    pending_hash_a = False
    for match in _TOKEN.finditer(text):
        kind = match.lastindex
        if kind == _PAIR:
            key = atom(match[2], text, match.start(2))
            string = match[3]
            value = (_unescape(string) if string is not None
                     else atom(match[4], text, match.start(4)))
            value = [key] if value is None else DottedList([key], value)
            if frame is not None and len(stack) + 1 >= max_depth:
                raise _fail(text, match.start(kind), f"nesting deeper than {max_depth}")
        elif kind == _STRING:
            value = _unescape(match[_STRING])
        elif kind == _ATOM:
            token = match[_ATOM]
            value = _DOT if token == "." else atom(token, text, match.start(kind))
        elif kind == _OPEN:
            if frame is not None:
                if len(stack) + 1 >= max_depth:
                    raise _fail(text, match.start(kind), f"nesting deeper than {max_depth}")
                stack.append(frame)
            elif result is not _DOT:
                raise _fail(text, match.start(kind), "text after the datum")
            frame = _Frame(match.start(kind), pending_hash_a)
            pending_hash_a = False
            continue
        elif kind == _CLOSE:
            if frame is None:
                raise _fail(text, match.start(kind), "unbalanced ')'")
            if frame.dot == 1:
                raise _fail(text, match.start(kind), "nothing after the dot")
            value = _finish(frame)
            if frame.base_string:
                value = _base_string(value, text, frame.start)
            if spans is not None and len(stack) == 1:
                spans.append((frame.start, match.end(kind)))
            frame = stack.pop() if stack else None
            if frame is None:
                result = _store_top(result, value, text, match.start(kind))
            else:
                _add(frame, value, text, match.start(kind))
            continue
        elif kind == _HASH:
            value = _dispatch(match[_HASH], text, match.start(kind))
            if value is _HASH_A:
                pending_hash_a = True
                continue
        elif kind == _END:
            break
        elif kind == _COMMENT:
            continue
        else:
            raise _unexpected(match[_OTHER], text, match.start(kind))
        if pending_hash_a:
            raise _fail(text, match.start(kind), "#A must be followed by a list")
        if frame is None:
            if value is _DOT:
                raise _fail(text, match.start(kind), "a dot outside a list")
            result = _store_top(result, value, text, match.start(kind))
            continue
        if spans is not None and not stack and value is not _DOT:
            spans.append(match.span(kind))
        if frame.dot == 0 and value is not _DOT:
            frame.items.append(value)
        else:
            _add(frame, value, text, match.start(kind))
    if frame is not None:
        raise _fail(text, frame.start, "unbalanced '(': the list is never closed")
    if pending_hash_a:
        raise _fail(text, len(text), "#A must be followed by a list")
    if result is _DOT:
        raise SexpError("no datum: the input is empty")
    return result


_HASH_A = object()


def _dispatch(token: str, text: str, offset: int) -> Any:
    second = token[1:]
    if second in ("t", "T") and _ends_token(text, offset + 2):
        return True
    if second in ("f", "F") and _ends_token(text, offset + 2):
        return False
    if second in ("a", "A") and text.startswith("(", offset + 2):
        return _HASH_A
    if second == ".":
        raise _fail(text, offset, "read-time evaluation (#.) is refused")
    if second == "":
        raise _fail(text, offset, "'#' at the end of the input")
    raise _fail(text, offset, f"unsupported '#{second}' form")


def _ends_token(text: str, offset: int) -> bool:
    return offset >= len(text) or text[offset] in " \t\n\r\f\v()\";"


def _unexpected(char: str, text: str, offset: int) -> SexpError:
    if char == '"':
        return _fail(text, offset, "unterminated string")
    if char == "|":
        return _fail(text, offset, "unterminated |symbol|")
    if char == "\\":
        return _fail(text, offset, "a backslash at the end of the input")
    if char in "'`,":
        return _fail(text, offset, f"quote and backquote forms ({char!r}) are not data")
    return _fail(text, offset, f"unexpected character {char!r}")


def _add(frame: _Frame, value: Any, text: str, offset: int) -> None:
    if value is _DOT:
        if not frame.items or frame.dot:
            raise _fail(text, offset, "misplaced dot")
        frame.dot = 1
    elif frame.dot == 0:
        frame.items.append(value)
    elif frame.dot == 1:
        frame.tail = value
        frame.dot = 2
    else:
        raise _fail(text, offset, "more than one datum after the dot")


def _finish(frame: _Frame) -> Any:
    items, tail = frame.items, frame.tail
    if not items:
        return None
    if tail is None:
        return items
    if isinstance(tail, list):
        return items + tail
    if isinstance(tail, DottedList):
        return DottedList(items + tail.items, tail.tail)
    return DottedList(items, tail)


def _store_top(result: Any, value: Any, text: str, offset: int) -> Any:
    if result is not _DOT:
        raise _fail(text, offset, "text after the datum")
    return value


def read(data: bytes | str, *, max_depth: int = MAX_DEPTH, max_bytes: int = MAX_BYTES,
         written_floats: bool = False) -> Any:
    """Read one datum in the Lisp view (see the module docstring). Raises `SexpError`.
    With `written_floats`, floats come back as `WrittenFloat`, keeping their token."""
    return _parse(_decode(data, max_bytes), max_depth, written_floats=written_floats)


def loads(data: bytes | str, *, max_depth: int = MAX_DEPTH, max_bytes: int = MAX_BYTES,
          written_floats: bool = False) -> Any:
    """Read one datum in the Python view: alists become `Alist`. Raises `SexpError`."""
    return to_python(read(data, max_depth=max_depth, max_bytes=max_bytes,
                          written_floats=written_floats))


def _entry(item: Any) -> tuple[Symbol, Any] | None:
    """The (car, cdr) of a cons whose car is a symbol, else None."""
    kind = type(item)
    if kind is DottedList:
        items = item.items
        if type(items[0]) is Symbol:
            return items[0], (DottedList(items[1:], item.tail) if len(items) > 1
                              else item.tail)
    elif kind is list and type(item[0]) is Symbol:
        return item[0], (item[1:] or None)
    return None


def alist_entries(value: Any) -> list[tuple[Symbol, Any]] | None:
    """The (key, value) entries of an alist in the Lisp view, or None if `value` is not
    an alist (a non-empty proper list of conses with symbol cars)."""
    if type(value) is not list:
        return None
    entries = []
    for item in value:
        entry = _entry(item)
        if entry is None:
            return None
        entries.append(entry)
    return entries


def to_python(value: Any) -> Any:
    """Convert a Lisp-view datum to the Python view: alists become `Alist`, by the cdr
    rule, recursively. Symbols, ratios and dotted lists stay as they are."""
    if type(value) is not list:
        return value
    entries = alist_entries(value)
    if entries is None:
        return [to_python(item) for item in value]
    return Alist([(key.text, to_python(val)) for key, val in entries])


def _read_flat_alist(text: str) -> list[tuple[Any, Any]] | None:
    """Entries of a text that is only ``((key . atom-or-string) ...)``, else None."""
    match = _FLAT_OPEN.match(text)
    if match is None:
        return None
    entries = []
    next_pair, position = _FLAT_PAIR.match, match.end()
    while (match := next_pair(text, position)) is not None:
        key, string, atom = match.groups()
        key = _atom_value(key)
        if type(key) is not Symbol:
            return None
        entries.append((key, _unescape(string) if atom is None else _atom_value(atom)))
        position = match.end()
    if not entries or _FLAT_CLOSE.match(text, position) is None:
        return None
    return entries


def read_alist(data: bytes | str, *, max_depth: int = MAX_DEPTH,
               max_bytes: int = MAX_BYTES) -> list[tuple[Symbol, Any]] | None:
    """Read one datum and return its alist entries as ``(key, value)`` in the Lisp view,
    or None if it is not an alist. Same result as ``alist_entries(read(data))``, but a
    flat alist of atoms and strings (an envelope, a metrics file) is read in one step
    per entry, several times faster; anything else, errors included, goes through the
    general reader."""
    text = _decode(data, max_bytes)
    try:
        entries = _read_flat_alist(text) if max_depth >= 2 else None
    except SexpError:  # let the general reader report it, with its position
        entries = None
    if entries is not None:
        return entries
    return alist_entries(_parse(text, max_depth))


class Entry(NamedTuple):
    """One entry of a top-level alist: its key, its value (Python view) and its text."""

    key: Symbol
    value: Any
    source: str


def read_entries(data: bytes | str, *, max_depth: int = MAX_DEPTH,
                 max_bytes: int = MAX_BYTES) -> list[Entry]:
    """Read a top-level alist keeping each entry's exact source text, so that a rewrite
    can put back untouched entries as Lisp printed them. ``nil`` gives no entries."""
    text = _decode(data, max_bytes)
    spans: list[tuple[int, int]] = []
    value = _parse(text, max_depth, spans)
    if value is None:
        return []
    entries = alist_entries(value)
    if entries is None:
        raise SexpError("the file is not an alist of (key . value) entries")
    return [Entry(key, to_python(val), text[start:end])
            for (key, val), (start, end) in zip(entries, spans)]


# --------------------------------------------------------------------------- writer

_PLAIN_NAME = re.compile(r"[a-z_*][a-z0-9_*.+/<>=!?%&-]*\Z")
_BAR_ESCAPE = re.compile(r"[|\\]")


def _bars(name: str) -> str:
    return "|" + _BAR_ESCAPE.sub(r"\\\g<0>", name) + "|"


def _name_token(name: str) -> str:
    """Print a symbol name as Lisp holds it: lowercase when that reads back the same."""
    if name == name.upper():
        lower = name.lower()
        if _PLAIN_NAME.match(lower) and lower not in ("t", "nil"):
            return lower
    return _bars(name)


def symbol_token(symbol: Symbol) -> str:
    """How SBCL would print `symbol` (lowercase, bars where needed, package kept)."""
    name = _name_token(symbol.name)
    if symbol.package is None:
        return name
    if symbol.is_keyword:
        return ":" + name
    return _name_token(symbol.package) + "::" + name


def _key_token(key: Any) -> str:
    if isinstance(key, Symbol):
        return symbol_token(key)
    if not isinstance(key, str):
        raise SexpError(f"alist keys must be strings or symbols, not {type(key).__name__}")
    if _PLAIN_NAME.match(key) and key not in ("t", "nil"):
        return key
    return _bars(key)


def _double_token(decimal: str) -> str:
    """``1.5e-7`` -> ``1.5d-7``, ``2e+20`` -> ``2.0d20``."""
    mantissa, _, exponent = decimal.partition("e")
    if "." not in mantissa:
        mantissa += ".0"
    return f"{mantissa}d{int(exponent or 0)}"


def _float_token(value: float) -> str:
    if not math.isfinite(value):
        raise SexpError(f"{value!r} cannot be written: Lisp has no readable NaN or infinity")
    if value != 0 and abs(value) < sys.float_info.min:
        return _subnormal_token(value)
    return _double_token(repr(value))


def _subnormal_token(value: float) -> str:
    """The shortest token SBCL reads back as subnormal `value`: SBCL truncates subnormals
    where Python rounds, so Python's shortest digits may read one step lower there."""
    exact = decimal.Decimal(abs(value))
    for digits in range(1, 18):
        for rounding in (decimal.ROUND_HALF_EVEN, decimal.ROUND_CEILING):
            token = _double_token(f"{decimal.Context(digits, rounding=rounding).plus(exact):e}")
            if sbcl_tokens.number(token) == abs(value):
                return ("-" if value < 0 else "") + token
    raise AssertionError(f"no token for {value!r}")  # not reached: 17 digits rounded up do


def _write(value: Any, out: list[str]) -> None:
    if value is None or value is False:
        out.append("nil")
    elif value is True:
        out.append("t")
    elif isinstance(value, str):
        out.append('"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"')
    elif isinstance(value, int):
        out.append(str(value))
    elif isinstance(value, float):
        out.append(value.token if type(value) is WrittenFloat else _float_token(value))
    elif isinstance(value, dict):
        if not value:
            out.append("nil")
            return
        out.append("(")
        for i, (key, item) in enumerate(value.items()):
            out.append(" (" if i else "(")
            out.append(_key_token(key))
            out.append(" . ")
            _write(item, out)
            out.append(")")
        out.append(")")
    elif isinstance(value, (list, tuple)):
        if not value:
            out.append("nil")
            return
        out.append("(")
        for i, item in enumerate(value):
            if i:
                out.append(" ")
            _write(item, out)
        out.append(")")
    elif isinstance(value, Symbol):
        out.append(symbol_token(value))
    elif isinstance(value, Fraction):
        out.append(f"{value.numerator}/{value.denominator}")
    elif isinstance(value, DottedList):
        out.append("(")
        for item in value.items:
            _write(item, out)
            out.append(" ")
        out.append(". ")
        _write(value.tail, out)
        out.append(")")
    else:
        raise SexpError(f"cannot write a {type(value).__name__} as an S-expression")


def dumps(value: Any) -> str:
    """Print `value` so that SBCL reads back the same data (see the module docstring)."""
    out: list[str] = []
    _write(value, out)
    return "".join(out)

