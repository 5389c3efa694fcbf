"""Shared fixtures, and the hypothesis profiles every property test runs under."""

import os

import pytest
from hypothesis import settings

from tests.harness import Pusher, RelayProcess
from tests.sbcl import Sbcl, find_sbcl

# A fixed budget of examples keeps the suite's time bounded; CI (CI=true) derandomizes,
# so a run there is reproducible. No deadline: on a loaded machine any example can be
# slow now and then. HYPOTHESIS_PROFILE=thorough searches a hundred times longer.
settings.register_profile("default", max_examples=100, deadline=None)
settings.register_profile("ci", settings.get_profile("default"), derandomize=True)
settings.register_profile("thorough", max_examples=10_000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE")
                      or ("ci" if os.environ.get("CI", "").lower() not in ("", "0", "false")
                          else "default"))


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
