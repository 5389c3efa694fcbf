"""Shared fixtures."""

import pytest

from tests.harness import Pusher, RelayProcess
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


@pytest.fixture
def relays(tmp_path):
    """Start relay processes: ``relays(allowed="127.0.0.1:PORT", **settings)``. Any
    still running when the test ends are killed."""
    started = []

    def start(home=tmp_path, allowed=None, **settings):
        relay = RelayProcess(home, allowed, **settings)
        started.append(relay)
        return relay.start()
    yield start
    for relay in started:
        relay.kill()


@pytest.fixture
def pushers():
    """Make PUSH sockets, closed however the test ends (an open one would make the
    garbage collector block in zmq's context termination)."""
    made = []

    def make(endpoint, **options):
        made.append(Pusher(endpoint, **options))
        return made[-1]
    yield make
    for pusher in made:
        pusher.close()
