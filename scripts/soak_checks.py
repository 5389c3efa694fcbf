"""The soak's judgements (scripts/soak.py): what the relay's runs said (their last
snapshots and logs) against the stand-in's record, the ground truth. Each check fills in
the `Result` fields it measures and returns its failures, so that it can be shown failing
on runs and records built by hand, apart from the chaos that usually makes them."""

from __future__ import annotations

import re
from collections import Counter
from urllib.parse import urlsplit

TAG = re.compile(r"\bsoak-(\d+)\b")
FAILED_LINE = re.compile(r" failed webhook=\S+ messages=(\d+) reason=(.*)$", re.M)
REJECTED_LINE = re.compile(r" rejected (?:\w+=\S+ )*reason=(.*?) preview=.*?"
                           r"(?: \((\d+) rejection lines left out\))?$", re.M)
DROPPED_LINE = re.compile(r" dropped (\d+) oldest messages", re.M)
BROKEN_ANSWERS = ("reset", "trickle")  # 2xx answers the relay cannot read to the end


def ledger(result, runs, standin, refused: set[int], damaged: set[int]) -> list[str]:
    """Every tag a run took delivered or counted (failed, dropped, rejected, lost), no
    refused tag posted, duplicates within what was in flight at the kills, and each run
    after a SIGTERM restoring what the stopped one saved. Per run the higher of the log's
    count and the last snapshot's, so that an outcome logged after a SIGKILLed run's last
    snapshot still counts."""
    failures = []
    arrived = Counter(int(tag) for message in standin.messages()
                      for tag in TAG.findall(message.get("content") or ""))
    taken, not_taken = set(), set()
    for run in runs:
        taken.update(run.sent[:run.taken])
        not_taken.update(run.sent[run.taken:])
        result.failed += max(run.last["failed"] if run.last else 0,
                             sum(int(n) for n, _ in FAILED_LINE.findall(run.log)))
        result.drops += max(run.last["drops"] if run.last else 0,
                            sum(int(n) for n in DROPPED_LINE.findall(run.log)))
        rejected = REJECTED_LINE.findall(run.log)
        result.rejected += max(run.last["rejected"] if run.last else 0,
                               sum(1 + int(n or 0) for _, n in rejected))
        result.reasons.update(f"failed: {reason}"
                              for _, reason in FAILED_LINE.findall(run.log))
        result.reasons.update(f"rejected: {reason}" for reason, _ in rejected)
        if run.last:
            result.in_flight += run.last["restored_in_flight"]
            result.corrupt_records += run.last.get("store_skipped", 0)
    if runs and runs[-1].last and runs[-1].last.get("store_state", "ok") != "ok":
        failures.append(f"run {runs[-1].number}: store_state {runs[-1].last['store_state']} "
                        "with the disk free")
    for before, after in zip(runs, runs[1:]):
        if (before.end == "SIGTERM" and before.last and after.last
                and before.number not in damaged
                and before.last.get("store_state", "ok") == "ok"
                and after.last["restored"] != before.last["saved"]):
            failures.append(f"run {after.number} restored {after.last['restored']}, run "
                            f"{before.number} saved {before.last['saved']} at its SIGTERM")
    result.delivered = sum(1 for tag in arrived if tag not in refused)
    result.duplicates = sum(count - 1 for count in arrived.values())
    result.not_taken = len(not_taken - refused - set(arrived))
    missing = len(taken - refused - set(arrived))
    result.lost = (max(0, missing - result.failed - result.drops - result.lost_counted)
                   + max(0, len(taken & refused) - result.rejected))
    posted = refused & set(arrived)
    if posted:
        failures.append(f"{len(posted)} refused tags reached the stand-in, "
                        f"e.g. soak-{min(posted)}")
    if result.duplicates > result.in_flight:
        failures.append(f"{result.duplicates} duplicates, only {result.in_flight} were in "
                        f"flight at the kills")
    allowed = result.kill_losses + result.destroyed + result.unseen_drops
    if result.lost > allowed:
        failures.append(f"{result.lost} tags the relay took were lost, beyond what "
                        f"`lost` counted ({result.lost_counted}), the {result.kill_losses} "
                        f"held at SIGKILLs without durable mode or a store, the "
                        f"{result.destroyed} held by stores the soak damaged, and the "
                        f"{result.unseen_drops} a killed run may have dropped after its "
                        f"last snapshot")
    return failures


def webhooks(result, runs, standin, sent_to: dict[int, str], hooks, given_up_after: float,
             now: float) -> list[str]:
    """Per webhook, whatever URLs named it: one request in flight at a time in each run
    (a request no longer in flight `given_up_after` seconds, when the relay gave it up;
    a run not yet ended counts until `now`), the tags it saved first appear in the order
    they were sent, and each went to the URL (path and thread) it asked for."""
    failures = []
    for run in runs:
        if run.started_at is None:
            continue
        until = run.ended_at if run.ended_at is not None else now
        for hook in hooks:
            most = standin.most_in_flight(hook, run.started_at, until, given_up_after)
            result.most_in_flight = max(result.most_in_flight, most)
            if most > 1:
                failures.append(f"run {run.number}: {most} requests to webhook {hook} in "
                                "flight at once")
    first: dict[str, list[int]] = {}
    elsewhere = []
    for record in sorted(standin.requests, key=lambda r: r.time):  # as they came
        if 200 <= record.status < 300 and isinstance(record.json, dict):
            for tag in map(int, TAG.findall(record.json.get("content") or "")):
                seen = first.setdefault(record.webhook_id, [])
                if tag not in seen:
                    seen.append(tag)
                asked = urlsplit(sent_to.get(tag, ""))
                if (asked.path, asked.query) != (record.path, "&".join(
                        f"{k}={v}" for k, v in record.query.items() if k != "wait")):
                    elsewhere.append(tag)
    if elsewhere:
        failures.append(f"{len(elsewhere)} tags posted to another URL than they asked for, "
                        f"e.g. soak-{min(elsewhere)}")
    for hook, tags in first.items():
        late = [(a, b) for a, b in zip(tags, tags[1:]) if b < a]
        if late:
            failures.append(f"webhook {hook}: {len(late)} tags saved before an older one, "
                            f"e.g. soak-{late[0][1]} after soak-{late[0][0]}")
    return failures


def answers(runs, standin) -> tuple[list[str], str]:
    """No run counted a ban (the stand-in never bans), and no tag saved under a broken
    answer was posted again before a run ended; returns the failures and a line saying
    what the runs counted of those answers."""
    failures = []
    bans = sum(run.last["rate_limited_by_scope"]["ban"] for run in runs if run.last)
    if bans:
        failures.append(f"{bans} 429s counted as bans; the stand-in sent none")
    ends = [run.ended_at for run in runs if run.ended_at is not None]
    saved: dict[int, list] = {}
    for record in standin.requests:
        if 200 <= record.status < 300 and isinstance(record.json, dict):
            for tag in TAG.findall(record.json.get("content") or ""):
                saved.setdefault(int(tag), []).append(record)
    again = [tag for tag, records in saved.items()
             for first, later in zip(records, records[1:])
             if first.mode in BROKEN_ANSWERS
             and not any(first.time < end < later.time for end in ends)]
    if again:
        failures.append(f"{len(again)} tags saved under a broken answer were posted again "
                        f"by the same run, e.g. soak-{min(again)}")
    unconfirmed = sum(run.last.get("delivered_unconfirmed", 0) for run in runs if run.last)
    return failures, (f"broken 2xx answers counted delivered_unconfirmed: {unconfirmed}; "
                      f"bans counted: {bans}")
