"""Command line: ``python -m telemetry merge`` (also ``swimmy-telemetry merge``), run by cron
or a systemd timer. The only place that reads the environment and configures logging."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from notifier import __version__, logs
from notifier.__main__ import program_name
from telemetry import config, merge

log = logging.getLogger("telemetry")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=program_name(sys.argv[0], "telemetry"),
        description="Merge the notifier relay's metrics into the Lisp side's "
                    "system_metrics.sexp.")
    parser.add_argument("--version", action="version", version=f"swimmy-telemetry {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser(
        "merge", help="merge notifier_metrics.sexp into system_metrics.sexp once",
        description="Merge notifier_metrics.sexp into system_metrics.sexp once; the exit "
                    "code says what happened (see the README).")
    command.add_argument("--home", metavar="DIR",
                         help="base directory, files in DIR/data/ [SWIMMY_HOME; default: "
                              "current directory]")
    command.add_argument("--notifier-metrics", metavar="FILE",
                         help="the relay's snapshot [SWIMMY_NOTIFIER_METRICS_FILE; default: "
                              "$SWIMMY_HOME/data/notifier_metrics.sexp]")
    command.add_argument("--system-metrics", metavar="FILE",
                         help="the Lisp side's file to merge into [default: "
                              "$SWIMMY_HOME/data/system_metrics.sexp]")
    command.add_argument("--stale-after", metavar="SECONDS",
                         help=f"a snapshot older than this is stale [default: "
                              f"{config.Config.stale_after:g}]")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # exits 2 on a bad command line
    logs.configure(None)  # the relay's line format, on standard error
    try:
        settings = config.load(os.environ, vars(args), Path.cwd())
    except config.ConfigError as exc:
        log.error("bad setting: %s", exc)
        return merge.Exit.CONFIG
    return merge.run(settings, now=time.time())


if __name__ == "__main__":
    sys.exit(main())
