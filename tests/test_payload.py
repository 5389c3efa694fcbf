"""Payload shaping: fitting Discord's limits, combining a backlog, loss notices.

The Discord stand-in's `validate` judges every message apart from the code under test:
a message it accepts is one Discord would accept.
"""

import copy
import operator
import re
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from notifier.payload import ELLIPSIS, LIMITS, combine, embed_chars, fit, fits, loss_notice
from notifier.standin import validate

ONCE_KEYS = ("poll", "attachments", "components", "files")
POLL = {"question": {"text": "Close the position?"}, "answers": [{"poll_media": {"text": "yes"}}]}


def assert_sendable(message):
    """Discord would accept it: within every limit and not empty."""
    assert validate(message) == {}, message
    assert fits(message)


def lines(count, width=79):
    """`count` numbered lines of `width` characters each, joined by newlines."""
    return "\n".join(f"{i:05d} " + "x" * (width - 6) for i in range(count))


def content_of(messages):
    return [m["content"] for m in messages if m.get("content")]


def embeds_of(messages):
    return [embed for m in messages for embed in m.get("embeds") or []]


def others(message):
    return {k: v for k, v in message.items() if k not in ("content", "embeds")}


def clip(text, limit):
    return text if len(text) <= limit else text[:limit - 1] + ELLIPSIS


def rejoins(original, chunks, pos=0):
    """Whether the chunks, in order, are the original text with only whitespace left out
    between them, plus a closing fence (or inline code's backticks) added at a chunk's
    end and an opening one repeated at the next chunk's start."""
    if not chunks:
        return not original[pos:].strip()
    chunk, rest = chunks[0], chunks[1:]
    reopened = re.match(r"```[\w+#.-]*\n|``?", chunk) if pos else None
    bodies = {chunk, chunk[reopened.end():] if reopened else chunk}
    if rest:
        closed = re.search(r"\n```$|``?$", chunk)
        bodies |= {body[:-len(closed.group())] for body in bodies} if closed else set()
    for body in bodies:
        at = pos
        while True:
            if original.startswith(body, at) and rejoins(original, rest, at + len(body)):
                return True
            if at == len(original) or not original[at].isspace():
                break
            at += 1
    return False


def reading(messages):
    """What a reader sees, in order: content lines and embeds, in one list."""
    seen = []
    for message in messages:
        if message.get("content"):
            seen += message["content"].split("\n")
        seen += message.get("embeds") or []
    return seen


# Limits


@pytest.mark.parametrize("payload", [
    {"content": "hello"},
    {"content": "x" * 2000, "username": "Swimmy", "tts": False},
    {"embeds": [{"title": "t" * 256, "description": "d" * 4096,
                 "fields": [{"name": "n", "value": "v"}] * 25}]},
    {"content": "vote", "poll": POLL, "allowed_mentions": {"parse": []}, "thread_name": "alerts"},
    {"content": "x", "embeds": [{"description": "d" * 600}] * 10},
    {"content": "x", "embeds": None, "unknown_key": [1, 2]},
    {"content": "   "},  # blank: nothing to fit, and Discord's refusal will say so
])
def test_a_payload_within_the_limits_comes_back_as_it_is(payload):
    original = copy.deepcopy(payload)
    assert fits(payload)
    assert fit(payload) == [payload]
    assert payload == original


def test_embed_chars_counts_what_discord_counts():
    embed = {"title": "ab", "description": "cde", "url": "https://not.counted", "color": 1,
             "fields": [{"name": "f", "value": "gh", "inline": True}, "not a field"],
             "footer": {"text": "ijkl", "icon_url": "https://not.counted"}, "author": {"name": "m"}}
    assert embed_chars({"content": "not counted", "embeds": [embed, embed]}) == 26
    assert embed_chars({"content": "x"}) == embed_chars({"embeds": None}) == 0


def test_limits_are_discords_and_read_only():
    assert LIMITS["content"] == 2000 and LIMITS["embed_total"] == 6000
    with pytest.raises(TypeError):
        LIMITS["content"] = 4000


# fit: content over 2000 characters


def test_long_content_is_split_after_whole_lines():
    text = lines(60)  # 60 lines of 79 characters and their line breaks
    messages = fit({"content": text, "username": "Swimmy"})
    chunks = content_of(messages)
    assert [len(c) for c in chunks] == [1999, 1999, 799]  # 25 lines, 25 lines, 10 lines
    assert "\n".join(chunks) == text
    assert all(m["username"] == "Swimmy" for m in messages)


def test_content_without_line_breaks_is_split_between_words():
    text = " ".join(f"word{i:04d}" for i in range(500))
    chunks = content_of(fit({"content": text}))
    assert len(chunks) == 3 and all(len(c) <= 2000 for c in chunks)
    assert " ".join(chunks) == text


def test_a_line_break_far_from_the_limit_loses_to_a_nearer_space():
    text = "first line\n" + " ".join(["word"] * 600)
    chunks = content_of(fit({"content": text}))
    assert len(chunks[0]) > 1900
    assert " ".join(chunks) == text


def test_text_without_whitespace_is_cut_hard_at_the_limit():
    assert content_of(fit({"content": "a" * 4500})) == ["a" * 2000, "a" * 2000, "a" * 500]


@pytest.mark.parametrize("unit", ["👍🏽", "👨\u200d👩\u200d👧", "🇯🇵", "e\u0301", "1\ufe0f\u20e3"])
def test_a_hard_cut_does_not_split_an_emoji_or_an_accented_letter(unit):
    text = "x" + unit * (4000 // len(unit))
    chunks = content_of(fit({"content": text}))
    assert "".join(chunks) == text
    assert len(chunks) > 1 and all(len(c) <= 2000 for c in chunks)
    assert all(chunk.startswith(unit) for chunk in chunks[1:])


def test_no_chunk_starts_inside_a_character():
    text = "x" + "👍🏽e\u0301🇯🇵" * 900
    for chunk in content_of(fit({"content": text})):
        assert unicodedata.category(chunk[0]) not in ("Mn", "Mc", "Me") and chunk[0] != "\U0001f3fd"


def test_a_cut_code_block_is_closed_and_reopened_with_its_language():
    text = "Traceback:\n```py\n" + lines(40, 60) + "\n```\nafter"
    chunks = content_of(fit({"content": text}))
    assert len(chunks) == 2 and all(len(c) <= 2000 for c in chunks)
    assert chunks[0].endswith("\n```") and chunks[1].startswith("```py\n")
    assert all(c.count("```") == 2 for c in chunks)
    # the line break cut at is all that is missing between the two halves
    assert chunks[0][:-len("\n```")] + "\n" + chunks[1][len("```py\n"):] == text


def test_indentation_survives_a_cut_inside_a_code_block():
    code = "```\n" + "\n".join(f"    line {i:03d} " + "y" * 60 for i in range(60)) + "\n```"
    chunks = content_of(fit({"content": code}))
    assert chunks[1].startswith("```\n    line ")


def test_a_hard_cut_in_a_run_of_backticks_falls_between_fences():
    chunks = content_of(fit({"content": "word" * 365 + "`" * 546}))
    assert len(chunks) == 2 and all(c.count("```") % 2 == 0 for c in chunks)


# fit: mentions survive splitting

MENTION = re.compile(r"<@[!&]?\d+>|@everyone|@here")


def pings(content):
    """The mentions Discord would ping in `content`: those outside code blocks, inline
    code (a run of one or two backticks up to the next run of as many, within a block's
    bounds) and backslash escapes. Written apart from payload.py, as a reader would."""
    found, i = set(), 0
    while i < len(content):
        if content.startswith("```", i):
            close = content.find("```", i + 3)
            i = len(content) if close == -1 else close + 3
            continue
        ticks = re.match(r"`+", content[i:])
        if ticks:
            n, fence = len(ticks.group()), content.find("```", i)
            bound = len(content) if fence == -1 else fence
            closing = next((m for m in re.finditer(r"`+", content[i + n:bound])
                            if len(m.group()) == n), None)
            i += n if closing is None else n + closing.end()
            continue
        if content[i] == "\\" and i + 1 < len(content) and not content[i + 1].isalnum() \
                and not content[i + 1].isspace():
            i += 2
            continue
        mention = MENTION.match(content, i)
        if mention:
            found.add(mention.group())
            i = mention.end()
        else:
            i += 1
    return found


def test_a_mention_quoted_in_inline_code_is_not_cut_loose():
    """The issue's case: the cut fell inside `note: @everyone` and the second part
    began with a live @everyone."""
    text = ("word " * 397)[:-1] + " `note: @everyone` end"
    assert text.index("`note:") < 2000 < text.index("` end")
    chunks = content_of(fit({"content": text}))
    assert len(chunks) == 2 and all(pings(chunk) == set() for chunk in chunks)
    assert chunks[1] == "`note: @everyone` end"


def test_inline_code_longer_than_a_chunk_is_closed_and_reopened():
    text = "Log: `" + " ".join(f"<@{i}> x{i:04d}" for i in range(400)) + "` done <@7>"
    chunks = content_of(fit({"content": text}))
    assert len(chunks) >= 3 and all(len(chunk) <= 2000 for chunk in chunks)
    assert all(chunk.count("`") == 2 for chunk in chunks)
    assert chunks[0].endswith("`") and chunks[1].startswith("`")
    assert set().union(*map(pings, chunks)) == pings(text) == {"<@7>"}


@pytest.mark.parametrize("atom", ["\\@everyone", "<@123456789012345678>", "@here"])
def test_a_hard_cut_splits_neither_a_mention_nor_an_escape(atom):
    for shift in range(len(atom) + 1):
        text = "a" * (2000 - shift) + atom + "b" * 100
        chunks = content_of(fit({"content": text}))
        assert any(atom in chunk for chunk in chunks), (shift, chunks)
        assert set().union(*map(pings, chunks)) == pings(text)


def test_text_after_a_lone_backtick_is_not_combined_into_inline_code():
    """Joined, a lone backtick would quote the next message's text up to its first
    backtick, and set free what that one quoted."""
    assert combine([{"content": "price `x"}, {"content": "`@everyone` test"}])[0] == 1
    assert combine([{"content": "price `x`"}, {"content": "`@everyone` test"}])[0] == 2


def test_whitespace_at_a_cut_is_dropped_and_never_makes_a_blank_message():
    messages = fit({"content": "start" + " " * 2500 + "\n" * 300 + "end" + " " * 3000})
    assert content_of(messages) == ["start", "end"]
    for message in messages:
        assert_sendable(message)


def test_long_blank_content_with_embeds_sends_the_embeds():
    payload = {"content": " " * 2500, "embeds": [{"title": "t"}]}
    assert fit(payload) == [{"embeds": [{"title": "t"}]}]


def test_embeds_go_with_the_last_chunk_and_single_use_keys_with_the_last_message():
    every = {"username": "Swimmy", "allowed_mentions": {"parse": []}, "tts": True, "flags": 4096,
             "thread_name": "alerts"}
    once = {"poll": POLL, "components": [], "attachments": []}
    messages = fit({"content": lines(30), "embeds": [{"title": "t"}], **every, **once})
    assert len(messages) == 2
    assert "embeds" not in messages[0] and messages[1]["embeds"] == [{"title": "t"}]
    assert others(messages[0]) == every
    assert others(messages[1]) == {**every, **once}


# fit: embeds


def test_each_text_over_its_limit_is_cut_to_exactly_the_limit_with_an_ellipsis():
    embed = {"title": "t" * 300, "description": "d" * 5000, "color": 7,
             "footer": {"text": "f" * 3000, "icon_url": "i"}, "author": {"name": "a" * 300, "url": "u"},
             "fields": [{"name": "n" * 300, "value": "v" * 2000}]}
    # 256 + 4096 + 256 + 1280 + 2048 is over 6000: the footer moves on to a second message
    messages = fit({"embeds": [embed]})
    first, second = embeds_of(messages)
    assert len(messages) == 2
    assert first["title"] == "t" * 255 + ELLIPSIS and len(first["title"]) == 256
    assert first["description"] == "d" * 4095 + ELLIPSIS
    assert first["author"] == {"name": "a" * 255 + ELLIPSIS, "url": "u"}
    assert first["fields"] == [{"name": "n" * 255 + ELLIPSIS, "value": "v" * 1023 + ELLIPSIS}]
    assert second == {"color": 7, "footer": {"text": "f" * 2047 + ELLIPSIS, "icon_url": "i"}}
    for message in messages:
        assert_sendable(message)
    assert embed["title"] == "t" * 300  # the caller's embed is untouched


def test_more_than_ten_embeds_follow_in_further_messages_in_order():
    embeds = [{"title": str(i)} for i in range(23)]
    messages = fit({"content": "head", "embeds": embeds, "username": "u"})
    assert [len(m["embeds"]) for m in messages] == [10, 10, 3]
    assert messages[0]["content"] == "head" and not any("content" in m for m in messages[1:])
    assert embeds_of(messages) == embeds
    assert all(m["username"] == "u" for m in messages)


def test_embeds_over_6000_characters_together_are_spread_over_messages():
    embeds = [{"description": str(i) * 2500} for i in range(5)]
    messages = fit({"embeds": embeds})
    assert [len(m["embeds"]) for m in messages] == [2, 2, 1]
    assert embeds_of(messages) == embeds


def test_an_embed_with_more_than_25_fields_is_continued_in_further_embeds():
    fields = [{"name": f"f{i}", "value": str(i), "inline": True} for i in range(60)]
    above = {"title": "PnL", "url": "https://x", "color": 5, "thumbnail": {"url": "https://t"}}
    below = {"image": {"url": "https://i"}, "footer": {"text": "swimmy"},
             "timestamp": "2024-06-01T14:03:00Z"}
    (message,) = fit({"embeds": [{**above, **below, "fields": fields}]})
    assert message["embeds"] == [
        {**above, "fields": fields[:25]},
        {"color": 5, "fields": fields[25:50]},
        {"color": 5, "fields": fields[50:], **below},
    ]


def test_an_embed_over_6000_characters_is_continued_with_no_text_lost():
    fields = [{"name": f"f{i}", "value": "v" * 1000} for i in range(12)]
    messages = fit({"embeds": [{"title": "report", "description": "d" * 3000, "fields": fields}]})
    assert [[len(e["fields"]) for e in m["embeds"]] for m in messages] == [[2], [5], [5]]
    assert [f for e in embeds_of(messages) for f in e["fields"]] == fields
    assert embeds_of(messages)[0]["description"] == "d" * 3000
    for message in messages:
        assert_sendable(message)


def test_odd_values_are_left_for_discord_to_refuse():
    messages = fit({"content": "x" * 2500, "embeds": [{"title": 5}, "not an embed"]})
    assert content_of(messages) == ["x" * 2000, "x" * 500]
    assert messages[-1]["embeds"] == [{"title": 5}, "not an embed"]


# fit: properties

TOKENS = ["word", "longer-word", " ", "  ", "\n", "\n\n", "\t", "```", "```py\n", "\n```\n",
          "👍🏽", "👨\u200d👩\u200d👧", "🇯🇵", "e\u0301", "x", "> ", ">>> ", "**"]
runs = st.builds(operator.mul, st.sampled_from(TOKENS), st.integers(1, 400))
texts = st.lists(runs | st.text(max_size=40), max_size=14).map(lambda parts: "".join(parts)[:10_000])
long_texts = st.text(max_size=20) | st.builds(
    operator.mul, st.sampled_from(["a", "word ", "é\n", "👍🏽"]), st.integers(0, 5000))
fields = st.fixed_dictionaries({"name": long_texts, "value": long_texts},
                               optional={"inline": st.booleans()})
embeds = st.fixed_dictionaries({}, optional={
    "title": long_texts, "description": long_texts, "url": st.just("https://example.com"),
    "color": st.integers(0, 0xFFFFFF), "fields": st.lists(fields, max_size=30),
    "footer": st.fixed_dictionaries({"text": long_texts}),
    "author": st.fixed_dictionaries({"name": long_texts}),
    "image": st.just({"url": "https://example.com/a.png"}),
    "timestamp": st.just("2024-06-01T14:03:00Z")})
payloads = st.fixed_dictionaries({}, optional={
    "content": texts, "embeds": st.lists(embeds, max_size=15),
    "username": st.sampled_from(["Swimmy", "Risk"]), "tts": st.booleans(),
    "allowed_mentions": st.just({"parse": []}), "poll": st.just(POLL), "components": st.just([]),
}).filter(lambda p: (p.get("content") or "").strip() or p.get("embeds"))

# Small messages, as a burst of alerts would be: the ones combine merges.
small_texts = st.lists(st.sampled_from(["alert"] * 6 + ["\n", "```", ">>> ", "x" * 300]),
                       min_size=1, max_size=6).map("".join)
small_embeds = st.fixed_dictionaries({"title": st.sampled_from(["PnL", "DD"])}, optional={
    "description": st.sampled_from(["d"] * 4 + ["d" * 1500, "d" * 4000])})
small_messages = st.builds(
    lambda kind, content, embeds, extra: {**({"content": content} if "c" in kind else {}),
                                          **({"embeds": embeds} if "e" in kind else {}), **extra},
    st.sampled_from(["c", "c", "c", "e", "e", "ce"]), small_texts,
    st.lists(small_embeds, min_size=1, max_size=4),
    st.sampled_from([{}] * 5 + [{"username": "Risk"}, {"poll": POLL},
                                {"thread_name": "Price alert"}]),
).filter(lambda p: p.get("content", "").strip() or p.get("embeds"))

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(payloads)
def test_fit_gives_sendable_messages_that_lose_nothing_and_keep_order(payload):
    original = copy.deepcopy(payload)
    messages = fit(payload)
    assert payload == original
    for message in messages:
        assert_sendable(message)
        assert fit(message) == [message]
    if fits(payload):
        assert messages == [payload]
    # content: all of it, in order, fences balanced in every chunk if they were in the whole
    content = payload.get("content") or ""
    assert rejoins(content, content_of(messages))
    if content.count("```") % 2 == 0:
        assert all(chunk.count("```") % 2 == 0 for chunk in content_of(messages))
    # reading order: all content comes before every embed
    kinds = "".join(("c" if m.get("content") else "") + ("e" if m.get("embeds") else "")
                    for m in messages)
    assert "ec" not in kinds
    # embeds: every field and text, in order, cut only to its own limit
    before, after = payload.get("embeds") or [], embeds_of(messages)
    assert [f for e in after for f in e.get("fields", [])] == [
        {**f, "name": clip(f["name"], 256), "value": clip(f["value"], 1024)}
        for e in before for f in e.get("fields", [])]
    for key, limit in (("title", 256), ("description", 4096)):
        assert [e[key] for e in after if key in e] == [
            clip(e[key], limit) for e in before if key in e]
    assert [e["footer"]["text"] for e in after if "footer" in e] == [
        clip(e["footer"]["text"], 2048) for e in before if "footer" in e]
    # other keys: single-use ones once, on the last message, the rest on every message
    for key, value in others(payload).items():
        if key in ONCE_KEYS:
            assert [m.get(key) for m in messages] == [None] * (len(messages) - 1) + [value]
        else:
            assert all(m[key] == value for m in messages)


WORDS = ["alert", "price", "USDJPY", "x" * 40, "\n", "@everyone", "@here", "<@123>",
         "<@!456>", "<@&789>", "\\@everyone", "\\<@123>"]
words = st.lists(st.sampled_from(WORDS), max_size=12).map(" ".join)
spans = st.builds(lambda ticks, inner: ticks + inner + ticks, st.sampled_from(["`", "``"]),
                  words.filter(str.strip) | st.builds(operator.mul, st.just("<@42> x "),
                                                      st.integers(1, 400)))
blocks = words.map(lambda inner: f"```\n{inner}\n```")
fillers = st.builds(operator.mul, st.sampled_from(["word ", "line\n", "x"]), st.integers(1, 900))
mentioning = st.lists(st.one_of(words, spans, blocks, fillers), min_size=1, max_size=40).map(
    " ".join)


@FAST
@given(mentioning)
def test_the_mentions_that_would_ping_are_the_same_for_the_parts_as_for_the_whole(text):
    chunks = content_of(fit({"content": text}))
    assert set().union(*map(pings, chunks)) == pings(text)
    assert rejoins(text, chunks)


# combine


def test_a_single_message_goes_out_unchanged():
    message = {"content": "hi", "username": "Swimmy"}
    assert combine([message]) == (1, message)


def test_content_only_messages_are_joined_line_by_line():
    taken, combined = combine([{"content": f"alert {i}"} for i in range(60)])
    assert (taken, combined) == (60, {"content": "\n".join(f"alert {i}" for i in range(60))})


def test_content_then_embeds_combine_and_embeds_then_content_do_not():
    e1, e2, e3 = {"title": "1"}, {"title": "2"}, {"title": "3"}
    queue = [{"content": "a"}, {"content": "b", "embeds": [e1]}, {"embeds": [e2]}, {"embeds": [e3]},
             {"content": "c"}]
    assert combine(queue) == (4, {"content": "a\nb", "embeds": [e1, e2, e3]})
    assert combine(queue[2:]) == (2, {"embeds": [e2, e3]})
    # "x" e1 and "y" e2 as one message would read x y e1 e2
    assert combine([{"content": "x", "embeds": [e1]}, {"content": "y", "embeds": [e2]}])[0] == 1


@pytest.mark.parametrize("other", [
    {"content": "b", "username": "Other"},
    {"content": "b", "tts": True},
    {"content": "b", "allowed_mentions": {"parse": ["users"]}},
    {"content": "b", "flags": 4096},
    {"content": "b", "poll": POLL},
    {"content": "b", "components": []},
    {"content": "b", "attachments": []},
])
def test_messages_that_differ_in_anything_but_content_and_embeds_stay_apart(other):
    first = {"content": "a"}
    assert combine([first, other]) == (1, first)
    assert combine([other, first]) == (1, other)


def test_forum_posts_are_never_combined():
    """Found against Discord's imitation: six envelopes naming one thread became one
    post holding all six. Every request that names a thread makes a new post."""
    posts = [{"content": f"alert {i}", "thread_name": "Price alert"} for i in range(6)]
    assert combine(posts) == (1, posts[0])
    assert combine([{"content": "a"}, posts[0]]) == (1, {"content": "a"})
    assert combine([{"embeds": [{"title": "t"}], "thread_name": "x"}] * 2)[0] == 1


def test_combining_respects_discords_limits():
    assert combine([{"content": "x" * 1000}, {"content": "y" * 999}, {"content": "z"}])[0] == 2
    assert combine([{"content": "x" * 1000}, {"content": "y" * 1000}])[0] == 1  # 2001 joined
    assert combine([{"embeds": [{"title": "t"}] * 6}, {"embeds": [{"title": "t"}] * 5}])[0] == 1
    assert combine([{"embeds": [{"description": "d" * 3000}]}] * 3)[0] == 2


def test_content_never_joins_an_open_code_block_or_quote():
    assert combine([{"content": "```py\nunclosed"}, {"content": "text"}])[0] == 1
    assert combine([{"content": ">>> quoted"}, {"content": "text"}])[0] == 1
    assert combine([{"content": ">>> quoted"}, {"embeds": [{"title": "t"}]}])[0] == 2
    assert combine([{"content": "```py\nclosed\n```"}, {"content": "text"}])[0] == 2


def test_combine_looks_no_further_than_the_first_message_it_cannot_take():
    queue = [{"content": "a"}, {"content": "b"}, {"content": "c", "username": "x"}]
    queue += [object()] * 1000  # would fail if looked at
    assert combine(queue) == (2, {"content": "a\nb"})


@settings(FAST, max_examples=100)
@given(st.lists(small_messages | small_messages | payloads, min_size=1, max_size=12))
def test_combine_drains_a_backlog_within_limits_without_reordering(batch):
    queue = [message for payload in batch for message in fit(payload)]
    original = copy.deepcopy(queue)
    sent, rest = [], queue
    while rest:
        taken, combined = combine(rest)
        assert 1 <= taken <= len(rest)
        assert_sendable(combined)
        group, rest = rest[:taken], rest[taken:]
        if taken == 1:
            assert combined is group[0]
        else:
            assert not any(key in m for m in group for key in (*ONCE_KEYS, "thread_name"))
            assert all(others(m) == others(group[0]) for m in group)
            assert others(combined) == others(group[0])
            assert combined.get("content", "") == "\n".join(content_of(group))
            assert combined.get("embeds", []) == embeds_of(group)
        sent.append(combined)
    assert queue == original
    assert reading(sent) == reading(queue)


# loss_notice


def test_loss_notice_says_how_many_why_and_since_when():
    assert loss_notice(37, 2, 1717250580.9) == {
        "content": "⚠️ Notifications lost since 2024-06-01 14:03 UTC: "
                   "37 dropped (relay queue full), 2 failed — see the relay log.",
        "allowed_mentions": {"parse": []}}


def test_loss_notice_leaves_out_what_it_does_not_know():
    assert loss_notice(0, 1, None)["content"] == (
        "⚠️ Notifications lost: 1 failed — see the relay log.")
    assert loss_notice(5, 0, 0)["content"] == (
        "⚠️ Notifications lost since 1970-01-01 00:00 UTC: 5 dropped (relay queue full)"
        " — see the relay log.")
    assert_sendable(loss_notice(10**9, 10**9, 4102444800))


@pytest.mark.parametrize("dropped, failed", [(0, 0), (-1, 3)])
def test_loss_notice_refuses_nothing_to_report(dropped, failed):
    with pytest.raises(ValueError):
        loss_notice(dropped, failed, None)
