"""The shipped Prometheus alerting rules: valid for Prometheus's own `promtool`, a unit
test for every alert (tests/promtool/), and only series the relay really exports."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.test_status import snapshot

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "scripts" / "swimmy-notifier.rules.yml"
UNIT_TESTS = ROOT / "tests" / "promtool" / "swimmy-notifier.rules.test.yml"


def promtool(*args):
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian's prometheus package has it; CI "
                    "installs it)")
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120,
                          cwd=UNIT_TESTS.parent)


def expressions(text):
    """The `expr:` of each rule (one line, or a folded block below it)."""
    found, lines = [], text.splitlines()
    for number, line in enumerate(lines):
        key, _, rest = line.strip().partition(": ")
        if key == "expr" or line.strip() == "expr: >-":
            block = [] if rest.startswith(">") else [rest]
            indent = len(line) - len(line.lstrip())
            for following in lines[number + 1:]:
                if len(following) - len(following.lstrip()) <= indent:
                    break
                block.append(following.strip())
            found.append(" ".join(block))
    return found


def test_promtool_accepts_the_rules():
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 9 rules found" in result.stdout


def test_every_alert_fires_when_it_must_and_not_otherwise():
    result = promtool("test", "rules", UNIT_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test():
    alerts = set(re.findall(r"^\s*- alert: (\w+)$", RULES.read_text(), re.M))
    tested = set(re.findall(r"alertname: (\w+)", UNIT_TESTS.read_text()))
    assert len(alerts) == 9 and alerts == tested


def test_the_rules_use_only_series_the_relay_exports():
    pytest.importorskip("prometheus_client")
    from notifier import prometheus

    entries = dict(snapshot(state="running", lost=0, dead_letters_state="failed",
                            dead_letters_reason="disk full"),
                   rate_limited_by_scope={"route": 0, "shared": 0, "global": 0, "ban": 0})
    entries["webhooks"][0]["failing_since"] = 1
    exported = {family.name + ("_total" if family.type == "counter" else "")
                for family in prometheus.families(entries)}
    used = set(re.findall(r"\bnotifier_\w+", "\n".join(expressions(RULES.read_text()))))
    assert len(expressions(RULES.read_text())) == 9 and used <= exported, used - exported
