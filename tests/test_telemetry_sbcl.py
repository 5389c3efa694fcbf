"""Differential: real SBCL reads each merged file as the Lisp side's data plus the
notifier keys, symbols, packages and float formats included."""

import pytest

from notifier import sexp
from telemetry import merge
from telemetry.merge import Exit
from tests.test_sexp import METRICS
from tests.test_telemetry import NOW, settings, write_snapshot


@pytest.mark.parametrize("fixture", METRICS, ids=[p.name for p in METRICS])
def test_sbcl_reads_the_merged_file_as_the_original_data_plus_the_notifier_keys(
        sbcl, tmp_path, fixture):
    cfg = settings(tmp_path)
    original = (fixture / "system_metrics.sexp").read_text(encoding="utf-8")
    cfg.system_metrics.write_text(original, encoding="utf-8")
    write_snapshot(cfg)
    assert merge.run(cfg, now=NOW) == Exit.OK
    ok = cfg.system_metrics.read_text(encoding="utf-8")
    cfg.notifier_metrics.write_text("((schema_version . 2))", encoding="utf-8")
    assert merge.run(cfg, now=NOW + 90) == Exit.UNSUPPORTED_SCHEMA
    unsupported = cfg.system_metrics.read_text(encoding="utf-8")

    for merged in (ok, unsupported):
        notifier = {k: v for k, v in sexp.loads(merged).items() if k.startswith("notifier_")}
        expected = sexp.read(original) + sexp.read(sexp.dumps(notifier))
        printed = sbcl.echo(merged)
        assert sexp.read(printed) == expected
        assert printed.startswith(original[:-1] + " "), "SBCL prints the Lisp entries as they were"
    assert sexp.loads(sbcl.echo(unsupported))["notifier_age_sec"] == 93
