"""Shared fixtures."""

import pytest

from tests.sbcl import Sbcl, find_sbcl


@pytest.fixture(scope="session")
def sbcl():
    """A running SBCL that reads and prints back S-expressions; skips without SBCL
    (CI installs Debian's sbcl package)."""
    executable = find_sbcl()
    if executable is None:
        pytest.skip("sbcl is not installed (apt-get install sbcl)")
    process = Sbcl(executable)
    yield process
    process.close()
