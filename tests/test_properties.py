"""Hostile input, searched for systematically (issue 8): whatever bytes a producer sends,
`envelope.parse` either refuses them with an `EnvelopeError` or returns a `Message` that
can always be posted. Every request `payload.fit` makes of an accepted payload encodes as
strict UTF-8 JSON, is within Discord's limits and passes the stand-in's validator (its
copy of Discord's rules), and its webhook URL is one `requests` can send to.

The inputs are the three doors of the wire protocol: arbitrary bytes, arbitrary JSON (deep
nesting, unpaired surrogates, NaN, escaped slashes, URLs with whitespace or control
characters) and S-expressions in the shapes SBCL prints. The examples budget comes from
the profiles in conftest.py. Tokens here are made up.
"""

import json
import operator
import re
from urllib.parse import quote, quote_plus, urlencode

import requests
from hypothesis import assume, example, given, strategies as st

from notifier import envelope, payload, sexp
from notifier.standin import validate
from tests.test_sexp import ENVELOPES

LOCAL = (("127.0.0.1", None),)
"""The stand-in's host, allowed so that generated webhooks can pass."""

MAX_REASON_CHARS = 300
"""A rejection reason quotes at most a short prefix of the input (issue 8, item 4)."""

WIRES = [case["wire"] for case in ENVELOPES if case["name"].startswith("notifier_")]


def check(data, token=None):
    """Parse `data`: a refusal has a short reason without the token; a message can be
    posted."""
    try:
        message = envelope.parse(data, LOCAL)
    except envelope.EnvelopeError as error:
        assert error.reason and len(error.reason) <= MAX_REASON_CHARS, error.reason
        assert token is None or token not in str(error), error
        return
    assert isinstance(message, envelope.Message)
    url = message.webhook
    assert not re.search(r"[\s\x00-\x1f\x7f]", url), repr(url)
    requests.Request("POST", url + ("&" if "?" in url else "?") + "wait=true").prepare()
    parts = payload.fit(message.payload)
    assert parts
    for part in parts:
        json.dumps(part, ensure_ascii=False, allow_nan=False).encode("utf-8")
        assert payload.fits(part), part
        assert validate(part) == {}, (validate(part), part)


# ---------------------------------------------------------------- values

def rarely(usual, odd):
    """`usual`, and one time in ten `odd` instead: odd input everywhere at once would
    have nearly every envelope refused for its first oddity."""
    return st.sampled_from(range(10)).flatmap(lambda n: odd if n == 9 else usual)


SURROGATES = st.characters() | st.characters(categories=["Cs"])
TEXT = rarely(st.text(max_size=12), st.text(SURROGATES, min_size=1, max_size=12))
LONG = st.builds(operator.mul, st.text(min_size=1, max_size=8), st.integers(100, 700))
TEXTS = st.one_of(TEXT, LONG, st.sampled_from(["```py\nx = 1\n", "\n", " ", "👨‍👩‍👧🇯🇵", "\ud83d"]))
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12)
"""Any JSON value Python's json reads, NaN and infinities included (json.loads takes them)."""


def anything(strategy):
    """`strategy`, now and then any JSON value in its place (a wrong type)."""
    return rarely(strategy, JSON)


FIELD = st.fixed_dictionaries({"name": anything(TEXTS), "value": anything(TEXTS)},
                              optional={"inline": st.booleans()})
EMBED = st.fixed_dictionaries({}, optional={
    "title": anything(TEXTS), "description": anything(TEXTS),
    "color": anything(st.integers(0, 1 << 24)),
    "fields": anything(st.lists(FIELD, max_size=30)), "timestamp": TEXT,
    "footer": anything(st.fixed_dictionaries({"text": TEXTS})),
    "author": anything(st.fixed_dictionaries({"name": TEXTS}))})
POLL = {"question": {"text": "?"}, "answers": [{"poll_media": {"text": "y"}}]}
EXTRAS = {"username": TEXT, "tts": st.booleans(), "allowed_mentions": st.just({"parse": []}),
          "poll": st.just(POLL)}
PAYLOADS = st.one_of(
    st.fixed_dictionaries({"content": anything(TEXTS)},
                          optional={"embeds": anything(st.lists(EMBED, max_size=12)), **EXTRAS}),
    st.fixed_dictionaries({"embeds": anything(st.lists(EMBED, min_size=1, max_size=12))},
                          optional=EXTRAS),
    st.dictionaries(TEXT, JSON, max_size=4))

TOKENS = st.from_regex(r"[A-Za-z0-9_-]{12,68}", fullmatch=True).map(lambda t: "FAKE" + t)
ODD = st.sampled_from(["\n", "\t", " ", "\r", "\x00", "\x0b", "\x1f", "\x7f", "\x85", "\xa0",
                       "\u2028", "\ufeff", "\ud83d", "%", "%2F", "@", "\\", "#", "?"])


@st.composite
def webhooks(draw, token):
    """A webhook URL for `token`, often valid for LOCAL, sometimes with one odd character
    anywhere (a trailing newline, a tab in the host...)."""
    host = draw(rarely(st.sampled_from(["http://127.0.0.1:8099", "http://127.0.0.1",
                                        "https://discord.com", "https://ptb.discordapp.com"]),
                       st.sampled_from(["http://discord.com", "https://evil.example",
                                        "ftp://127.0.0.1"])))
    version = draw(st.sampled_from(["", "/v10"]))
    tail = draw(st.sampled_from(["", "/", "?thread_id=7"]))
    url = f"{host}/api{version}/webhooks/{draw(st.integers(0, 10 ** 20))}/{token}{tail}"
    at = draw(st.integers(0, len(url)))
    return draw(rarely(st.just(url), ODD.map(lambda odd: url[:at] + odd + url[at:])))


# ---------------------------------------------------------------- JSON envelopes

def escaped_slashes(text):
    return text.replace("/", "\\/")


JSON_ENCODERS = [
    lambda value: json.dumps(value),
    lambda value: json.dumps(value, ensure_ascii=False),
    lambda value: escaped_slashes(json.dumps(value)),  # PHP, some JavaScript encoders
    lambda value: json.dumps(value).replace("/", "\\u002f"),
    lambda value: json.dumps(value, indent=1),
]


def encoded(text):
    """An envelope's bytes; surrogates (if any) as a careless encoder writes them."""
    return text.encode("utf-8", "surrogatepass")


@st.composite
def json_envelopes(draw):
    """(bytes, token): a JSON envelope, usually valid, some fields replaced by any JSON
    value or left out, unknown keys added, encoded by one of several JSON libraries."""
    token = draw(TOKENS)
    body = draw(PAYLOADS)
    key = draw(st.sampled_from(["payload", "payload_json", "data"]))
    if key == "payload_json":
        body = draw(st.sampled_from(JSON_ENCODERS))(body)
    fields = {"type": "NOTIFIER", "schema_version": 1, "action": "SEND",
              "webhook": draw(webhooks(token)), key: body}
    for name in draw(rarely(st.just(()), st.sets(st.sampled_from(sorted(fields)), max_size=2))):
        if draw(st.booleans()):
            del fields[name]
        else:
            fields[name] = draw(JSON)
    fields.update(draw(rarely(st.just({}), st.dictionaries(TEXT, JSON, max_size=2))))
    return encoded(draw(st.sampled_from(JSON_ENCODERS))(fields)), token


@st.composite
def deep(draw):
    """Nesting beyond any sane limit, in each form: a whole JSON envelope, a JSON payload,
    a payload_json, an S-expression payload."""
    depth = draw(st.integers(1, 5000))
    opening, closing = draw(st.sampled_from([("[", "]"), ('{"a":', "}"), ("(", ")")]))
    nested = opening * depth + "1" + closing * depth
    head = '{"type":"NOTIFIER","webhook":"http://127.0.0.1/api/webhooks/1/tok",'
    return draw(st.sampled_from([
        nested,
        head + '"payload":{"content":"x","extra":' + nested + "}}",
        head + '"payload_json":' + json.dumps('{"content":"x","extra":' + nested + "}") + "}",
        '((type . "NOTIFIER") (webhook . "http://127.0.0.1/api/webhooks/1/tok") '
        f'(payload (content . "x") (extra {nested})))',
    ])).encode()


PREFIXES = st.sampled_from([b"(", b"((", b"{", b"\xef\xbb\xbf(", b"["])


@given(st.binary(max_size=300) | st.builds(operator.add, PREFIXES, st.binary(max_size=300)))
def test_any_bytes_are_refused_or_postable(data):
    check(data)


@given(json_envelopes())
@example((b'{"type":"NOTIFIER","webhook":"http://127.0.0.1/api/webhooks/1/FAKEexample1",'
          b'"payload":{"content":"\\ud83d"}}', "FAKEexample1"))
@example((b'{"type":"NOTIFIER","webhook":"http://127.0.0.1/api/webhooks/1/FAKEexample1\\n",'
          b'"payload":{"content":"x"}}', "FAKEexample1"))
@example((b'{"type":"NOTIFIER","webhook":"http://127.0.0.1/api/webhooks/1/FAKEexample1",'
          b'"payload":{"content":"x","color":NaN}}', "FAKEexample1"))
def test_any_json_envelope_is_refused_or_postable(case):
    check(*case)


@given(deep())
def test_nesting_however_deep_is_refused_or_postable(data):
    check(data)


# ---------------------------------------------------------------- S-expressions

def lisp_string(text):
    """A Lisp string literal: only " and \\ escaped, everything else raw."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def lisp_key(name):
    """How SBCL prints a symbol interned from `name`: lowercase, or in bars."""
    return sexp.symbol_token(sexp.Symbol(name.upper() if name.upper().lower() == name
                                         else name))


def lisp_entry(key, value):
    """``(key . value)`` as SBCL prints it: the dot goes before a list (the cdr rule)."""
    if value == "nil":
        return f"({key})"
    if value.startswith("("):
        return f"({key} {value[1:]}"
    return f"({key} . {value})"


def lisp(value):
    """SBCL's print of the Lisp data a producer builds for a JSON value: alists for
    objects, lists for arrays, t and nil, floats with an exponent marker."""
    if value is True:
        return "t"
    if value is None or value is False or value == [] or value == {}:
        return "nil"
    if isinstance(value, str):
        return lisp_string(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return sexp.dumps(value) if value == value and abs(value) != float("inf") else "nil"
    if isinstance(value, dict):
        return "(" + " ".join(lisp_entry(lisp_key(k), lisp(v)) for k, v in value.items()) + ")"
    return "(" + " ".join(map(lisp, value)) + ")"


FLOATS = st.floats(allow_nan=False, allow_infinity=False).map(sexp.dumps).flatmap(
    lambda token: st.sampled_from([token, token.replace("d", "e"), token.removesuffix("d0"),
                                   token.replace("d", "f")]))
SYMBOLS = st.from_regex(r"(:|swimmy\.core::|cl-user:)?[a-z*][a-z0-9_*+-]{0,10}", fullmatch=True)
ATOMS = st.one_of(
    TEXT.map(lisp_string), st.integers().map(str), FLOATS, SYMBOLS,
    TEXT.map(lambda name: "|" + name.replace("\\", "\\\\").replace("|", "\\|") + "|"),
    st.builds("{}/{}".format, st.integers(), st.integers(1)),
    TEXT.map(lambda s: f"#A(({len(s)}) base-char . {lisp_string(s)})"),
    st.sampled_from(["t", "nil", "()", "#t", "#f", "1.0e7", "9.536743e-7", "1.0d300", "1/0",
                     "#.(run)", "#(1 2)", "'x", "1.0e999", "(a . b . c)", ")", "(", '"', ".",
                     "|x"]),
)
FORMS = st.recursive(ATOMS, lambda inner: st.one_of(
    st.lists(inner, max_size=4).map(lambda items: "(" + " ".join(items) + ")"),
    st.tuples(inner, inner).map(lambda pair: f"({pair[0]} . {pair[1]})")), max_leaves=12)
KEY_SPELLINGS = {
    "type": ["type", ":type", "TYPE", "swimmy.core::type", "|type|", ":TYPE"],
    "schema_version": ["schema_version", ":schema-version", "|SCHEMA-VERSION|"],
    "action": ["action", "swimmy.school::action"], "webhook": ["webhook", ":webhook"],
    "payload": ["payload", ":payload"], "payload_json": ["payload_json", "payload-json"],
    "data": ["data"]}


@st.composite
def sexp_envelopes(draw):
    """(text, token): an envelope alist as a Lisp producer prints it, usually valid, with
    entries replaced by any Lisp form, left out, repeated, added or in another order."""
    token = draw(TOKENS)
    body = draw(PAYLOADS)
    key = draw(st.sampled_from(["payload", "payload_json", "data"]))
    if key == "payload_json":
        value = lisp_string(draw(st.sampled_from(JSON_ENCODERS))(body))
    else:
        value = lisp(body)
    entries = {"type": lisp_string("NOTIFIER"), "schema_version": "1",
               "action": lisp_string("SEND"), "webhook": lisp_string(draw(webhooks(token))),
               key: value}
    for name in draw(rarely(st.just(()), st.sets(st.sampled_from(sorted(entries)), max_size=2))):
        if draw(st.booleans()):
            del entries[name]
        else:
            entries[name] = draw(FORMS)
    printed = [lisp_entry(draw(st.sampled_from(KEY_SPELLINGS[name])), text)
               for name, text in entries.items()]
    extra = st.tuples(rarely(SYMBOLS, ATOMS), FORMS).map(lambda pair: lisp_entry(*pair))
    printed += draw(st.lists(extra, max_size=2))
    return "(" + " ".join(draw(st.permutations(printed))) + ")", token


@given(sexp_envelopes())
@example(('((type . "NOTIFIER") (webhook . "http://127.0.0.1/api/webhooks/1/FAKEexample1") '
          '(payload (content . "\ud83d")))', "FAKEexample1"))
def test_any_sexp_envelope_is_refused_or_postable(case):
    text, token = case
    check(encoded(text), token)


EDITS = st.lists(st.tuples(st.integers(0, 1 << 16), st.binary(max_size=3), st.integers(0, 3)),
                 min_size=1, max_size=4)


@given(st.sampled_from(WIRES), EDITS)
def test_damaged_lisp_envelopes_are_refused_or_postable(wire, edits):
    """Real SBCL envelopes with a few bytes replaced, inserted or deleted."""
    data = bytearray(wire.encode())
    for at, insert, delete in edits:
        at %= len(data) + 1
        data[at:at + delete] = insert
    check(bytes(data))


# ---------------------------------------------------------------- token scrubbing

def lisp_escaped(text):
    return lisp_string(text)[1:-1]


def lower_percent(text):
    return re.sub(r"%[0-9A-F]{2}", lambda m: m[0].lower(), text)


URL_ENCODINGS = {
    "plain": lambda text: text,
    "json": json.dumps,
    "json, not ascii": lambda text: json.dumps(text, ensure_ascii=False),
    "json, escaped slashes": lambda text: escaped_slashes(json.dumps(text)),
    "json, \\u002f": lambda text: json.dumps(text).replace("/", "\\u002f"),
    "json, \\u002F": lambda text: json.dumps(text).replace("/", "\\u002F"),
    "json in json": lambda text: json.dumps(escaped_slashes(json.dumps(text))),
    "lisp string of json": lambda text: lisp_escaped(escaped_slashes(json.dumps(text))),
    "lisp string": lisp_escaped,
    "repr": repr,
    "repr of bytes": lambda text: repr(text.encode("utf-8", "surrogatepass")),
    "percent-encoded": lambda text: quote(text, safe=""),
    "percent-encoded, lowercase": lambda text: lower_percent(quote(text, safe="")),
    "percent-encoded twice": lambda text: quote(quote(text, safe=""), safe=""),
    "form-encoded": lambda text: urlencode({"url": text}),
    "quote_plus": quote_plus,
    "path quoted": quote,
}


def leaked(token, text):
    """Whether 8 characters in a row of `token` appear in `text`."""
    return any(token[i:i + 8] in text for i in range(len(token) - 7))


@given(TOKENS, st.integers(0, 10 ** 20),
       st.sampled_from(["discord.com", "canary.discordapp.com", "127.0.0.1:8099"]),
       st.sampled_from(["", "/v10"]), st.sampled_from(sorted(URL_ENCODINGS)),
       st.text(max_size=12), st.text(max_size=12),
       st.sampled_from(["", "?wait=true", "?thread_id=1", "/", "\n", '"', "'", ")", " x"]))
def test_no_encoding_of_a_webhook_url_lets_its_token_through(token, hook_id, host, version,
                                                           encoding, before, after, tail):
    assume(not leaked(token, before + after))
    url = f"https://{host}/api{version}/webhooks/{hook_id}/{token}{tail}"
    text = URL_ENCODINGS[encoding](before + url + after)
    assert not leaked(token, envelope.scrub(text)), envelope.scrub(text)
