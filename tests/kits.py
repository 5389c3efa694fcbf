"""The producer kits under their real toolchains, for the tests and the benchmark: the Lisp
kit compiled once by SBCL (with pzmq and Debian's cl-cffi), the Rust kit built once by
cargo offline from Debian's crates, each then driven as a real process.

Compiled output goes to a scratch directory (ASDF's cache, cargo's target directory),
never into the repository. Each `build_*` returns a kit, or raises `Unavailable` with the
reason when the toolchain or a dependency is missing here (tests skip with it); a kit
that fails to compile on a complete toolchain raises `BuildError` (tests fail with it).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import selectors
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from notifier import sexp
from tests.test_client import bind_relay

ROOT = Path(__file__).resolve().parent.parent
KITS = ROOT / "notifier" / "producers"
DRIVERS = Path(__file__).resolve().parent / "kit_drivers"
DEBIAN_CRATES = Path("/usr/share/cargo/registry")


class Unavailable(Exception):
    """What this machine lacks to build a kit (a reason to skip)."""


class BuildError(Exception):
    """A kit that did not compile although everything it needs is here."""


def built(build, scratch: Path, **options):
    """`build(scratch)`, or the test skipped with what this machine lacks."""
    try:
        return build(scratch, **options)
    except Unavailable as exc:
        pytest.skip(str(exc))


@contextlib.contextmanager
def pull_socket():
    """A PULL socket on a loopback port of its own, standing in for the relay:
    (socket, endpoint)."""
    context = zmq.Context()
    try:
        yield bind_relay(context)
    finally:
        context.destroy(linger=0)


def pzmq_directory() -> Path | None:
    """pzmq: $PZMQ_DIR, else ../shared/vendor/pzmq beside the checkout."""
    candidate = Path(os.environ.get("PZMQ_DIR") or ROOT.parent / "shared" / "vendor" / "pzmq")
    return candidate if (candidate / "pzmq.asd").is_file() else None


class Answer:
    """Reads one reply of a driver process, waiting at most a deadline for it."""

    def __init__(self, process: subprocess.Popen, log: Path, what: str):
        self.process, self.log, self.what = process, log, what
        self.selector = selectors.DefaultSelector()
        self.selector.register(process.stdout, selectors.EVENT_READ)
        self.buffer = b""

    def take(self, size: int | None, timeout: float) -> bytes:
        """`size` bytes, or (None) one line without its newline."""
        deadline = time.monotonic() + timeout
        while True:
            if size is None and b"\n" in self.buffer:
                line, _, self.buffer = self.buffer.partition(b"\n")
                return line
            if size is not None and len(self.buffer) >= size:
                data, self.buffer = self.buffer[:size], self.buffer[size:]
                return data
            left = deadline - time.monotonic()
            if left <= 0:
                self.process.kill()
                raise AssertionError(f"{self.what} did not answer within {timeout} s "
                                     f"(blocked?); its standard error:\n{self.tail()}")
            if self.selector.select(left):
                chunk = os.read(self.process.stdout.fileno(), 1 << 16)
                if not chunk:
                    raise AssertionError(f"{self.what} exited with {self.process.wait(10)}:"
                                         f"\n{self.tail()}")
                self.buffer += chunk

    def tail(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-4000:]


class DriverProcess:
    """A driver process: one request on standard input, one answer on standard output."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path, what: str):
        self.log = log
        self._log = open(log, "ab")  # a file, not a pipe: a full pipe would block the driver
        self.process = subprocess.Popen(command, env=env, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self._log)
        self.answer = Answer(self.process, log, what)

    def request(self, text: str) -> None:
        self.process.stdin.write(text.encode("utf-8"))
        self.process.stdin.flush()

    def stderr(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def close(self, timeout: float = 30) -> int:
        """End of input: the driver closes its notifier (waiting at most the linger)."""
        try:
            self.process.stdin.close()
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(10)
            self.process.stdout.close()
            self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


# ------------------------------------------------------------------------------ Lisp


class LispProducer(DriverProcess):
    """SBCL with the kit loaded (tests/kit_drivers/driver.lisp), evaluating forms."""

    def eval(self, form: str, timeout: float = 60) -> Any:
        """The value of `form` (read in the package KIT-DRIVER, which uses the kit), in the
        Python view; a Lisp error raises AssertionError with its message."""
        self.request(form + "\n")
        line = self.answer.take(None, timeout)
        while not line.startswith(b"#answer "):  # the C compiler's output, at the first load
            line = self.answer.take(None, timeout)
        size = int(line[len(b"#answer "):])
        reply = sexp.loads(b"(" + self.answer.take(size, timeout) + b")")
        if "error" in reply:
            raise AssertionError(f"Lisp error: {reply['error']}")
        return reply["ok"]


class LispKit:
    def __init__(self, sbcl: str, pzmq: Path, cache: Path, scratch: Path):
        self.sbcl, self.pzmq, self.cache, self.scratch = sbcl, pzmq, cache, scratch
        self.started = 0

    def start(self, **env: str) -> LispProducer:
        """A new SBCL with the kit loaded; `env` adds environment variables."""
        self.started += 1
        environ = {**os.environ, "PZMQ_DIR": str(self.pzmq), "KIT_DIR": str(KITS / "lisp"),
                   "KIT_ASDF_CACHE": str(self.cache), **env}
        command = [self.sbcl, "--noinform", "--no-sysinit", "--no-userinit",
                   "--non-interactive", "--load", str(DRIVERS / "driver.lisp")]
        return LispProducer(command, environ, self.scratch / f"sbcl-{self.started}.log", "SBCL")


MISSING_LISP_PARTS = (  # what SBCL says when a Debian package is missing, and which
    (r"Component \S*CFFI\S* not found", "cl-cffi"),
    (r"zmq\.h|Unable to load foreign library", "libzmq3-dev"),
    (r'execute "?cc\b', "gcc"),
)


def build_lisp(scratch: Path) -> LispKit:
    """Compile pzmq and the kit once into `scratch`; an SBCL that evaluates (+ 1 2)."""
    sbcl = shutil.which("sbcl")
    if sbcl is None:
        raise Unavailable("sbcl is not installed (apt-get install sbcl cl-cffi libzmq3-dev)")
    pzmq = pzmq_directory()
    if pzmq is None:
        raise Unavailable("pzmq not found: set PZMQ_DIR or put it at ../shared/vendor/pzmq "
                          "(see shared/vendor/VENDOR.md)")
    scratch.mkdir(parents=True, exist_ok=True)
    kit = LispKit(sbcl, pzmq, scratch / "asdf-cache", scratch)
    with kit.start() as lisp:
        try:
            assert lisp.eval("(+ 1 2)", timeout=600) == 3
        except AssertionError as exc:
            missing = next((package for pattern, package in MISSING_LISP_PARTS
                            if re.search(pattern, lisp.stderr(), re.IGNORECASE)), None)
            if missing:
                raise Unavailable(f"the Lisp kit needs {missing} (apt-get install "
                                  f"{missing})") from None
            raise BuildError(f"the Lisp kit did not load: {exc}") from None
    return kit


# ------------------------------------------------------------------------------ Rust


class RustProducer(DriverProcess):
    """The Rust driver (tests/kit_drivers/rust): one JSON command, one JSON answer."""

    def call(self, timeout: float = 60, **command: Any) -> dict:
        self.request(json.dumps(command) + "\n")
        return json.loads(self.answer.take(None, timeout))


class RustKit:
    def __init__(self, cargo: str, workspace: Path, env: dict[str, str], driver: Path):
        self.cargo, self.workspace, self.env, self.driver = cargo, workspace, env, driver
        self.started = 0

    @property
    def crate(self) -> Path:
        return self.workspace / "swimmy-notifier-producer"

    def cargo_run(self, *args: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run([self.cargo, *args], cwd=cwd, env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def start(self, **env: str) -> RustProducer:
        self.started += 1
        return RustProducer([str(self.driver)], {**os.environ, **env},
                            self.workspace / f"driver-{self.started}.log", "the Rust driver")


def build_rust(scratch: Path, release: bool = False) -> RustKit:
    """Copy the kit and the driver into `scratch` and build both (and the kit's tests)
    with cargo, offline, from Debian's crates; nothing is written into the repository."""
    cargo = shutil.which("cargo")
    if cargo is None:
        raise Unavailable("cargo is not installed (apt-get install cargo)")
    for crate in ("zmq-0.9", "serde_json-1."):
        if not any(DEBIAN_CRATES.glob(f"{crate}*/Cargo.toml")):
            raise Unavailable(f"{crate}* is not in {DEBIAN_CRATES} (apt-get install "
                              "librust-zmq-dev librust-serde-json-dev)")
    workspace = scratch / "cargo"
    shutil.copytree(KITS / "rust", workspace / "swimmy-notifier-producer")
    shutil.copytree(DRIVERS / "rust", workspace / "driver")
    # The kit's own source replacement, for the driver beside it too.
    shutil.copytree(KITS / "rust" / ".cargo", workspace / ".cargo")
    env = {**os.environ, "CARGO_HOME": str(scratch / "cargo-home"),
           "CARGO_TARGET_DIR": str(scratch / "target"), "CARGO_NET_OFFLINE": "true"}
    kit = RustKit(cargo, workspace, env, scratch / "target" / ("release" if release else "debug")
                  / "kit-driver")
    profile = ["--release"] if release else []
    for args, cwd in ((["build", "--offline", *profile], workspace / "driver"),
                      (["test", "--offline", "--no-run"], kit.crate)):
        done = kit.cargo_run(*args, cwd=cwd)
        if done.returncode != 0:
            output = done.stdout + done.stderr
            if "error[E" in output or "error: could not compile `swimmy" in output \
                    or "could not compile `kit-driver" in output:
                raise BuildError(f"cargo {' '.join(args)} failed:\n{output[-4000:]}")
            raise Unavailable(f"cargo cannot build offline here: {output.strip()[-600:]}")
    return kit
