"""Command line: ``python -m telemetry merge`` (also ``swimmy-telemetry merge``), run by cron
or a systemd timer, and ``python -m telemetry show`` for a person. The only place that
reads the environment and configures logging."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from notifier import __version__, logs, program_name
from telemetry import config, merge, show

log = logging.getLogger("telemetry")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=program_name(sys.argv[0], "telemetry"),
        description="Merge the notifier relay's metrics into the Lisp side's "
                    "system_metrics.sexp, or show that file.")
    parser.add_argument("--version", action="version", version=f"swimmy-telemetry {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser(
        "merge", help="merge notifier_metrics.sexp into system_metrics.sexp once",
        description="Merge notifier_metrics.sexp into system_metrics.sexp once; the exit "
                    "code says what happened (see the README).")
    _add_paths(command)
    command.add_argument("--notifier-metrics", metavar="FILE",
                         help="the relay's snapshot [SWIMMY_NOTIFIER_METRICS_FILE; default: "
                              "$SWIMMY_HOME/data/notifier_metrics.sexp]")
    command.add_argument("--stale-after", metavar="SECONDS",
                         help=f"a snapshot older than this is stale [default: "
                              f"{config.Config.stale_after:g}]")
    command.set_defaults(run=_merge)
    command = commands.add_parser(
        "show", help="show system_metrics.sexp with its times as dates",
        description="Show system_metrics.sexp for a person: the Lisp side's universal-time "
                    "timestamp as a date, and the notifier's keys with their age.")
    _add_paths(command)
    command.set_defaults(run=_show)
    return parser


def _add_paths(command: argparse.ArgumentParser) -> None:
    command.add_argument("--home", metavar="DIR",
                         help="base directory, files in DIR/data/ [SWIMMY_HOME; default: "
                              "current directory]")
    command.add_argument("--system-metrics", metavar="FILE",
                         help="the Lisp side's metrics file [default: "
                              "$SWIMMY_HOME/data/system_metrics.sexp]")


def _merge(settings: config.Config) -> int:
    return merge.run(settings, now=time.time())


def _show(settings: config.Config) -> int:
    code, text = show.command(settings.system_metrics, now=time.time())
    print(text, file=sys.stdout if code == 0 else sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # exits 2 on a bad command line
    logs.configure(None)  # the relay's line format, on standard error
    try:
        settings = config.load(os.environ, vars(args), Path.cwd())
    except config.ConfigError as exc:
        log.error("bad setting: %s", exc)
        return merge.Exit.CONFIG
    return args.run(settings)


if __name__ == "__main__":
    sys.exit(main())
