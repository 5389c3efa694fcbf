"""The install an operator runs: scripts/install.sh into a scratch root, and the systemd
units and logrotate configuration it installs, checked by systemd's and logrotate's own
tools where they exist (CI installs both)."""

import getpass
import grp
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from notifier import __version__
from notifier.demo import free_port

ROOT = Path(__file__).resolve().parent.parent
UNITS = ("swimmy-notifier.service", "swimmy-telemetry.service", "swimmy-telemetry.timer")
MAX_EXPOSURE = 2.5


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """scripts/install.sh run once, with every path in a scratch directory and the
    current user as the service user (so it creates no system user)."""
    base = tmp_path_factory.mktemp("install")
    home = base / "opt" / "swimmy"
    env = {**os.environ, "SWIMMY_HOME": str(home), "SWIMMY_USER": getpass.getuser(),
           "SYSTEMD_DIR": str(base / "systemd"), "LOGROTATE_DIR": str(base / "logrotate.d")}
    result = subprocess.run([str(ROOT / "scripts" / "install.sh")], env=env, cwd=base,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"installed swimmy-notifier {__version__} in {home}" in result.stdout
    return base, home


def need(tool):
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (CI installs it)")


def test_the_install_is_a_regular_package_in_its_own_venv_with_owned_data(installed):
    base, home = installed
    python = home / ".venv" / "bin" / "python"
    where = subprocess.run([str(python), "-c", "import notifier; print(notifier.__file__)"],
                           capture_output=True, text=True, cwd=base, timeout=60)
    assert where.stdout.startswith(str(home / ".venv" / "lib")), where  # not the checkout
    version = subprocess.run([str(home / ".venv" / "bin" / "swimmy-telemetry"), "--version"],
                             capture_output=True, text=True, timeout=60)
    assert version.stdout.strip() == f"swimmy-telemetry {__version__}"
    group = grp.getgrgid(os.getgid()).gr_name
    for directory in (home / "data", home / "logs"):
        status = directory.stat()
        assert stat.S_IMODE(status.st_mode) == 0o750
        assert (status.st_uid, grp.getgrgid(status.st_gid).gr_name) == (os.getuid(), group)
    validate = subprocess.run([str(python), "-m", "notifier", "validate", "--port",
                               str(free_port())], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "SWIMMY_HOME": str(home)})
    assert validate.returncode == 0, validate.stderr


@pytest.mark.parametrize("home, words", [
    ("opt/my swimmy", "cannot be written into systemd units unquoted"),
    ("opt/100%", "cannot be written into systemd units unquoted"),
    ("opt/$HOME", "cannot be written into systemd units unquoted"),
    ('opt/"q"', "cannot be written into systemd units unquoted"),
    ("opt/a/../b", "no '.' or '..' parts"),
])
def test_a_home_systemd_cannot_carry_is_refused_before_anything_is_installed(
        tmp_path, home, words):
    """A space would split ExecStart=, Environment= and ReadWritePaths= (systemd-analyze
    verify rejects such units); % and $ are systemd's own. Refused, nothing written."""
    env = {**os.environ, "SWIMMY_HOME": str(tmp_path / home), "SWIMMY_USER": getpass.getuser(),
           "SYSTEMD_DIR": str(tmp_path / "systemd"), "LOGROTATE_DIR": str(tmp_path / "lr")}
    result = subprocess.run([str(ROOT / "scripts" / "install.sh")], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert words in result.stderr and "nothing was installed" in result.stderr
    assert str(tmp_path / home) in result.stderr and result.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_a_relative_home_or_an_odd_user_is_refused(tmp_path):
    for environ, words in (({"SWIMMY_HOME": "opt/swimmy"}, "must be an absolute path"),
                           ({"SWIMMY_USER": "swimmy user"}, "is not a plain user name")):
        env = {**os.environ, "SWIMMY_HOME": str(tmp_path / "opt"), "SWIMMY_USER": "nobody",
               "SYSTEMD_DIR": str(tmp_path / "systemd"), "LOGROTATE_DIR": str(tmp_path / "lr"),
               **environ}
        result = subprocess.run([str(ROOT / "scripts" / "install.sh")], env=env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and words in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_installed_units_pass_systemd_verify_and_are_hardened(installed):
    need("systemd-analyze")
    base, home = installed
    units = [str(base / "systemd" / unit) for unit in UNITS]
    verify = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True,
                            text=True, timeout=120)
    assert verify.returncode == 0 and not (verify.stdout + verify.stderr).strip(), verify
    relay = (base / "systemd" / UNITS[0]).read_text()
    assert f"ExecStartPre={home}/.venv/bin/python -m notifier validate" in relay
    assert "RestartPreventExitStatus=2" in relay and f"ReadWritePaths={home}/data" in relay
    for unit in units[:2]:
        security = subprocess.run(["systemd-analyze", "security", "--offline=true", unit],
                                  capture_output=True, text=True, timeout=120)
        exposure = re.search(r"Overall exposure level for \S+: (\d+\.\d)", security.stdout)
        assert exposure, security.stdout + security.stderr
        assert float(exposure.group(1)) <= MAX_EXPOSURE, (unit, exposure.group(0))


def test_the_logrotate_configuration_is_accepted_and_moves_the_log(installed):
    need("logrotate")
    base, home = installed
    config = base / "logrotate.d" / "swimmy-notifier"
    text = config.read_text()
    assert "copytruncate" not in text.split("{", 1)[1] and f"{home}/logs/notifier.log" in text
    (home / "logs" / "notifier.log").write_text("a line\n")
    dry = subprocess.run(["logrotate", "-d", "--state", str(base / "state"), str(config)],
                         capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0 and "error" not in dry.stdout + dry.stderr, dry
    forced = subprocess.run(["logrotate", "-f", "--state", str(base / "state"), str(config)],
                            capture_output=True, text=True, timeout=60)
    assert forced.returncode == 0, forced
    assert (home / "logs" / "notifier.log.1").read_text() == "a line\n"
    assert (home / "logs" / "notifier.log").read_text() == ""  # created anew, 0640


# ------------------------------------------------------------------ the README's CURVE set-up

def readme_block(heading: str) -> str:
    """The first ```sh block under `heading` in the README."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    after = text[text.index(f"\n{heading}\n"):]
    return after.split("```sh\n", 1)[1].split("\n```", 1)[0]


def runs_as_nobody(python: str) -> bool:
    """Whether `python` is 3.11 or newer with venv, and the user nobody can run it (a
    Python under /root cannot serve a service user)."""
    try:
        return subprocess.run([python, "-c", "import sys, venv; sys.exit(sys.version_info "
                               "< (3, 11))"], user="nobody", group=pwd.getpwnam("nobody").pw_gid,
                              extra_groups=[], capture_output=True, timeout=60).returncode == 0
    except (OSError, KeyError, subprocess.SubprocessError):
        return False


@pytest.fixture
def service_host():
    """A scratch host: install.sh into a world-traversable directory, with `nobody` as
    the service user (root only: it hands files to another user)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the set-up gives the relay's key to the service user")
    python = next((candidate for candidate in (sys.executable, "/usr/bin/python3")
                   if runs_as_nobody(candidate)), None)
    if python is None:
        pytest.skip("no Python 3.11+ here that the user nobody may run")
    base = Path(tempfile.mkdtemp(prefix="swimmy-host-"))
    base.chmod(0o755)
    env = {**os.environ, "PYTHON": python,
           "SWIMMY_HOME": str(base / "opt" / "swimmy"), "SWIMMY_USER": "nobody",
           "SYSTEMD_DIR": str(base / "systemd"), "LOGROTATE_DIR": str(base / "logrotate.d")}
    try:
        result = subprocess.run([str(ROOT / "scripts" / "install.sh")], env=env, cwd=base,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        yield base
    finally:
        shutil.rmtree(base)


def unit_environment(unit: Path, *drop_ins: Path) -> dict[str, str]:
    """The Environment= lines of a unit and its drop-ins, as systemd would set them."""
    environment = {}
    for path in (unit, *drop_ins):
        for line in path.read_text().splitlines():
            if line.startswith("Environment="):
                key, _, value = line[len("Environment="):].partition("=")
                environment[key] = value
    return environment


def as_service(unit: Path, command: list[str], environment: dict[str, str], **kwargs):
    """Run `command` as the unit's User= and Group=, in its WorkingDirectory=, with only
    the unit's environment (plus PATH), as systemd would."""
    fields = dict(line.split("=", 1) for line in unit.read_text().splitlines()
                  if line.partition("=")[0] in ("User", "Group", "WorkingDirectory"))
    return subprocess.Popen(command, user=fields["User"], group=fields["Group"],
                            extra_groups=[], cwd=fields["WorkingDirectory"],
                            env={"PATH": "/usr/bin:/bin", **environment}, **kwargs)


def test_the_readme_curve_set_up_gives_a_relay_that_starts_as_the_service_user(
        service_host, tmp_path):
    """The README's lines, run as written (paths moved into the scratch host, the
    service user `nobody`, loopback for 0.0.0.0, no systemctl): then validate and the
    relay, run as the unit runs them, agree that it starts, and a producer's message
    gets through CURVE to the stand-in."""
    from notifier.client import NotifierClient
    from notifier.standin import DiscordStandIn
    from tests.harness import wait_until

    home, etc, systemd = service_host / "opt" / "swimmy", service_host / "etc", \
        service_host / "systemd"
    producer = service_host / "producer"
    script = (readme_block("### Set-up")
              .replace("/opt/swimmy", str(home)).replace("/etc/swimmy", str(etc / "swimmy"))
              .replace("/etc/systemd/system", str(systemd)).replace("~/.swimmy", str(producer))
              .replace("--owner swimmy", "--owner nobody").replace("0.0.0.0", "127.0.0.1"))
    script = "\n".join(line for line in script.splitlines()
                       if not line.startswith("systemctl "))
    ran = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True,
                         text=True, timeout=120,
                         env={**os.environ, "PATH": f"{home}/.venv/bin:{os.environ['PATH']}"})
    assert ran.returncode == 0, ran.stdout + ran.stderr
    unit = systemd / "swimmy-notifier.service"
    environment = unit_environment(unit, systemd / "swimmy-notifier.service.d" / "curve.conf")
    with DiscordStandIn() as discord:
        port = free_port()
        environment.update(SWIMMY_PORT_NOTIFIER=str(port), SWIMMY_NOTIFIER_METRICS_INTERVAL_SEC="0.2",
                           SWIMMY_NOTIFIER_ALLOWED_HOSTS=f"127.0.0.1:{discord.port}")
        python = str(home / ".venv" / "bin" / "python")
        check = as_service(unit, [python, "-m", "notifier", "validate"], environment,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = check.communicate(timeout=60)
        assert check.returncode == 0, err
        relay = as_service(unit, [python, "-m", "notifier"], environment)
        try:
            metrics = home / "data" / "notifier_metrics.sexp"
            wait_until(lambda: relay.poll() is None and metrics.exists(), 60,
                       what="the relay's first metrics")
            with NotifierClient(f"tcp://127.0.0.1:{port}", webhook=discord.webhook_url(1),
                                allowed_hosts=(("127.0.0.1", discord.port),),
                                server_key=etc / "swimmy" / "curve" / "relay.key",
                                client_key=producer / "guardian.key_secret") as client:
                client.notify("through CURVE")
                assert discord.wait_for(1, timeout=60), (home / "logs" / "notifier.log").read_text()
            assert discord.messages("1")[0]["content"] == "through CURVE"
            log = (home / "logs" / "notifier.log").read_text()
            assert "CURVE on: 1 producers allowed from" in log and "guardian" in log
            relay.terminate()
            assert relay.wait(60) == 0
        finally:
            relay.kill()
            relay.wait(60)


def test_a_root_owned_secret_key_is_exit_2_in_validate_and_in_the_relay(service_host):
    """What the README said before: keygen as root without --owner. The service user
    cannot read the key: both refuse with exit 2, so systemd does not restart it for ever."""
    home, systemd = service_host / "opt" / "swimmy", service_host / "systemd"
    python = str(home / ".venv" / "bin" / "python")
    curve_dir = service_host / "etc" / "curve"
    for name in ("relay", "guardian"):
        made = subprocess.run([python, "-m", "notifier", "keygen", str(curve_dir), name],
                              capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
    unit = systemd / "swimmy-notifier.service"
    environment = {**unit_environment(unit), "SWIMMY_PORT_NOTIFIER": str(free_port()),
                   "SWIMMY_NOTIFIER_CURVE_SECRET_KEY": str(curve_dir / "relay.key_secret"),
                   "SWIMMY_NOTIFIER_CURVE_CLIENTS": str(curve_dir)}
    check = as_service(unit, [python, "-m", "notifier", "validate"], environment,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = check.communicate(timeout=60)
    relay = as_service(unit, [python, "-m", "notifier"], environment)
    assert (check.returncode, relay.wait(60)) == (2, 2), err
    assert "Permission denied" in err
    assert "Permission denied" in (home / "logs" / "notifier.log").read_text()
