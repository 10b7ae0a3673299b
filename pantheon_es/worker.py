"""A worker process: registers its capacity, takes offers, runs tasks, reports.

* Registers with its capacity, slots and labels (a new *incarnation* per process
  start), renews its registration by heartbeat, and listens for offers on
  ``<root>.work.<tenant>.<worker_id>``.
* For each offer it runs the task with the executor of its kind and renews the
  lease every third of its TTL, telling whether the task showed activity
  (output, progress, messages) and what it uses (psutil: CPU and memory of the
  process tree the executor registered; the worker process itself for python
  tasks, which run in it).
* A task that finishes within ``start_report_delay`` has its start reported
  together with its completion (one atomic batch); a longer one reports its
  start as soon as the delay has passed.
* A report answered ``stale_lease`` means the lease is no longer ours (it
  expired, the task was cancelled or timed out): the execution is stopped and
  its result dropped. Reports are retried while the service is unavailable.
* Graceful shutdown: drain (no new offers), let running tasks finish within
  ``shutdown_timeout``, hand back the leases of those that did not, stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import psutil
import structlog
from nats.aio.msg import Msg

from pantheon_es import __version__, connection, ids
from pantheon_es.client import PantheonClient, close_connection
from pantheon_es.errors import (
    ConflictError,
    NotFoundError,
    PantheonError,
    StaleLeaseError,
    UnavailableError,
)
from pantheon_es.executors import ExecutionError, Executor, TaskContext, default_executors
from pantheon_es.reports import report_batcher
from pantheon_es.specs import AgentSpec, PythonSpec, ShellSpec
from pantheon_es.subjects import Subjects

log = structlog.get_logger(__name__)

_SPECS: dict[str, type[Any]] = {"shell": ShellSpec, "python": PythonSpec, "agent": AgentSpec}


def default_capacity() -> dict[str, Any]:
    return {
        "cpu": float(os.cpu_count() or 1),
        "memory_mb": int(psutil.virtual_memory().total // (1024 * 1024)),
        "gpu": 0,
        "custom": {},
    }


@dataclass
class WorkerConfig:
    nats_url: str
    tenant: str = "default"
    root: str = "pantheon"
    worker_id: str | None = None
    capacity: dict[str, Any] = field(default_factory=default_capacity)
    slots: int = 16
    labels: dict[str, str] = field(default_factory=dict)
    ttl: float = 15.0  # declared lost this long after its last heartbeat
    shutdown_timeout: float = 30.0
    start_report_delay: float = 0.02
    data_dir: Path = Path(".pantheon")
    agent_templates: dict[str, list[str]] = field(default_factory=dict)
    report_timeout: float = 120.0  # how long a final report is retried while unavailable
    #: How often a shell or agent task's process tree is measured (psutil) while it runs.
    usage_interval: float = 1.0
    #: Other tenants whose tasks it also runs ("*": every tenant); its own always.
    serve_tenants: list[str] = field(default_factory=list)


class _Usage:
    """CPU and memory of a set of processes, by psutil."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}
        self._last: dict[str, float] | None = None

    def add(self, pid: int) -> None:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            proc.cpu_percent(None)  # start the measuring interval
            self._procs[pid] = proc

    def sample(self) -> dict[str, float] | None:
        """Use since the last sample; the last reading once every process has exited."""
        cpu = 0.0
        rss = 0
        measured = False
        for root in list(self._procs.values()):
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            for proc in tree:
                with contextlib.suppress(psutil.Error):
                    if proc.pid not in self._procs:
                        self._procs[proc.pid] = proc
                        proc.cpu_percent(None)
                    cpu += proc.cpu_percent(None)
                    rss += proc.memory_info().rss
                    measured = True
        if measured:
            self._last = {"cpu_percent": round(cpu, 1), "memory_mb": round(rss / (1024 * 1024), 2)}
        return self._last

    @property
    def last(self) -> dict[str, float] | None:
        """The last reading, without measuring again (walking a process tree costs a /proc scan)."""
        return self._last


@dataclass
class Execution:
    offer: dict[str, Any]
    task: asyncio.Task[None] | None = None
    activity: bool = False
    started_reported: bool = False
    returned: bool = False  # the executor is done (its report may still be on its way)
    started_at: datetime | None = None
    usage: _Usage = field(default_factory=_Usage)
    lost: bool = False  # the lease is no longer ours
    timers: list[asyncio.TimerHandle] = field(default_factory=list)
    start_report: asyncio.Future[None] | None = None

    @property
    def task_id(self) -> str:
        return str(self.offer["task_id"])

    @property
    def tenant(self) -> str | None:
        """The task's tenant (offers from a scheduler before shared workers carry none)."""
        return self.offer.get("tenant")

    @property
    def lease(self) -> dict[str, Any]:
        return {
            "task_id": self.offer["task_id"],
            "lease_id": self.offer["lease_id"],
            "fencing_token": self.offer["fencing_token"],
        }


class Worker:
    """Runs tasks offered by the scheduler. ``async with Worker(cfg) as w: await w.run()``."""

    def __init__(self, config: WorkerConfig, executors: dict[str, Executor] | None = None) -> None:
        self.config = config
        self.subjects = Subjects(config.root)
        self.worker_id = config.worker_id or f"{socket.gethostname()}-{ids.new_id()[-8:]}".replace(
            ".", "-"
        )
        self.incarnation = ids.new_id()
        self.executors = executors or default_executors(config.agent_templates)
        self.running: dict[str, Execution] = {}
        self.client: PantheonClient | None = None
        self._subs: list[Any] = []
        self._clients: dict[str, PantheonClient] = {}
        self._stop = asyncio.Event()
        self._draining = False
        self._tasks: set[asyncio.Task[Any]] = set()
        #: Lease reports of one loop turn leave as one request (pantheon_es/reports.py).
        self._reports = report_batcher()
        self._self_usage = _Usage()
        self._self_usage.add(os.getpid())

    # -- life cycle ---------------------------------------------------------------------------
    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    async def start(self) -> None:
        nc = await connection.connect(
            self.config.nats_url,
            name=f"pantheon-worker-{self.worker_id}",
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
        )
        self.client = PantheonClient(
            nc,
            tenant=self.config.tenant,
            subjects=self.subjects,
            timeout=10,
            actor=f"worker:{self.worker_id}",
        )
        serves = self.config.serve_tenants
        if "*" in serves:
            patterns = [self.subjects.work_any(self.worker_id)]
        else:
            tenants = dict.fromkeys([self.config.tenant, *serves])
            patterns = [self.subjects.work(t, self.worker_id) for t in tenants]
        self._subs = [await nc.subscribe(p, cb=self._on_msg) for p in patterns]
        await self._register()
        log.info("worker registered", worker_id=self.worker_id, tenant=self.config.tenant)

    async def _register(self) -> None:
        assert self.client is not None
        await self._retrying(
            lambda: self.client.command(
                "worker",
                "register",
                {
                    "worker_id": self.worker_id,
                    "incarnation": self.incarnation,
                    "capacity": self.config.capacity,
                    "slots": self.config.slots,
                    "labels": self.config.labels,
                    "hostname": socket.gethostname(),
                    "pid": os.getpid(),
                    "version": __version__,
                    "ttl": self.config.ttl,
                    "tenants": self.config.serve_tenants,
                    "offer_batches": True,
                },
            ),
            deadline=None,
        )

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Heartbeat the registration until asked to stop, then shut down gracefully."""
        interval = self.config.ttl / 3
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), interval)
            if self._stop.is_set():
                break
            await self._worker_heartbeat()
        await self.shutdown()

    async def _worker_heartbeat(self) -> None:
        assert self.client is not None
        body = {
            "worker_id": self.worker_id,
            "incarnation": self.incarnation,
            "usage": self._self_usage.sample(),
            "running": len(self.running),
        }
        try:
            await self.client.command("worker", "heartbeat", body)
        except (ConflictError, NotFoundError):
            # Declared lost (or never known): our leases are gone; register again.
            log.warning("worker registration lapsed; registering again", worker_id=self.worker_id)
            await self._register()
        except UnavailableError as err:
            log.warning("worker heartbeat not delivered", error=err.message)

    async def shutdown(self) -> None:
        """Drain, wait for running tasks, hand back the rest, deregister. Idempotent."""
        if self.client is None:
            return
        client, self.client = self.client, None
        self._stop.set()
        self._draining = True
        with contextlib.suppress(PantheonError):
            await client.command(
                "worker", "drain", {"worker_id": self.worker_id, "incarnation": self.incarnation}
            )
        waiting = [e.task for e in self.running.values() if e.task is not None]
        if waiting:
            log.info("waiting for running tasks", count=len(waiting))
            await asyncio.wait(waiting, timeout=self.config.shutdown_timeout)
        self.client = client  # the hand-backs below still report
        for execution in list(self.running.values()):
            if execution.task is not None and not execution.task.done():
                execution.lost = True  # from here on the lease is handed back, not finished
                execution.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await execution.task
                with contextlib.suppress(PantheonError):
                    await self._for(execution, client).command(
                        "task", "release", {**execution.lease, "reason": "worker shut down"}
                    )
        with contextlib.suppress(PantheonError):
            await client.command(
                "worker", "stop", {"worker_id": self.worker_id, "incarnation": self.incarnation}
            )
        self.client = None
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        await close_connection(client.nc)
        log.info("worker stopped", worker_id=self.worker_id)

    # -- offers and stops -----------------------------------------------------------------------
    async def _on_msg(self, msg: Msg) -> None:
        try:
            message = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            log.warning("unreadable work message ignored")
            return
        kind = message.get("type")
        if kind == "offer":
            self._take(message)
        elif kind == "offers":  # several decided together for this worker
            offers = message.get("offers")
            for offer in offers if isinstance(offers, list) else ():
                self._take(offer)
        elif kind == "stop":
            execution = self.running.get(message.get("task_id", ""))
            if (
                execution
                and execution.offer["lease_id"] == message.get("lease_id")
                and execution.task
            ):
                log.info("stopping task", task_id=execution.task_id, reason=message.get("reason"))
                execution.lost = True
                execution.task.cancel()

    def _take(self, offer: dict[str, Any]) -> None:
        task_id = offer["task_id"]
        if task_id in self.running:
            return  # the same offer twice
        execution = Execution(offer)
        self.running[task_id] = execution
        if self._draining:
            self._background(self._hand_back(execution, "worker draining"))
            return
        execution.task = asyncio.create_task(self._execute(execution), name=f"task-{task_id}")

    def _for(self, execution: Execution, client: PantheonClient) -> PantheonClient:
        """The client that speaks for the task's tenant (a shared worker serves several)."""
        tenant = execution.tenant or self.config.tenant
        if tenant == self.config.tenant:
            return client
        found = self._clients.get(tenant)
        if found is None or found.nc is not client.nc:
            found = self._clients[tenant] = PantheonClient(
                client.nc,
                tenant=tenant,
                subjects=self.subjects,
                timeout=10,
                actor=f"worker:{self.config.tenant}/{self.worker_id}",
            )
        return found

    def _background(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _hand_back(self, execution: Execution, reason: str) -> None:
        if self.client is not None:
            with contextlib.suppress(PantheonError):
                await self._reports.send(
                    self._for(execution, self.client),
                    "release",
                    {**execution.lease, "reason": reason},
                )
        self.running.pop(execution.task_id, None)

    # -- running one task --------------------------------------------------------------------------
    def _context(self, execution: Execution) -> TaskContext:
        offer = execution.offer
        assert self.client is not None
        client = self._for(execution, self.client)
        # Created by the executors that write there (python tasks never do).
        output_dir = self.config.data_dir / "outputs" / offer["task_id"] / str(offer["attempt"])

        def mark() -> None:
            execution.activity = True

        async def progress(fraction: float | None, message: str, state: str) -> None:
            mark()
            await self._report(
                execution, "progress", {"progress": fraction, "message": message, "state": state}
            )

        async def heartbeat() -> None:
            mark()
            await self._report(
                execution, "heartbeat", {"activity": True, "usage": self._usage(execution)}
            )

        async def inbox(max_messages: int, wait: float | None) -> list[dict[str, Any]]:
            mark()
            return await client.receive_messages(
                offer["task_id"], max=max_messages, ack=True, wait=wait
            )

        async def send(to: str, body: str, priority: str, type_: str) -> str:
            mark()
            sent = await client.send_message(
                to, body, priority=priority, type=type_, sender=offer["task_id"]
            )
            return str(sent["message_id"])

        return TaskContext(
            task_id=offer["task_id"],
            tenant=execution.tenant or self.config.tenant,
            attempt=offer["attempt"],
            lease_id=offer["lease_id"],
            fencing_token=offer["fencing_token"],
            name=offer.get("name", ""),
            output_dir=output_dir,
            nats_url=self.config.nats_url,
            namespace=self.config.root,
            progress=progress,
            heartbeat=heartbeat,
            inbox=inbox,
            send=send,
            mark_activity=mark,
            add_pid=execution.usage.add,
            inputs=offer.get("inputs"),  # a workflow task: its dependencies' results
        )

    async def _execute(self, execution: Execution) -> None:
        offer = execution.offer
        structlog.contextvars.bind_contextvars(task_id=offer["task_id"], lease_id=offer["lease_id"])
        execution.started_at = datetime.now(UTC)
        kind = offer["executor"]["kind"]
        if kind == "python":
            # Python tasks run in this process: they report the worker's own use, which the
            # worker measures on its heartbeats (one /proc read per interval, not per task).
            execution.usage = self._self_usage
        # Timers, not tasks: most tasks finish before either fires.
        loop = asyncio.get_running_loop()
        execution.timers = [
            loop.call_later(self.config.start_report_delay, self._report_start, execution),
            loop.call_later(float(offer["ttl"]) / 3, self._renew, execution),
        ]
        if kind != "python":  # a process tree of its own: measure it while it runs
            execution.timers.append(
                loop.call_later(self.config.usage_interval, self._sample, execution)
            )
        outcome: tuple[str, Any]
        try:
            spec = _SPECS[kind].model_validate(offer["executor"])
            result = await self.executors[kind].run(spec, self._context(execution))
            outcome = ("complete", result)
        except ExecutionError as err:
            outcome = ("fail", {"type": err.type, "message": err.message, "details": err.details})
        except asyncio.CancelledError:
            self.running.pop(execution.task_id, None)
            raise
        except Exception as exc:  # an executor bug: the task fails, the worker lives on
            log.exception("executor failed unexpectedly")
            outcome = ("fail", {"type": type(exc).__name__, "message": str(exc)})
        finally:
            execution.returned = True
            for timer in execution.timers:
                timer.cancel()
        if execution.start_report is not None:  # its start goes to the service first
            with contextlib.suppress(asyncio.CancelledError):
                await execution.start_report
        try:
            if not execution.lost:
                await self._finish(execution, *outcome)
        finally:
            self.running.pop(execution.task_id, None)

    def _report_start(self, execution: Execution) -> None:
        # One loop turn later: a function that returned just before the timer fired has
        # its result queued on the loop already, and its completion carries the start.
        asyncio.get_running_loop().call_soon(self._report_start_now, execution)

    def _report_start_now(self, execution: Execution) -> None:
        if execution.returned:
            return
        execution.started_reported = True
        execution.start_report = asyncio.ensure_future(
            self._report(execution, "start", {"pid": os.getpid()})
        )

    def _renew(self, execution: Execution) -> None:
        """Renew the lease, and arm the next renewal."""
        interval = float(execution.offer["ttl"]) / 3
        # timers = [start report, next renewal]: replace the renewal that just fired.
        execution.timers[1] = asyncio.get_running_loop().call_later(
            interval, self._renew, execution
        )
        activity, execution.activity = execution.activity, False
        usage = self._usage(execution)
        self._background(
            self._report(execution, "heartbeat", {"activity": activity, "usage": usage})
        )

    def _sample(self, execution: Execution) -> None:
        """Measure a task's process tree now and every ``usage_interval`` while it runs."""
        execution.usage.sample()
        # timers = [start report, next renewal, next sample]: replace the sample that fired.
        execution.timers[2] = asyncio.get_running_loop().call_later(
            self.config.usage_interval, self._sample, execution
        )

    def _usage(self, execution: Execution) -> dict[str, float] | None:
        """The task's latest reading: its own process tree's, or (python) the worker's."""
        return execution.usage.last

    async def _finish(self, execution: Execution, verb: str, value: Any) -> None:
        # The last reading: by now the task's processes are gone, and a new sample
        # would walk /proc for nothing.
        body: dict[str, Any] = {"usage": execution.usage.last}
        if not execution.started_reported and execution.started_at is not None:
            body["started_at"] = execution.started_at.isoformat()
        if verb == "complete":
            body["result"] = value
        else:
            body["error"] = value
        await self._report(execution, verb, body, final=True)

    async def _report(
        self, execution: Execution, verb: str, extra: dict[str, Any], *, final: bool = False
    ) -> None:
        """Send a lease report; stale -> stop the execution; unavailable -> retry (final
        reports)."""
        if self.client is None or execution.lost:
            return
        client = self._for(execution, self.client)
        body = {**execution.lease, **{k: v for k, v in extra.items() if v is not None}}
        deadline = time.monotonic() + (self.config.report_timeout if final else 0)
        attempt = 0
        while True:
            attempt += 1
            try:
                await self._reports.send(client, verb, body)
                return
            except StaleLeaseError as err:
                if final and attempt > 1:
                    return  # a retry after a lost reply: the first attempt was recorded
                log.warning("lease is no longer ours; stopping", verb=verb, error=err.message)
                execution.lost = True
                if execution.task is not None and execution.task is not asyncio.current_task():
                    execution.task.cancel()
                return
            except UnavailableError as err:
                if time.monotonic() >= deadline:
                    log.warning("report not delivered", verb=verb, error=err.message)
                    return
                await asyncio.sleep(min(2.0, 0.1 * attempt))
            except PantheonError as err:
                log.warning("report refused", verb=verb, code=err.code.value, error=err.message)
                return

    async def _retrying(self, call: Any, deadline: float | None) -> Any:
        attempt = 0
        while True:
            attempt += 1
            try:
                return await call()
            except UnavailableError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(min(2.0, 0.1 * attempt))
