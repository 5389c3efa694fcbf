"""Command line: ``python -m notifier [COMMAND]``; see ``--help`` and the README."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Sequence

from notifier import config, envelope, logs
from notifier.client import add_send_parser


def _settings(args: argparse.Namespace, command: str) -> config.Config | None:
    try:
        return config.load(os.environ, vars(args))
    except config.ConfigError as exc:
        print(f"notifier {command}: {exc}", file=sys.stderr)
        return None


def relay(args: argparse.Namespace) -> int:
    """Run the relay in the foreground until SIGTERM or SIGINT."""
    from notifier.relay import run  # zmq and requests load only for the commands using them

    settings = _settings(args, "relay")
    if settings is None:
        return 2
    logs.configure(settings.log_file)
    return run(settings)


def check(args: argparse.Namespace) -> int:
    """Show what the relay would post for one envelope, or why it refuses it."""
    settings = _settings(args, "check")
    if settings is None:
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


def status(args: argparse.Namespace) -> int:
    """Summarize the relay's metrics file; exit 0 healthy, 1 warnings, 2 critical."""
    from notifier.status import command

    settings = _settings(args, "status")
    if settings is None:
        return 2
    code, text = command(settings.metrics_file)
    print(text)
    return code


def demo(args: argparse.Namespace) -> int:
    """Run the relay beside a local Discord stand-in and send it a few notifications."""
    from notifier.demo import run as run_demo

    return run_demo()


def standin(args: argparse.Namespace) -> int:
    from notifier.standin import main as standin_main

    return standin_main(args.standin_args)


def keygen(args: argparse.Namespace) -> int:
    """Write a CURVE key pair and say where each file goes."""
    from pathlib import Path

    from notifier import curve

    try:
        public, secret = curve.keygen(Path(args.dir).absolute(), args.name)
    except (curve.CurveError, OSError) as exc:
        print(f"notifier keygen: {exc}", file=sys.stderr)
        return 2
    print(f"""public certificate: {public}
secret certificate: {secret} (mode 0600: keep it on this host, never copy it)
public key (Z85):   {curve.load_public(public).decode()}

For a producer: copy {public.name} into the relay's clients directory
  (SWIMMY_NOTIFIER_CURVE_CLIENTS) and send the relay SIGHUP; on this producer, set
  SWIMMY_NOTIFIER_CURVE_CLIENT_KEY={secret}
For the relay: set SWIMMY_NOTIFIER_CURVE_SECRET_KEY={secret} on it, and copy
  {public.name} to every producer (SWIMMY_NOTIFIER_CURVE_SERVER_KEY there).""")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m notifier",
        description="Relay notifications from ZeroMQ producers to Discord webhooks. "
                    "Without a command, run the relay until SIGTERM or SIGINT.")
    config.add_arguments(parser)
    parser.set_defaults(run=relay)
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

    add_send_parser(commands)

    keygen_parser = commands.add_parser(
        "keygen", help="write a CURVE key pair for the relay or a producer",
        description="Write DIR/NAME.key (public) and DIR/NAME.key_secret (secret, mode "
                    "0600) with zmq.auth, never over existing files, and print what to copy "
                    "where. NAME names the producer in the relay's metrics and log.")
    keygen_parser.add_argument("dir", metavar="DIR")
    keygen_parser.add_argument("name", metavar="NAME")
    keygen_parser.set_defaults(run=keygen)

    status_parser = commands.add_parser(
        "status", help="summarize the relay's metrics (health, queue, delivery)",
        description="Summarize the relay's metrics file: delivery, not just liveness. "
                    "Exit 0 healthy, 1 warnings (drops, failures, quarantined webhooks), "
                    "2 critical (no or stale snapshot, messages pending but not delivered).")
    config.add_arguments(status_parser, ("home", "metrics_file"))
    status_parser.set_defaults(run=status)

    demo_parser = commands.add_parser(
        "demo", help="run the relay end to end against a local Discord stand-in",
        description="Start a local Discord stand-in and the relay beside it, send "
                    "notifications through the producer client, show them arrive and the "
                    "relay's status, then stop the relay. No Discord webhook needed.")
    demo_parser.set_defaults(run=demo)

    standin_parser = commands.add_parser(
        "standin", add_help=False, help="run a local Discord stand-in (see standin --help)")
    standin_parser.add_argument("standin_args", nargs=argparse.REMAINDER)
    standin_parser.set_defaults(run=standin)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
