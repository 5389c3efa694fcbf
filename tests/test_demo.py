"""The README's run command: the demo runs the relay end to end, says what it shows and
what to do next, and stops the relay cleanly."""

import subprocess
from pathlib import Path

RUN = Path(__file__).resolve().parent.parent / "scripts" / "run.sh"


def test_the_demo_delivers_everything_within_discords_limits_and_explains_it():
    result = subprocess.run([str(RUN)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "23 notifications became" in out and "0 of them refused by the rate limit" in out
    assert "split it at line breaks\n    into 3 messages, in order" in out
    assert "its log says requests=3" in out
    assert "NOTIFIER OK" in out and "relay exited with 0: everything delivered" in out
    assert out.rstrip().endswith("everything else: README.md")
    for step in ("SWIMMY_DISCORD_WEBHOOK=", "scripts/run.sh send", "scripts/run.sh standin",
                 "scripts/run.sh status"):
        assert step in out, step
    assert len(out.splitlines()) <= 40
    assert "demo-token" not in out + result.stderr and "Traceback" not in result.stderr
