"""The README's run command: the demo runs the relay end to end and stops it cleanly."""

import subprocess
import sys


def test_the_demo_delivers_everything_within_discords_limits():
    result = subprocess.run([sys.executable, "-m", "notifier", "demo"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "all 23 delivered" in out and "0 of them 429s" in out
    assert "NOTIFIER OK" in out and "relay exited with 0" in out
    assert "demo-token" not in out + result.stderr
