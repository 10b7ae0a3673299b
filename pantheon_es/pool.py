"""Child processes of ``pantheon up``: the read side and the local workers.

Each child is a ``pantheon`` subcommand in a process of its own. A child that
exits while the node runs is started again after a backoff (a worker comes
back as a new incarnation under the same id, so the scheduler expires its old
leases at once). On shutdown each child gets SIGTERM and time to finish (a
worker drains and hands back its leases). Children die with the node
(``PR_SET_PDEATHSIG``) and get no terminal signals of their own: Ctrl-C
reaches the node, which stops them in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import structlog

from pantheon_es.embedded import _die_with_parent

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Child:
    name: str
    argv: list[str]


class Supervisor:
    """Starts named children, restarts those that exit, stops them all on request."""

    def __init__(self, log_dir: Path, *, stop_timeout: float = 30.0) -> None:
        self.log_dir = log_dir
        self.stop_timeout = stop_timeout
        self.children: dict[str, Child] = {}
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self._stopping = False
        self._stopped = asyncio.Event()

    async def add(self, child: Child) -> asyncio.subprocess.Process:
        self.children[child.name] = child
        return await self._spawn(child)

    async def _spawn(self, child: Child) -> asyncio.subprocess.Process:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{child.name}.log"
        with open(log_path, "ab") as out:  # noqa: ASYNC230 - opened once per child start, before the process exists
            proc = await asyncio.create_subprocess_exec(
                *child.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self.procs[child.name] = proc
        log.info("child started", child=child.name, pid=proc.pid, log=str(log_path))
        return proc

    async def supervise(self) -> None:
        """Start a child again when it exits while the node runs; return once stopped."""
        async with asyncio.TaskGroup() as group:
            for name in list(self.children):
                group.create_task(self._keep(name))
        await self._stopped.wait()  # also with no children: the node's parts end together

    async def _keep(self, name: str) -> None:
        restarts = 0
        while not self._stopping:
            proc = self.procs.get(name) or await self._spawn(self.children[name])
            code = await proc.wait()
            if self._stopping:
                return
            restarts += 1
            delay = min(30.0, 0.5 * 2 ** min(restarts, 6))
            log.warning("child exited; starting it again", child=name, code=code, delay=delay)
            self.procs.pop(name, None)
            await asyncio.sleep(delay)

    async def stop(self, names: list[str] | None = None) -> None:
        """SIGTERM the children (all, or just ``names``), wait, then make sure."""
        self._stopping = True
        if names is None:
            self._stopped.set()
        chosen = [n for n in (names or list(self.procs)) if n in self.procs]
        for name in chosen:
            with contextlib.suppress(ProcessLookupError):
                self.procs[name].send_signal(signal.SIGTERM)
        for name in chosen:
            proc = self.procs.pop(name)
            try:
                await asyncio.wait_for(proc.wait(), self.stop_timeout + 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pantheon_es.cli", *args]


def worker_children(
    nats_url: str,
    root: str,
    data_dir: Path,
    *,
    size: int,
    tenant: str = "default",
    slots: int = 16,
    serve_tenants: tuple[str, ...] = (),
    shutdown_timeout: float = 30.0,
) -> list[Child]:
    host = socket.gethostname().split(".")[0].replace("_", "-")
    children = []
    for i in range(size):
        worker_id = f"{host}-{os.getpid()}-w{i + 1}"
        argv = _cli(
            "worker",
            "--nats-url", nats_url,
            "--namespace", root,
            "--tenant", tenant,
            "--data-dir", str(data_dir),
            "--worker-id", worker_id,
            "--slots", str(slots),
            "--shutdown-timeout", str(shutdown_timeout),
            *(arg for t in serve_tenants for arg in ("--serve-tenant", t)),
        )  # fmt: skip
        children.append(Child(worker_id, argv))
    return children


def read_side_child(
    nats_url: str,
    root: str,
    data_dir: Path,
    retention: float | None,
    snapshot_every: int | None = None,
    *,
    linger: float | None = None,
) -> Child:
    argv = _cli(
        "projector", "--nats-url", nats_url, "--namespace", root, "--data-dir", str(data_dir)
    )
    if retention is not None:
        argv += ["--retention", str(retention)]
    if snapshot_every:
        argv += ["--snapshot-every", str(snapshot_every)]
    if linger is not None:
        argv += ["--linger", str(linger)]
    return Child("read-side", argv)
