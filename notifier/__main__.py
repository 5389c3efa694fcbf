"""Command line: ``python -m notifier [COMMAND]``; see ``--help`` and the README."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Sequence

from notifier import config, envelope


def check(args: argparse.Namespace) -> int:
    """Show what the relay would post for one envelope, or why it refuses it."""
    try:
        settings = config.load(os.environ, vars(args))
    except config.ConfigError as exc:
        print(f"notifier check: {exc}", file=sys.stderr)
        return 2
    try:
        if args.file in (None, "-"):
            data = sys.stdin.buffer.read()
        else:
            with open(args.file, "rb") as handle:
                data = handle.read(envelope.MAX_ENVELOPE_BYTES + 1)
    except OSError as exc:
        print(f"notifier check: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        message = envelope.parse(data, settings.allowed_hosts)
    except envelope.EnvelopeError as exc:
        print(f"rejected: {exc.reason}", file=sys.stderr)
        return 1
    print(json.dumps({"webhook": envelope.redact(message.webhook), "payload": message.payload},
                     ensure_ascii=False, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m notifier",
        description="Relay notifications from ZeroMQ producers to Discord webhooks.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    check_parser = commands.add_parser(
        "check", help="read one envelope and print what the relay would post",
        description="Read one envelope (from FILE or standard input) and print what the "
                    "relay would post as JSON, token redacted; exit 0. A refused envelope "
                    "prints the reason and exits 1.")
    check_parser.add_argument("file", nargs="?", metavar="FILE",
                              help="envelope file (default: standard input)")
    config.add_arguments(check_parser, ("allowed_hosts",))
    check_parser.set_defaults(run=check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] | None = getattr(args, "run", None)
    if run is None:
        parser.print_help()
        return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
