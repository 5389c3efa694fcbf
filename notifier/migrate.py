"""What the previous version left for its next start, read once to be imported into the store.

Two formats, both under the data directory:

* the pending file, ``notifier_pending.sexp``: one S-expression, schema 1 (``(envelopes
  "..." ...)``) or schema 2 (``(messages ((envelope . "...") (part . 1) (attempts . 3)
  (in_flight . nil)) ...) (notices ((webhook . "...") (dropped . 2) (failed . 0) (since
  . 1764201500)) ...)``);
* the durable journal, ``notifier_journal/seg-<n>.log``: records ``crc32 | length | kind
  | body`` (A a batch of envelopes with their journal ids, S ids in flight, P id's part
  and attempts, D ids done, N a webhook's loss-notice state as JSON, B: forget what came
  before).

Every value is checked as if a producer had sent it: a record or entry that does not
check out is skipped and counted (a journal record that does not also ends its segment,
as the journal itself did), never raised. Files are read only if regular (a FIFO or a
device cannot hang or flood the start), up to MAX_FILE_BYTES each, whatever `queue_max`
is now: the import keeps everything and the restore drops what is over the bound.
"""

from __future__ import annotations

import json
import math
import struct
import time
import zlib
from pathlib import Path
from typing import Any, NamedTuple

from notifier import files, sexp
from notifier.envelope import MAX_ENVELOPE_BYTES

PENDING_NAME = "notifier_pending.sexp"
JOURNAL_NAME = "notifier_journal"
MAX_FILE_BYTES = 1 << 30
"""Largest legacy file read (a pending file of 10,000 of the largest envelopes escaped
twice is about 1.3 GB; the journal's segments were 8 MiB, its compactions bigger)."""
MAX_COUNT = 10 ** 12
MAX_PARTS = 10_000
EARLIEST = 946_684_800.0
_HEADER = struct.Struct("<IIc")


class Legacy(NamedTuple):
    """What one legacy file or directory held: messages as (envelope, part, attempts, in
    flight), oldest first; loss notices per webhook (URL or id); entries skipped."""

    messages: list[tuple[bytes, int, int, bool]]
    notices: dict[str, tuple[int, int, float | None]]
    skipped: int


def sources(data_dir: Path) -> list[Path]:
    """The legacy files present, journal first (durable mode wrote no pending file)."""
    return [path for path in (data_dir / JOURNAL_NAME, data_dir / PENDING_NAME)
            if path.exists() or path.is_symlink()]


def marker(path: Path) -> str:
    """What identifies this legacy file in the store once imported: a crash between the
    import's commit and the rename must not import it twice."""
    st = path.lstat()
    return f"imported {path.name} {st.st_dev}:{st.st_ino}:{st.st_mtime_ns}:{st.st_size}"


def read(path: Path) -> Legacy:
    """Read a legacy pending file or journal directory. Raises OSError or ValueError
    when it cannot be read at all (it is then moved aside by the caller)."""
    if path.name == JOURNAL_NAME:
        return _journal(path)
    return _pending(files.read_regular(path, MAX_FILE_BYTES))


# ------------------------------------------------------------------ the pending file

def _pending(data: bytes) -> Legacy:
    if len(data) > MAX_FILE_BYTES:
        raise ValueError("larger than the legacy import reads")
    saved = sexp.loads(data, max_bytes=len(data), max_depth=8)
    if not isinstance(saved, dict):
        raise ValueError("not an alist")
    version = saved.get("schema_version")
    if version == 1:
        envelopes = saved.get("envelopes")
        if not isinstance(envelopes, list):
            raise ValueError("envelopes is not a list")
        messages = [message for text in envelopes
                    if (message := _message({"envelope": text})) is not None]
        return Legacy(messages, {}, len(envelopes) - len(messages))
    if version != 2:
        raise ValueError(f"unknown schema_version {sexp.quote(version)}")
    entries, notice_entries = saved.get("messages") or [], saved.get("notices") or []
    if not (isinstance(entries, list) and isinstance(notice_entries, list)):
        raise ValueError("messages and notices must be lists")
    messages, notices, skipped = [], {}, 0
    for entry in entries:
        message = _message(entry) if isinstance(entry, dict) else None
        if message is None:
            skipped += 1
        else:
            messages.append(message)
    for entry in notice_entries:
        notice = (_notice(entry.get("webhook"), entry.get("dropped"), entry.get("failed"),
                          entry.get("since")) if isinstance(entry, dict) else None)
        if notice is None:
            skipped += 1
        else:
            notices[notice[0]] = notice[1]
    return Legacy(messages, notices, skipped)


def _message(entry: dict) -> tuple[bytes, int, int, bool] | None:
    text, part, attempts = entry.get("envelope"), entry.get("part", 0), entry.get("attempts", 0)
    part, attempts = part or 0, attempts or 0
    if not (isinstance(text, str) and _count(part, MAX_PARTS) and _count(attempts, MAX_COUNT)):
        return None
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        return None
    if not 0 < len(data) <= MAX_ENVELOPE_BYTES:
        return None
    return data, part, attempts, entry.get("in_flight") is True


def _notice(webhook: Any, dropped: Any, failed: Any, since: Any
            ) -> tuple[str, tuple[int, int, float | None]] | None:
    """A loss-notice state as producer input is checked: a webhook (URL or id; the
    relay checks a URL against the allowed hosts), counts, and a plausible time."""
    dropped, failed = dropped or 0, failed or 0
    if not (isinstance(webhook, str) and 0 < len(webhook) <= 2048
            and _count(dropped, MAX_COUNT) and _count(failed, MAX_COUNT) and dropped + failed):
        return None
    if since is not None and not (type(since) in (int, float) and math.isfinite(since)
                                  and EARLIEST <= since <= time.time() + 86_400):
        return None
    return webhook, (dropped, failed, since)


def _count(value: Any, most: int) -> bool:
    return type(value) is int and 0 <= value <= most


# ------------------------------------------------------------------ the journal

def _journal(directory: Path) -> Legacy:
    if not directory.is_dir() or directory.is_symlink():
        raise ValueError("not a directory")
    segments = []
    for path in directory.glob("seg-*.log"):
        try:
            segments.append((int(path.name[4:-4]), path))
        except ValueError:
            continue
    messages: dict[int, list] = {}  # journal id -> [envelope, part, attempts, in flight]
    notices: dict[str, tuple[int, int, float | None]] = {}
    skipped = 0
    for _, path in sorted(segments):
        try:
            data = files.read_regular(path, MAX_FILE_BYTES)
        except OSError:
            skipped += 1
            continue
        skipped += _replay(data, messages, notices)
    return Legacy([tuple(state) for state in messages.values()], notices, skipped)


def _replay(data: bytes, messages: dict[int, list], notices: dict) -> int:
    """Apply a segment's records; 1 if one did not check out (the rest is skipped)."""
    offset = 0
    while offset < len(data):
        if len(data) - offset < _HEADER.size:
            return 1
        crc, length, kind = _HEADER.unpack_from(data, offset)
        body = data[offset + _HEADER.size:offset + _HEADER.size + length]
        if len(body) < length or zlib.crc32(body, zlib.crc32(kind)) != crc:
            return 1
        if not _apply(kind, body, messages, notices):
            return 1
        offset += _HEADER.size + length
    return 0


def _apply(kind: bytes, body: bytes, messages: dict[int, list], notices: dict) -> bool:
    """One record onto the state; False if its body is malformed."""
    if kind == b"A":
        batch = _batch(body)
        if batch is None:
            return False
        messages.update((jid, [envelope, 0, 0, False]) for jid, envelope in batch)
    elif kind in (b"S", b"D"):
        if len(body) % 8:
            return False
        for (jid,) in struct.iter_unpack("<Q", body):
            if kind == b"D":
                messages.pop(jid, None)
            elif jid in messages:
                messages[jid][3] = True
    elif kind == b"P":
        if len(body) != 16:
            return False
        jid, part, attempts = struct.unpack("<QII", body)
        if part > MAX_PARTS:
            return False
        if jid in messages:
            messages[jid][1:3] = [part, attempts]
    elif kind == b"N":
        try:
            key, dropped, failed, since = json.loads(body)
        except (ValueError, TypeError):
            return False
        if not (dropped or failed) and isinstance(key, str):
            notices.pop(key, None)
            return True
        notice = _notice(key, dropped, failed, since)
        if notice is None:
            return False
        notices[notice[0]] = notice[1]
    elif kind == b"B":
        messages.clear()
        notices.clear()
    else:
        return False
    return True


def _batch(body: bytes) -> list[tuple[int, bytes]] | None:
    """(journal id, envelope) of an A record's body; None if its sizes do not add up."""
    if len(body) < 4:
        return None
    count = struct.unpack_from("<I", body)[0]
    start = 4 + 12 * count
    if not 0 < count <= 512 or len(body) < start:
        return None
    numbers = struct.unpack_from(f"<{count}Q{count}I", body, 4)
    jids, lengths = numbers[:count], numbers[count:]
    if start + sum(lengths) != len(body) or not all(
            0 < length <= MAX_ENVELOPE_BYTES for length in lengths):
        return None
    batch, offset = [], start
    for jid, length in zip(jids, lengths):
        batch.append((jid, body[offset:offset + length]))
        offset += length
    return batch
