"""The scheduler: places pending tasks on workers, and keeps every timer.

Its state is the live set only: tasks that are pending, leased or running,
and the workers with their free capacity. It starts from the read models at
the projector's checkpoint (:meth:`Scheduler.bootstrap`) and is then kept
current by the same decoded event batches the projector applies
(:meth:`Scheduler.feed`), so start-up grows with the live set, not with the
history, and the log is read and parsed once per process.

It reacts to events and to one deadline heap (lease expiry, inactivity
timeouts, worker liveness); nothing runs on a fixed interval. Every decision
is a command decided by the aggregate's pure ``decide`` and appended with the
task's expected last sequence (``CommandService.execute(known=...)``): a view
that is out of date costs one reload, never a wrong write.

Placement here is first come, first served within free capacity (slots,
cpu, memory, gpu, custom resources), spreading onto the least loaded worker.
The scheduling issue grows priorities, fairness and reservations on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import structlog
from nats.aio.client import Client as NATS

from pantheon_es import ids
from pantheon_es.errors import PantheonError
from pantheon_es.events import REGISTRY, Event, EventRecord
from pantheon_es.service import CommandService
from pantheon_es.specs import Resources
from pantheon_es.subjects import Subjects
from pantheon_es.tasks import (
    LIVE,
    TASK,
    ExpireLease,
    GrantLease,
    Lease,
    TaskState,
    TaskStatus,
    TimeOutTask,
)
from pantheon_es.workers import WORKER, Capacity, LoseWorker, WorkerState, WorkerStatus

log = structlog.get_logger(__name__)

Key = tuple[str, str]  # (tenant, id)


@dataclass(frozen=True)
class SchedulerConfig:
    lease_ttl: float = 30.0
    #: Default inactivity timeout of a running task (seconds; 0 = none); a task may override.
    inactivity_timeout: float = 1800.0
    #: Lease decisions in flight at once.
    max_inflight: int = 256


@dataclass(slots=True)
class LiveTask:
    tenant: str
    state: TaskState
    seq: int  # last stream sequence of the task's own subject
    order: int  # first come, first served
    spec: dict[str, Any]  # name, executor, labels: what an offer carries
    last_activity: datetime  # messages included
    reserved_on: str | None = None  # worker whose capacity we hold for this task
    granting: bool = False


@dataclass(slots=True)
class LiveWorker:
    tenant: str
    state: WorkerState
    seq: int
    free: Resources
    free_slots: int
    holds: set[str] = field(default_factory=set)  # task ids whose resources we hold

    @property
    def accepting(self) -> bool:
        return self.state.status == WorkerStatus.ACTIVE


def fits(request: Resources, free: Resources, free_slots: int) -> bool:
    """Would ``request`` fit in what a worker has left?"""
    if free_slots < 1 or request.cpu > free.cpu + 1e-9 or request.memory_mb > free.memory_mb:
        return False
    if request.gpu > free.gpu:
        return False
    return all(
        free.custom.get(name, 0.0) + 1e-9 >= amount for name, amount in request.custom.items()
    )


def _take(free: Resources, request: Resources, sign: int) -> Resources:
    custom = dict(free.custom)
    for name, amount in request.custom.items():
        custom[name] = custom.get(name, 0.0) - sign * amount
    return Resources(
        cpu=max(0.0, free.cpu - sign * request.cpu),
        memory_mb=max(0, free.memory_mb - sign * request.memory_mb),
        gpu=max(0, free.gpu - sign * request.gpu),
        custom=custom,
    )


def capacity_as_resources(capacity: Capacity) -> Resources:
    return Resources(
        cpu=capacity.cpu,
        memory_mb=capacity.memory_mb,
        gpu=capacity.gpu,
        custom=dict(capacity.custom),
    )


def choose_worker(request: Resources, workers: Iterable[LiveWorker]) -> LiveWorker | None:
    """The accepting worker with the most free slots that fits ``request``."""
    best: LiveWorker | None = None
    for worker in workers:
        if (
            worker.accepting
            and fits(request, worker.free, worker.free_slots)
            and (best is None or worker.free_slots > best.free_slots)
        ):
            best = worker
    return best


_FINISHING = frozenset({"TaskCompleted", "TaskFailed", "TaskCancelled", "TaskTimedOut"})


def _submitted_state(record: EventRecord) -> TaskState:
    """A new task's state straight from its TaskSubmitted record (what evolve would build)."""
    d = record.data
    at = datetime.fromisoformat(record.occurred_at)
    return TaskState(
        task_id=record.aggregate_id,
        status=TaskStatus.PENDING,
        name=d["name"],
        priority=d["priority"],
        resources=Resources.model_validate(d["resources"]),
        executor_kind=d["executor"]["kind"],
        submitted_at=at,
        last_activity_at=at,
        inactivity_timeout=d.get("inactivity_timeout"),
        max_attempts=d.get("max_attempts", 3),
    )


def _ts(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


class Scheduler:
    """Leases, offers and timers for every tenant of one namespace."""

    def __init__(
        self,
        nc: NATS,
        service: CommandService,
        subjects: Subjects,
        config: SchedulerConfig | None = None,
    ) -> None:
        self.nc = nc
        self.service = service
        self.subjects = subjects
        self.config = config or SchedulerConfig()
        self.tasks: dict[Key, LiveTask] = {}
        self.pending: dict[str, OrderedDict[str, None]] = {}
        self.workers: dict[Key, LiveWorker] = {}
        self.position = 0
        self._ready_at = 0  # act only once the log is read up to here
        self._heap: list[tuple[datetime, int, str, Key, str]] = []
        self._tick = itertools.count()
        self._order = itertools.count()
        self._queue: list[EventRecord] = []
        self._wake = asyncio.Event()
        self._place_needed = True
        self._inflight: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(self.config.max_inflight)
        self._stopping = False

    # -- start-up ------------------------------------------------------------------------------
    def bootstrap(self, db: Any, position: int, head: int) -> None:
        """Load the live set from the read models (a sqlite3 connection) at ``position``.

        Timers fire and placements start only once events up to ``head`` (the
        stream's last sequence at start) have been applied.
        """
        self.position = position
        self._ready_at = head
        if db is None:  # no read models yet: nothing is live
            log.info("scheduler bootstrapped", tasks=0, workers=0, position=position, head=head)
            return
        live = ", ".join(f"'{s}'" for s in LIVE)
        rows = db.execute(
            "SELECT tenant, id, status, name, priority, resources, executor_kind, executor, "
            "labels, submitted_at, last_activity_at, inactivity_timeout, max_attempts, attempt, "
            "lease_id, worker_id, fencing_token, lease_expires_at, lease_ttl, started_at, version, "
            "task_seq "
            f"FROM tasks WHERE status IN ({live}) ORDER BY id"
        ).fetchall()
        for r in rows:
            (tenant, task_id, status, name, priority, resources, kind, executor, labels, submitted,
             last_activity, timeout, max_attempts, attempt, lease_id, worker_id, token, expires,
             ttl, started, version, task_seq) = r  # fmt: skip
            lease = None
            if lease_id:
                lease = Lease(
                    lease_id, worker_id, attempt, token, datetime.fromisoformat(expires), ttl
                )
            state = TaskState(
                task_id=task_id,
                status=TaskStatus(status),
                name=name,
                priority=priority,
                resources=Resources.model_validate_json(resources),
                executor_kind=kind,
                submitted_at=datetime.fromisoformat(submitted),
                last_activity_at=datetime.fromisoformat(last_activity),
                inactivity_timeout=timeout,
                max_attempts=max_attempts,
                attempt=attempt,
                lease=lease,
                started_at=_ts(started),
                version=version,
            )
            spec = {
                "name": name,
                "executor": orjson.loads(executor),
                "labels": orjson.loads(labels),
            }
            self._add_task(tenant, state, task_seq, spec)
        for r in db.execute(
            "SELECT tenant, id, incarnation, status, capacity, slots, labels, ttl, expires_at, "
            "registered_at, last_seq FROM workers WHERE status IN ('active', 'draining')"
        ).fetchall():
            (
                tenant,
                worker_id,
                incarnation,
                status,
                capacity,
                slots,
                labels,
                ttl,
                expires,
                registered,
                seq,
            ) = r
            wstate = WorkerState(
                worker_id=worker_id,
                incarnation=incarnation,
                status=WorkerStatus(status),
                capacity=Capacity.model_validate_json(capacity),
                slots=slots,
                labels=orjson.loads(labels),
                ttl=ttl,
                expires_at=datetime.fromisoformat(expires),
                registered_at=datetime.fromisoformat(registered),
            )
            self._add_worker(tenant, wstate, seq)
        for task in self.tasks.values():  # capacity the live leases hold
            lease = task.state.lease
            if lease is not None:
                self._reserve(task, (task.tenant, lease.worker_id))
        log.info(
            "scheduler bootstrapped",
            tasks=len(self.tasks),
            workers=len(self.workers),
            position=position,
            head=head,
        )

    # -- input -------------------------------------------------------------------------------------
    def feed(self, records: list[EventRecord]) -> None:
        """A decoded batch of the log, in order (a projector sink)."""
        self._queue.extend(records)
        self._wake.set()

    @property
    def ready(self) -> bool:
        return self.position >= self._ready_at

    # -- the loop ----------------------------------------------------------------------------------
    async def run(self) -> None:
        """React to events and deadlines until :meth:`shutdown`."""
        while not self._stopping:
            timeout = None
            if self._heap and self.ready:
                timeout = max(0.0, (self._heap[0][0] - datetime.now(UTC)).total_seconds())
            if not self._queue and not (self._place_needed and self.ready):
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
            if self._stopping:
                break
            records, self._queue = self._queue, []
            for record in records:
                self._apply(record)
            if self.ready:
                await self._fire_due()
                if self._place_needed:
                    self._place_needed = False
                    await self._place()

    async def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=10)

    # -- keeping the live set ----------------------------------------------------------------------
    def _typed(self, record: EventRecord) -> Event[Any]:
        raw = record._asdict()
        del raw["seq"]
        return REGISTRY.from_dict(raw, record.seq)

    def _apply(self, record: EventRecord) -> None:
        self.position = max(self.position, record.seq)
        aggregate = record.aggregate
        if aggregate == "task":
            self._apply_task(record)
        elif aggregate == "worker":
            self._apply_worker(record)
        elif aggregate == "mailbox" and record.type == "MessageSent":
            at = datetime.fromisoformat(record.occurred_at)
            self._touch((record.tenant, record.aggregate_id), at)
            sender = record.data.get("sender", "")
            if ids.is_id(sender):
                self._touch((record.tenant, sender), at)
        elif aggregate == "mailbox":
            self._touch(
                (record.tenant, record.aggregate_id), datetime.fromisoformat(record.occurred_at)
            )

    def _apply_task(self, record: EventRecord) -> None:
        key = (record.tenant, record.aggregate_id)
        task = self.tasks.get(key)
        if record.type == "TaskSubmitted":
            if task is None:
                d = record.data
                spec = {"name": d["name"], "executor": d["executor"], "labels": d["labels"]}
                self._add_task(record.tenant, _submitted_state(record), record.seq, spec)
            return
        if task is None or record.seq <= task.seq:
            return  # finished (not live), or a decision of ours already applied
        if record.type in _FINISHING:
            # No need to fold it: the task leaves the live set. Stop it on its worker if
            # it was cancelled or timed out while it ran.
            lease = task.state.lease
            if lease is not None and record.type in ("TaskCancelled", "TaskTimedOut"):
                reason = "cancelled" if record.type == "TaskCancelled" else "timed_out"
                self._stop_on_worker(task, lease, reason)
            self._release(task)
            self._dequeue(task)
            del self.tasks[key]
            return
        old = task.state
        task.state = TASK.evolve(old, self._typed(record))
        task.seq = record.seq
        new = task.state
        if (
            record.type in ("TaskStarted", "LeaseRenewed", "TaskProgressed")
            and new.last_activity_at > task.last_activity
        ):
            task.last_activity = new.last_activity_at
        if new.status in LIVE:
            self._track(task)
            if new.status == TaskStatus.PENDING and old.status != TaskStatus.PENDING:
                self._release(task)
                self._enqueue(task)
            elif new.lease is not None and task.reserved_on != new.lease.worker_id:
                self._release(task)  # leased by someone else's decision: hold that worker instead
                self._dequeue(task)
                self._reserve(task, (task.tenant, new.lease.worker_id))
            return
        # Finished: stop it on its worker if it was still out there, then forget it.
        if old.lease is not None and new.status in (TaskStatus.CANCELLED, TaskStatus.TIMED_OUT):
            self._stop_on_worker(task, old.lease, new.status.value)
        self._release(task)
        self._dequeue(task)
        del self.tasks[key]

    def _apply_worker(self, record: EventRecord) -> None:
        key = (record.tenant, record.aggregate_id)
        worker = self.workers.get(key)
        if record.type == "WorkerRegistered":
            state = WORKER.evolve(None, self._typed(record))
            if worker is not None and worker.state.incarnation != state.incarnation:
                self._orphan_leases(key, "worker lost")  # the old process is gone
            self._add_worker(record.tenant, state, record.seq)
            self._place_needed = True
            return
        if worker is None or record.seq <= worker.seq:
            return
        worker.state = WORKER.evolve(worker.state, self._typed(record))
        worker.seq = record.seq
        if worker.state.status in (WorkerStatus.STOPPED, WorkerStatus.LOST):
            reason = (
                "worker stopped" if worker.state.status == WorkerStatus.STOPPED else "worker lost"
            )
            self._orphan_leases(key, reason)
            del self.workers[key]
        else:
            self._push(worker.state.expires_at, "worker", key, worker.state.incarnation)

    def _add_task(self, tenant: str, state: TaskState, seq: int, spec: dict[str, Any]) -> None:
        task = LiveTask(tenant, state, seq, next(self._order), spec, state.last_activity_at)
        self.tasks[(tenant, state.task_id)] = task
        if state.status == TaskStatus.PENDING:
            self._enqueue(task)
        self._track(task)

    def _add_worker(self, tenant: str, state: WorkerState, seq: int) -> None:
        key = (tenant, state.worker_id)
        old = self.workers.get(key)
        worker = LiveWorker(tenant, state, seq, capacity_as_resources(state.capacity), state.slots)
        self.workers[key] = worker
        if old is not None and old.state.incarnation == state.incarnation:
            for task_id in old.holds:  # same process re-registered: keep what it holds
                task = self.tasks.get((tenant, task_id))
                if task is not None:
                    task.reserved_on = None
                    self._reserve(task, key)
        self._push(state.expires_at, "worker", key, state.incarnation)

    def _touch(self, key: Key, at: datetime) -> None:
        task = self.tasks.get(key)
        if task is not None and at > task.last_activity:
            task.last_activity = at
            self._track(task)

    def _enqueue(self, task: LiveTask) -> None:
        queue = self.pending.setdefault(task.tenant, OrderedDict())
        queue[task.state.task_id] = None
        self._place_needed = True
        self._wake.set()

    def _dequeue(self, task: LiveTask) -> None:
        queue = self.pending.get(task.tenant)
        if queue is not None:
            queue.pop(task.state.task_id, None)

    def _reserve(self, task: LiveTask, worker_key: Key) -> None:
        worker = self.workers.get(worker_key)
        if worker is None or task.reserved_on is not None:
            return
        worker.free = _take(worker.free, task.state.resources, +1)
        worker.free_slots -= 1
        worker.holds.add(task.state.task_id)
        task.reserved_on = worker_key[1]

    def _release(self, task: LiveTask) -> None:
        if task.reserved_on is None:
            return
        worker = self.workers.get((task.tenant, task.reserved_on))
        task.reserved_on = None
        if worker is not None and task.state.task_id in worker.holds:
            worker.holds.discard(task.state.task_id)
            worker.free = _take(worker.free, task.state.resources, -1)
            worker.free_slots += 1
            self._place_needed = True
            self._wake.set()

    # -- timers ------------------------------------------------------------------------------------
    def _push(self, when: datetime, kind: str, key: Key, token: str) -> None:
        heapq.heappush(self._heap, (when, next(self._tick), kind, key, token))
        self._wake.set()

    def _inactivity(self, task: LiveTask) -> float:
        timeout = task.state.inactivity_timeout
        return self.config.inactivity_timeout if timeout is None else timeout

    def _track(self, task: LiveTask) -> None:
        """(Re)arm the task's timers from its state; stale heap entries are skipped when
        they fire."""
        key = (task.tenant, task.state.task_id)
        lease = task.state.lease
        if lease is not None:
            self._push(lease.expires_at, "lease", key, lease.lease_id)
            timeout = self._inactivity(task)
            if timeout > 0:
                self._push(
                    task.last_activity + timedelta(seconds=timeout), "idle", key, lease.lease_id
                )

    async def _fire_due(self) -> None:
        now = datetime.now(UTC)
        while self._heap and self._heap[0][0] <= now:
            _when, _, kind, key, token = heapq.heappop(self._heap)
            if kind == "lease":
                task = self.tasks.get(key)
                lease = task.state.lease if task else None
                if task and lease and lease.lease_id == token and lease.expires_at <= now:
                    self._decide(task, ExpireLease(task_id=key[1], lease_id=token))
            elif kind == "idle":
                task = self.tasks.get(key)
                if task and task.state.lease and task.state.lease.lease_id == token:
                    timeout = self._inactivity(task)
                    if timeout > 0 and task.last_activity + timedelta(seconds=timeout) <= now:
                        self._decide(
                            task,
                            TimeOutTask(
                                task_id=key[1], timeout=timeout, last_activity_at=task.last_activity
                            ),
                        )
            elif kind == "worker":
                worker = self.workers.get(key)
                if worker and worker.state.incarnation == token and worker.state.expires_at <= now:
                    self._decide_worker(worker, LoseWorker(worker_id=key[1], incarnation=token))

    # -- decisions ---------------------------------------------------------------------------------
    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    def _decide(self, task: LiveTask, command: Any) -> None:
        self._spawn(self._execute(task.tenant, command, (task.state, task.seq)))

    def _decide_worker(self, worker: LiveWorker, command: Any) -> None:
        self._spawn(self._execute(worker.tenant, command, (worker.state, worker.seq)))

    async def _execute(
        self, tenant: str, command: Any, known: tuple[Any, int]
    ) -> dict[str, Any] | None:
        async with self._slots:
            try:
                return await self.service.execute(tenant, command, known=known)
            except PantheonError as err:
                log.info(
                    "scheduler decision refused", command=type(command).__name__, error=err.message
                )
                return None

    def _orphan_leases(self, worker_key: Key, reason: str) -> None:
        for task in list(self.tasks.values()):
            lease = task.state.lease
            if (
                task.tenant == worker_key[0]
                and lease is not None
                and lease.worker_id == worker_key[1]
            ):
                self._decide(
                    task,
                    ExpireLease(task_id=task.state.task_id, lease_id=lease.lease_id, reason=reason),
                )

    async def _place(self) -> None:
        """First come, first served: each pending task onto the least loaded worker it fits."""
        for tenant, queue in self.pending.items():
            workers = [w for (t, _), w in self.workers.items() if t == tenant and w.accepting]
            if not workers:
                continue
            for task_id in list(queue):
                task = self.tasks.get((tenant, task_id))
                if task is None or task.granting or task.state.status != TaskStatus.PENDING:
                    continue
                worker = choose_worker(task.state.resources, workers)
                if worker is None:
                    continue
                self._reserve(task, (tenant, worker.state.worker_id))
                del queue[task_id]
                task.granting = True
                self._spawn(self._grant(task, worker))

    async def _grant(self, task: LiveTask, worker: LiveWorker) -> None:
        lease_id = ids.new_id()
        command = GrantLease(
            task_id=task.state.task_id,
            lease_id=lease_id,
            worker_id=worker.state.worker_id,
            ttl=self.config.lease_ttl,
        )
        try:
            result = await self._execute(task.tenant, command, (task.state, task.seq))
        finally:
            task.granting = False
        key = (task.tenant, task.state.task_id)
        if result is None or "fencing_token" not in result:
            # Refused (cancelled meanwhile, or leased elsewhere): give the capacity back;
            # the event that changed the task is on its way through the feed.
            if self.tasks.get(key) is task and task.state.lease is None:
                self._release(task)
                if task.state.status == TaskStatus.PENDING:
                    self._enqueue(task)
            return
        if task.seq < result["seq"]:  # apply our own decision now; the feed copy is then skipped
            lease = Lease(
                lease_id, worker.state.worker_id, result["fencing_token"], result["fencing_token"],
                datetime.fromisoformat(result["expires_at"]), self.config.lease_ttl,
            )  # fmt: skip
            task.state = replace(
                task.state, status=TaskStatus.LEASED, lease=lease, attempt=lease.attempt
            )
            task.seq = result["seq"]
            self._track(task)
        offer = {
            "type": "offer",
            "task_id": task.state.task_id,
            "lease_id": lease_id,
            "fencing_token": result["fencing_token"],
            "attempt": result["fencing_token"],
            "ttl": self.config.lease_ttl,
            **task.spec,
        }
        await self.nc.publish(
            self.subjects.work(task.tenant, worker.state.worker_id), orjson.dumps(offer)
        )

    def _stop_on_worker(self, task: LiveTask, lease: Lease, reason: str) -> None:
        message = {
            "type": "stop",
            "task_id": task.state.task_id,
            "lease_id": lease.lease_id,
            "reason": reason,
        }
        self._spawn(
            self.nc.publish(self.subjects.work(task.tenant, lease.worker_id), orjson.dumps(message))
        )
