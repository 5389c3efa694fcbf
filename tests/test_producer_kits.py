"""The producer kits ship inside the Python package: `python -m notifier producer-kit`
finds them, and setup.cfg's package data carries every file of theirs into an install."""

import configparser
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("kind, marker", [("lisp", "swimmy-notifier-producer.asd"),
                                          ("rust", "Cargo.toml")])
def test_producer_kit_prints_the_absolute_directory_of_the_kit(kind, marker):
    done = subprocess.run([sys.executable, "-m", "notifier", "producer-kit", kind],
                          capture_output=True, text=True, timeout=60, cwd="/")
    assert done.returncode == 0, done.stderr
    directory = Path(done.stdout.strip())
    assert done.stdout == f"{directory}\n" and directory.is_absolute()
    assert (directory / marker).is_file()
    assert directory == ROOT / "notifier" / "producers" / kind


def test_an_unknown_kit_is_a_usage_error():
    done = subprocess.run([sys.executable, "-m", "notifier", "producer-kit", "go"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "choose from 'lisp', 'rust'" in done.stderr


def test_every_file_of_the_kits_is_package_data():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    package = ROOT / "notifier"
    shipped = {path for pattern in setup["options.package_data"]["notifier"].split()
               for path in package.glob(pattern)}
    files = {path for path in (package / "producers").rglob("*") if path.is_file()}
    assert files and files == shipped
