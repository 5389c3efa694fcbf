"""Command line: ``python -m notifier [COMMAND]``; see ``--help`` and the README."""

from __future__ import annotations

import sys

from notifier import signals

# First, before anything else is imported: a SIGHUP while the relay starts is handled,
# not its death (see notifier.signals). The other commands get the signals back in `main`.
_caught = [signals.install()] if __name__ == "__main__" or sys.argv[0].endswith(
    "/swimmy-notifier") else []

import argparse
import errno
import json
import os
from typing import Callable, Sequence

from notifier import __version__, config, envelope, logs, program_name
from notifier import standin as discord_standin
from notifier.client import add_send_parser
from notifier.redaction import escape_controls
from notifier.replay import add_replay_parser


def _settings(args: argparse.Namespace, command: str) -> config.Config | None:
    try:
        return config.load(os.environ, vars(args))
    except config.ConfigError as exc:
        print(f"notifier {command}: {escape_controls(str(exc))}", file=sys.stderr)
        return None


def relay(args: argparse.Namespace) -> int:
    """Run the relay in the foreground until SIGTERM or SIGINT."""
    from notifier.relay import run  # zmq and requests load only for the commands using them

    from notifier.validate import code_for

    settings = _settings(args, "relay")
    if settings is None:
        return 2
    try:
        logs.configure(settings.log_file, settings.log_level, settings.log_format)
    except OSError as exc:  # the start check says the same, with the same code
        print(f"notifier relay: cannot open the log file {settings.log_file}: "
              f"{exc.strerror}", file=sys.stderr)
        return code_for(exc)
    return run(settings, args.signals)


def check(args: argparse.Namespace) -> int:
    """Show the requests the relay would post for one envelope (after splitting and
    cutting), or why it refuses it."""
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
    if not data.strip():
        print("rejected: empty input", file=sys.stderr)
        return 1
    try:
        message = envelope.parse(data, settings.allowed_hosts)
    except envelope.EnvelopeError as exc:
        print(f"rejected: {exc.reason}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug: the relay would reject the envelope for it too
        print(f"rejected: internal error while parsing: {type(exc).__name__} (a bug; "
              "please report it with the envelope)", file=sys.stderr)
        return 1
    shown = json.dumps({"webhook": envelope.redact(envelope.post_url(message.webhook)),
                        "payload": message.requests[0],
                        "requests": message.requests}, ensure_ascii=False, indent=2)
    print(escape_controls(shown, keep_newlines=True))  # the C1 ones json leaves raw
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


def validate(args: argparse.Namespace) -> int:
    """Run the relay's start check and report: exit 0 when the relay would start, 2 for
    what only an operator can fix, 1 for what may pass by itself (a port in use)."""
    from notifier import validate as checks  # loads zmq

    try:
        settings = config.load(os.environ, vars(args))
    except config.ConfigError as exc:
        problems, code = exc.problems, checks.OPERATOR
    else:
        found = checks.problems(settings)
        problems, code = [problem.text for problem in found], checks.exit_code(found)
    for problem in problems:
        print(f"notifier validate: {problem}", file=sys.stderr)
    if problems:
        return code
    print(f"notifier validate: OK: settings valid, {settings.endpoint} free, "
          f"{settings.metrics_file.parent} and {settings.log_file or 'the log'} writable")
    return 0


def demo(args: argparse.Namespace) -> int:
    """Run the relay beside a local Discord stand-in and send it a few notifications."""
    from notifier.demo import run as run_demo

    return run_demo()


def standin(args: argparse.Namespace) -> int:
    return discord_standin.serve(args)


def _owner(text: str) -> tuple[int, int]:
    """``USER`` or ``USER:GROUP`` -> (uid, gid); the user's own group without GROUP."""
    import grp
    import pwd

    user, _, group = text.partition(":")
    try:
        entry = pwd.getpwnam(user)
        return entry.pw_uid, grp.getgrnam(group).gr_gid if group else entry.pw_gid
    except KeyError:
        raise argparse.ArgumentTypeError(f"no such user or group: {text!r}") from None


def _user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def keygen(args: argparse.Namespace) -> int:
    """Write a CURVE key pair and say where each file goes."""
    from pathlib import Path

    from notifier import curve

    try:
        public, secret = curve.keygen(Path(args.dir).absolute(), args.name, args.owner)
    except PermissionError as exc:
        print(f"notifier keygen: {exc.strerror}: " + (
            "only root can give the files to another user (--owner)"
            if args.owner and exc.errno == errno.EPERM else str(exc.filename)),
            file=sys.stderr)
        return 2
    except (curve.CurveError, OSError) as exc:
        print(f"notifier keygen: {exc}", file=sys.stderr)
        return 2
    print(f"""public certificate: {public}
secret certificate: {secret} (mode 0600, owned by {_user_name(secret.stat().st_uid)}: only
  that user can read it; keep it on this host, never copy it)
public key (Z85):   {curve.load_public(public).decode()}

For a producer: copy {public.name} into the relay's clients directory
  (SWIMMY_NOTIFIER_CURVE_CLIENTS) and send the relay SIGHUP; on this producer, set
  SWIMMY_NOTIFIER_CURVE_CLIENT_KEY={secret}
For the relay: set SWIMMY_NOTIFIER_CURVE_SECRET_KEY={secret} on it, and copy
  {public.name} to every producer (SWIMMY_NOTIFIER_CURVE_SERVER_KEY there).""")
    return 0


PRODUCER_KITS = {"lisp": "swimmy-notifier-producer.asd", "rust": "Cargo.toml"}
"""Each producer kit shipped as package data, by the file that marks its directory."""


def producer_kit(args: argparse.Namespace) -> int:
    """Print the absolute directory of a producer kit shipped with this package."""
    from pathlib import Path

    directory = Path(__file__).resolve().parent / "producers" / args.kind
    if not (directory / PRODUCER_KITS[args.kind]).is_file():
        print(f"notifier producer-kit: {directory / PRODUCER_KITS[args.kind]} is missing "
              "(an install without the package data?)", file=sys.stderr)
        return 1
    print(directory)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=program_name(sys.argv[0], "notifier"),
        description="Relay notifications from ZeroMQ producers to Discord webhooks. "
                    "Without a command, run the relay until SIGTERM or SIGINT.")
    parser.add_argument("--version", action="version", version=f"swimmy-notifier {__version__}")
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
    add_replay_parser(commands)

    keygen_parser = commands.add_parser(
        "keygen", help="write a CURVE key pair for the relay or a producer",
        description="Write DIR/NAME.key (public) and DIR/NAME.key_secret (secret, mode "
                    "0600) with zmq.auth, never over an existing path (a symlink "
                    "included: exit 2), and print what to copy where. NAME names the "
                    "producer in the relay's metrics and log.")
    keygen_parser.add_argument("dir", metavar="DIR")
    keygen_parser.add_argument("name", metavar="NAME")
    keygen_parser.add_argument("--owner", type=_owner, metavar="USER[:GROUP]",
                               help="give both files to USER (as root: the relay's secret "
                                    "key to its service user, which must read it)")
    keygen_parser.set_defaults(run=keygen)

    status_parser = commands.add_parser(
        "status", help="summarize the relay's metrics (health, queue, delivery)",
        description="Summarize the relay's metrics file: delivery, not just liveness. "
                    "Exit 0 healthy, 1 warnings (drops, failures, messages lost at a stop, "
                    "quarantined webhooks, rejections with nothing delivered, a file the "
                    "relay cannot write), "
                    "2 critical (no, stale or unusable snapshot, relay stopped, messages pending "
                    "but not delivered, a webhook failing). The first line is "
                    "'NOTIFIER <LEVEL> - <the worst problem>'.")
    config.add_arguments(status_parser, ("home", "metrics_file"))
    status_parser.set_defaults(run=status)

    validate_parser = commands.add_parser(
        "validate", help="check the settings and the environment without starting",
        description="Run the relay's own start check without starting it: every setting, "
                    "the CURVE key files (read as this user), that the relay's addresses "
                    "can be bound (a non-loopback one is never bound to check it) and its "
                    "files written; list every problem. Exit 0 when the relay would start, "
                    "2 what only an operator can fix (the relay exits 2 too), 1 what may "
                    "pass by itself, such as a port in use. For systemd's ExecStartPre=.")
    config.add_arguments(validate_parser)
    validate_parser.set_defaults(run=validate)

    demo_parser = commands.add_parser(
        "demo", help="run the relay end to end against a local Discord stand-in",
        description="Start a local Discord stand-in and the relay beside it, send "
                    "notifications through the producer client, show them arrive and the "
                    "relay's status, then stop the relay. No Discord webhook needed.")
    demo_parser.set_defaults(run=demo)

    standin_parser = commands.add_parser(
        "standin", help="run a local Discord stand-in for producer tests",
        description="Serve a local stand-in for Discord webhooks until SIGINT or SIGTERM. "
                    "It prints a webhook URL and the SWIMMY_NOTIFIER_ALLOWED_HOSTS value "
                    "for the relay, then one line per message it receives.")
    discord_standin.add_arguments(standin_parser)
    standin_parser.set_defaults(run=standin)

    kit_parser = commands.add_parser(
        "producer-kit", help="print the directory of the Lisp or Rust producer kit",
        description="Print the absolute directory of a producer kit shipped with this "
                    "package: lisp (the ASDF system swimmy-notifier-producer) or rust (the "
                    "crate swimmy-notifier-producer). See the README, 'Producers: Lisp and "
                    "Rust'.")
    kit_parser.add_argument("kind", choices=sorted(PRODUCER_KITS))
    kit_parser.set_defaults(run=producer_kit)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    if run is relay:
        args.signals = _caught.pop() if _caught else signals.install()
    elif _caught:
        _caught.pop().release()
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
