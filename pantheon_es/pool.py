"""The local worker pool of ``pantheon up``: ``pantheon worker`` processes it supervises.

Each worker is a separate process (python tasks then run beside the node, not
inside it, and a crashing task takes only its worker down). A worker that exits
while the node runs is started again after a backoff, with a new incarnation
under the same worker id, so the scheduler expires its old leases at once. On
shutdown each worker gets SIGTERM: it drains, finishes or hands back its
leases, and deregisters. Workers die with the node (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import structlog

from pantheon_es.embedded import _die_with_parent

log = structlog.get_logger(__name__)


class WorkerPool:
    def __init__(
        self,
        nats_url: str,
        root: str,
        data_dir: Path,
        *,
        size: int,
        tenant: str = "default",
        slots: int = 16,
        shutdown_timeout: float = 30.0,
    ) -> None:
        self.nats_url = nats_url
        self.root = root
        self.data_dir = data_dir
        self.size = size
        self.tenant = tenant
        self.slots = slots
        self.shutdown_timeout = shutdown_timeout
        host = socket.gethostname().split(".")[0].replace("_", "-")
        self.ids = [f"{host}-{os.getpid()}-w{i + 1}" for i in range(size)]
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self._stopping = False

    def _argv(self, worker_id: str) -> list[str]:
        return [
            sys.executable, "-m", "pantheon_es.cli", "worker",
            "--nats-url", self.nats_url,
            "--namespace", self.root,
            "--tenant", self.tenant,
            "--data-dir", str(self.data_dir),
            "--worker-id", worker_id,
            "--slots", str(self.slots),
            "--shutdown-timeout", str(self.shutdown_timeout),
        ]  # fmt: skip

    async def _spawn(self, worker_id: str) -> asyncio.subprocess.Process:
        log_path = self.data_dir / "logs" / f"{worker_id}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as out:
            proc = await asyncio.create_subprocess_exec(
                *self._argv(worker_id),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the node, which stops workers in order
                preexec_fn=_die_with_parent,
            )
        self.procs[worker_id] = proc
        log.info("worker started", worker_id=worker_id, pid=proc.pid, log=str(log_path))
        return proc

    async def start(self) -> None:
        for worker_id in self.ids:
            await self._spawn(worker_id)

    async def supervise(self) -> None:
        """Start a worker again when it exits while the node runs."""
        async with asyncio.TaskGroup() as group:
            for worker_id in self.ids:
                group.create_task(self._keep(worker_id))

    async def _keep(self, worker_id: str) -> None:
        restarts = 0
        while not self._stopping:
            proc = self.procs.get(worker_id) or await self._spawn(worker_id)
            code = await proc.wait()
            if self._stopping:
                return
            restarts += 1
            delay = min(30.0, 0.5 * 2 ** min(restarts, 6))
            log.warning(
                "worker exited; starting it again", worker_id=worker_id, code=code, delay=delay
            )
            self.procs.pop(worker_id, None)
            await asyncio.sleep(delay)

    async def stop(self) -> None:
        """SIGTERM every worker, wait for them to hand back their work, then make sure."""
        self._stopping = True
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                await asyncio.wait_for(proc.wait(), self.shutdown_timeout + 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        self.procs.clear()
