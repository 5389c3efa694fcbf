"""The install an operator runs: scripts/install.sh into a scratch root, and the systemd
units and logrotate configuration it installs, checked by systemd's and logrotate's own
tools where they exist (CI installs both)."""

import getpass
import grp
import os
import re
import shutil
import stat
import subprocess
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
