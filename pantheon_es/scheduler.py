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

Which task runs next and where is :mod:`pantheon_es.placement` (pure):
priority with aging, fair share, limits, best-fit placement with a
reservation for the front job. This module turns its outcome into decisions
(``GrantLease``, ``BlockTask``) and keeps the timers: lease expiry,
inactivity, worker liveness, retry ``not_before``, schedule-to-start and
start-to-close deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import graphlib
import heapq
import itertools
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import nats.errors
import orjson
import structlog
from nats.aio.client import Client as NATS

from pantheon_es import ids
from pantheon_es.connection import Connection
from pantheon_es.errors import (
    ConcurrencyError,
    ConflictError,
    OverloadedError,
    PantheonError,
    UnavailableError,
    UnschedulableError,
)
from pantheon_es.events import REGISTRY, Event, EventRecord
from pantheon_es.placement import Amount, Job, Placement, Policy
from pantheon_es.service import CommandService
from pantheon_es.specs import OPTION_FIELDS, Resources, SchedulingOptions
from pantheon_es.store import StoredEvent
from pantheon_es.subjects import Subjects
from pantheon_es.tasks import (
    LIVE,
    TASK,
    BlockTask,
    CancelTask,
    ExpireLease,
    GrantLease,
    Lease,
    RedriveWorkflowTask,
    SkipTask,
    SpawnAgent,
    SubmitTask,
    SubmitWorkflowTask,
    TaskCompleted,
    TaskState,
    TaskStatus,
    TaskSubmitted,
    TimeOutTask,
)
from pantheon_es.workers import WORKER, Capacity, LoseWorker, WorkerState, WorkerStatus
from pantheon_es.workflows import (
    FAIL_FAST_REASON,
    WORKFLOW,
    CreateWorkflow,
    FinishWorkflow,
    NodeSpec,
    StartWorkflow,
    WorkflowRedriven,
    WorkflowState,
)
from projections.tasks import LIVE_ROWS_FROM as TASKS_LIVE_ROWS
from projections.workflows import LIVE_CONDITION as WORKFLOWS_LIVE

log = structlog.get_logger(__name__)
#: Pauses between tries when a redrive's read-back or append fails (about 19 s in all);
#: tests shorten them.
_RETRY_DELAYS = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 5.0, 5.0)

Key = tuple[str, str]  # (tenant, id)


def _last_result(history: list[StoredEvent]) -> Any:
    """The result of a task's last ``TaskCompleted`` in its history (None if none)."""
    for h in reversed(history):
        if isinstance(h.event.data, TaskCompleted):
            return h.event.data.result
    return None


@dataclass(frozen=True)
class SchedulerConfig:
    lease_ttl: float = 30.0
    #: Default inactivity timeout of a running task (seconds; 0 = none); a task may override.
    inactivity_timeout: float = 1800.0
    #: Lease decisions in flight at once.
    max_inflight: int = 256
    policy: Policy = field(default_factory=Policy)


@dataclass(slots=True)
class LiveTask:
    tenant: str
    state: TaskState
    seq: int  # last stream sequence of the task's own subject
    spec: dict[str, Any]  # name, executor, labels: what an offer carries
    last_activity: datetime  # messages included
    granting: bool = False
    #: workflow tasks: dependencies (task ids) that have not completed yet (None: none)
    waiting: set[str] | None = None

    @property
    def key(self) -> Key:
        return (self.tenant, self.state.task_id)


@dataclass(slots=True)
class LiveWorkflow:
    """A workflow that has not finished: its graph and the outcomes of its nodes so far."""

    tenant: str
    state: WorkflowState
    seq: int
    node_of: dict[str, str]  # task id -> node name
    deps: dict[str, tuple[str, ...]]  # task id -> the task ids it depends on
    dependents: dict[str, list[str]]
    outcome: dict[str, str] = field(default_factory=dict)  # task id -> terminal status
    results: dict[str, Any] = field(default_factory=dict)  # task id -> result (completed)
    failing: bool = False  # fail_fast was triggered
    finishing: bool = False
    #: nodes of its redrive not yet seen back in the log (their TaskRedriven), and its reason
    redriving: set[str] = field(default_factory=set)
    redrive_reason: str = ""

    @classmethod
    def of(cls, tenant: str, state: WorkflowState, seq: int) -> LiveWorkflow:
        deps = {n.task_id: tuple(n.depends_on) for n in state.nodes}
        dependents: dict[str, list[str]] = {}
        for task_id, ds in deps.items():
            for d in ds:
                dependents.setdefault(d, []).append(task_id)
        return cls(tenant, state, seq, {n.task_id: n.name for n in state.nodes}, deps, dependents)

    @property
    def stopping(self) -> bool:
        return self.failing or self.state.cancel_requested

    def downstream(self, task_id: str) -> set[str]:
        """Every task that depends on ``task_id``, directly or not."""
        seen: set[str] = set()
        todo = list(self.dependents.get(task_id, ()))
        while todo:
            t = todo.pop()
            if t not in seen:
                seen.add(t)
                todo.extend(self.dependents.get(t, ()))
        return seen


@dataclass(slots=True)
class LiveWorker:
    tenant: str
    state: WorkerState
    seq: int

    @property
    def accepting(self) -> bool:
        return self.state.status == WorkerStatus.ACTIVE


_FINISHING = frozenset(
    {"TaskCompleted", "TaskFailed", "TaskCancelled", "TaskTimedOut", "TaskSkipped"}
)
_FINISHED_STATUS = {
    "TaskCompleted": "completed",
    "TaskFailed": "failed",
    "TaskCancelled": "cancelled",
    "TaskTimedOut": "timed_out",
    "TaskSkipped": "skipped",
}


class _Interned:
    """One shared instance per distinct value (resources, options, offer specs): a deep
    queue of similar tasks holds one copy, not one per task. Values are never mutated."""

    def __init__(self, limit: int = 8192) -> None:
        self.limit = limit
        self._values: dict[Any, Any] = {}

    def get(self, key: Any, make: Any) -> Any:
        value = self._values.get(key)
        if value is None:
            if len(self._values) >= self.limit:
                self._values.clear()
            value = self._values[key] = make()
        return value


_SHARED = _Interned()
#: Offers one work message may carry.
OFFERS_PER_MESSAGE = 256
#: A workflow's tasks are created in batches of this many, then twice as many each time.
MATERIALIZE_FIRST = 50


def _json_key(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def _resources(raw: Any) -> Resources:
    """Resources from a dict or JSON text, shared between equal requests."""
    if isinstance(raw, str):
        return _SHARED.get(("r", raw), lambda: Resources.model_validate_json(raw))  # type: ignore[no-any-return]
    return _SHARED.get(("r", _json_key(raw)), lambda: Resources.model_validate(raw))  # type: ignore[no-any-return]


def _spec(name: str, executor: Any, labels: Any) -> dict[str, Any]:
    """What an offer carries besides the lease, shared between equal tasks (never mutated)."""
    key: tuple[Any, ...]
    if isinstance(executor, str):
        key = ("s", name, executor, labels)
        return _SHARED.get(  # type: ignore[no-any-return]
            key,
            lambda: {"name": name, "executor": orjson.loads(executor),
                     "labels": orjson.loads(labels)},
        )  # fmt: skip
    key = ("s", name, _json_key(executor), _json_key(labels))
    return _SHARED.get(key, lambda: {"name": name, "executor": executor, "labels": labels})  # type: ignore[no-any-return]


def _spec_of(submitted: TaskSubmitted) -> dict[str, Any]:
    """What an offer carries besides the lease, from a typed ``TaskSubmitted``."""
    return {
        "name": submitted.name,
        "executor": submitted.executor.model_dump(mode="json"),
        "labels": dict(submitted.labels),
    }


def _submitted_state(record: EventRecord) -> TaskState:
    """A new task's state straight from its TaskSubmitted record (what evolve would build)."""
    d = record.data
    at = datetime.fromisoformat(record.occurred_at)
    return TaskState(
        task_id=record.aggregate_id,
        status=TaskStatus.PENDING,
        name=d["name"],
        priority=d["priority"],
        resources=_resources(d["resources"]),
        executor_kind=d["executor"]["kind"],
        submitted_at=at,
        last_activity_at=at,
        inactivity_timeout=d.get("inactivity_timeout"),
        max_attempts=d.get("max_attempts", 3),
        options=_options(d),
        pending_since=at,
        workflow_id=d.get("workflow_id"),
        node=d.get("node"),
        depends_on=tuple(d.get("depends_on") or ()),
    )


_DEFAULT_OPTIONS = SchedulingOptions()


def _options(data: dict[str, Any]) -> SchedulingOptions:
    found = {k: data[k] for k in OPTION_FIELDS if data.get(k) is not None}
    if not found:
        return _DEFAULT_OPTIONS
    return _SHARED.get(("o", _json_key(found)), lambda: SchedulingOptions.model_validate(found))  # type: ignore[no-any-return]


def _ts(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _worker_key(task_tenant: str, lease: Lease) -> Key:
    """The (tenant, id) of the worker holding ``lease`` (a shared worker's own tenant)."""
    return (lease.worker_tenant or task_tenant, lease.worker_id)


def to_job(task: LiveTask) -> Job:
    """What the placement policy needs to know of a pending task."""
    state = task.state
    options = state.options
    since = state.pending_since or state.submitted_at
    return Job(
        task.key,
        state.priority,
        since.timestamp(),
        Amount.of(state.resources),
        agent=state.executor_kind == "agent",
        fairness_key=options.fairness_key or "",
        concurrency_key=options.concurrency_key,
        concurrency_limit=options.concurrency_limit,
    )


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
        self.placement = Placement(self.config.policy)
        self.tasks: dict[Key, LiveTask] = {}
        self.workers: dict[Key, LiveWorker] = {}
        self.workflows: dict[Key, LiveWorkflow] = {}
        self._resumed = False  # workflows picked up where the last run left them
        #: Set by the node: only the leader decides (None: always active, e.g. in tests)
        self.leadership: Any = None
        self.position = 0
        self._ready_at = 0  # act only once the log is read up to here
        self._heap: list[tuple[datetime, int, str, Key, str]] = []
        self._tick = itertools.count()
        self._queue: list[EventRecord] = []
        self._wake = asyncio.Event()
        self._place_needed = True
        self._inflight: set[asyncio.Task[Any]] = set()
        #: Offers decided in this loop turn, by work subject (sent together: _offer).
        self._outbox: dict[str, list[dict[str, Any]]] = {}
        self._slots = asyncio.Semaphore(self.config.max_inflight)
        self._stopping = False
        self._stopped = asyncio.Event()  # set by shutdown: cuts a retry's pause short
        #: tenant -> ids of its pending tasks (placeable, parked or waiting for a retry)
        self._pending: dict[str, set[str]] = {}
        #: tenant -> monotonic times of recent lease grants (for retry_after estimates)
        self._grants: dict[str, deque[float]] = {}
        #: leases decided for tasks being submitted (place_new), until placed_new
        #: (task, worker, grant, submission's event id)
        self._placed_new: dict[Key, tuple[LiveTask, LiveWorker, GrantLease, str]] = {}
        #: tasks being read back from the log (redriven) -> the last sequence the feed
        #: showed of them meanwhile (the read must cover it)
        self._adopting: dict[Key, int] = {}
        #: redriven workflows being read back from the log: set when they are live again;
        #: and the last sequence the feed showed of each meanwhile
        self._loading: dict[Key, asyncio.Event] = {}
        self._loading_seen: dict[Key, int] = {}
        #: redriven workflows and tasks whose read-back failed (a standby tries once):
        #: the last sequence the feed showed of each since; read again on gaining the lead
        self._unread_workflows: dict[Key, int] = {}
        self._unread_tasks: dict[Key, int] = {}

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
        rows = db.execute(
            "SELECT tenant, id, status, name, priority, resources, executor_kind, executor, "
            "labels, submitted_at, last_activity_at, inactivity_timeout, max_attempts, attempt, "
            "lease_id, worker_id, fencing_token, lease_expires_at, lease_ttl, started_at, version, "
            "worker_tenant, "
            "task_seq, options, pending_since, blocked_reason, not_before, attempts_base, "
            "workflow_id, node, depends_on "
            f"FROM {TASKS_LIVE_ROWS} ORDER BY id"
        ).fetchall()
        self._bootstrap_workflows(db)
        workers = db.execute(
            "SELECT tenant, id, incarnation, status, capacity, slots, labels, ttl, expires_at, "
            "registered_at, last_seq, tenants, offer_batches FROM workers "
            "WHERE status IN ('active', 'draining')"
        ).fetchall()
        for r in workers:
            (tenant, worker_id, incarnation, status, capacity, slots, labels, ttl, expires,
             registered, seq, serves, batches) = r  # fmt: skip
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
                tenants=tuple(orjson.loads(serves)),
                offer_batches=orjson.loads(batches) is True,
            )
            self._add_worker(tenant, wstate, seq)
        for r in rows:
            (tenant, task_id, status, name, priority, resources, kind, executor, labels, submitted,
             last_activity, timeout, max_attempts, attempt, lease_id, worker_id, token, expires,
             ttl, started, version, worker_tenant, task_seq, options, pending_since, blocked,
             not_before,
             attempts_base, workflow_id, node, depends_on) = r  # fmt: skip
            lease = None
            if lease_id:
                lease = Lease(lease_id, worker_id, attempt, token,
                              datetime.fromisoformat(expires), ttl, worker_tenant)  # fmt: skip
            state = TaskState(
                task_id=task_id,
                status=TaskStatus(status),
                name=name,
                priority=priority,
                resources=_resources(resources),
                executor_kind=kind,
                submitted_at=datetime.fromisoformat(submitted),
                last_activity_at=datetime.fromisoformat(last_activity),
                inactivity_timeout=timeout,
                max_attempts=max_attempts,
                attempt=attempt,
                lease=lease,
                started_at=_ts(started),
                version=version,
                options=_options(orjson.loads(options)),
                pending_since=_ts(pending_since),
                blocked=blocked,
                not_before=_ts(not_before),
                attempts_base=attempts_base,
                workflow_id=workflow_id,
                node=node,
                depends_on=tuple(orjson.loads(depends_on)),
            )
            self._add_task(tenant, state, task_seq, _spec(name, executor, labels))
        log.info(
            "scheduler bootstrapped",
            tasks=len(self.tasks),
            workers=len(self.workers),
            position=position,
            head=head,
        )

    def _bootstrap_workflows(self, db: Any) -> None:
        rows = db.execute(
            "SELECT tenant, id, name, status, failure_policy, nodes, created_at, "
            "cancel_requested_at, last_seq, redrives, last_redrive "
            f"FROM workflows INDEXED BY workflows_live WHERE {WORKFLOWS_LIVE}"
        ).fetchall()
        for (tenant, wf_id, name, status, policy, nodes, created, cancel_at, seq, redrives,
             last_redrive) in rows:  # fmt: skip
            specs = tuple(
                NodeSpec(name=n["name"], task_id=n["task_id"], depends_on=n["depends_on"], spec={})
                for n in orjson.loads(nodes)
            )
            state = WorkflowState(
                workflow_id=wf_id,
                name=name,
                status="running" if status == "cancelling" else status,
                failure_policy=policy,
                nodes=specs,
                created_at=datetime.fromisoformat(created),
                cancel_requested=cancel_at is not None,
                redrives=redrives,
            )
            wf = LiveWorkflow.of(tenant, state, seq)
            # A redrive's nodes whose last event precedes it are not back yet: how they
            # ended is the last run's, not an outcome of this one.
            redrive = orjson.loads(last_redrive) if last_redrive else {}
            again = set(redrive.get("tasks") or ())
            since = redrive.get("seq", 0)
            back: set[str] = set()
            finished = set(_FINISHED_STATUS.values())
            for task_id, task_status, result, task_seq in db.execute(
                "SELECT id, status, result, task_seq FROM tasks INDEXED BY tasks_workflow "
                "WHERE tenant = ? AND workflow_id = ?",
                (tenant, wf_id),
            ).fetchall():
                if task_id in again:
                    if task_seq < since:
                        continue
                    back.add(task_id)
                if task_status not in finished:
                    continue
                wf.outcome[task_id] = task_status
                if task_status == "completed":
                    wf.results[task_id] = orjson.loads(result) if result else None
            wf.redriving = again - back
            wf.redrive_reason = redrive.get("reason") or ""
            wf.failing = wf.state.failure_policy == "fail_fast" and any(
                v != "completed" for v in wf.outcome.values()
            )
            self.workflows[(tenant, wf_id)] = wf

    # -- input -------------------------------------------------------------------------------------
    def feed(self, records: list[EventRecord]) -> None:
        """A decoded batch of the log, in order (a projector sink)."""
        self._queue.extend(records)
        self._wake.set()

    @property
    def ready(self) -> bool:
        return self.position >= self._ready_at

    @property
    def active(self) -> bool:
        """Leader (or alone): fires timers, places, decides. A standby only follows the log."""
        return self.leadership is None or self.leadership.is_leader

    @property
    def epoch(self) -> int | None:
        return None if self.leadership is None else self.leadership.epoch

    def on_leadership(self, leading: bool) -> None:
        """Leadership changed: a new leader picks up everything a standby only watched."""
        if leading:
            self._resumed = False
            self._place_needed = True
        self._wake.set()

    def admit(self, tenant: str, command: Any) -> None:
        """Backpressure: refuse a new task past its tenant's pending bound (``overloaded``).

        The bound can be passed by the submits in flight at that moment (at most the
        command service's concurrency), never by more.
        """
        if isinstance(command, SubmitWorkflowTask):
            return  # admitted with its workflow
        if isinstance(command, CreateWorkflow):
            adding = len(command.tasks)
            requests = [(n.name, n.resources) for n in command.tasks]
        elif isinstance(command, (SubmitTask, SpawnAgent)):
            adding = 1
            requests = [(command.name, command.resources)]
        else:
            return
        if self.config.policy.unschedulable == "reject":
            for name, resources in requests:
                why = self.placement.impossible(tenant, Amount.of(resources))
                if why is not None:
                    raise UnschedulableError(
                        f"no registered worker could ever run {name!r}: it asks for more than "
                        "the largest worker has",
                        details=why,
                    )
        bound = self.config.policy.quota(tenant).max_pending
        if bound is None:
            return
        pending = len(self._pending.get(tenant, ()))
        if pending + adding <= bound:
            return
        raise OverloadedError(
            f"tenant {tenant} has {pending} pending tasks (bound {bound}); retry later",
            details={"tenant": tenant, "pending": pending, "max_pending": bound},
            retry_after=self._retry_after(tenant, pending + adding - bound),
        )

    def _retry_after(self, tenant: str, excess: int) -> float:
        """Seconds until ``excess`` tasks have left pending at the recent placement rate."""
        grants = self._grants.get(tenant)
        now = time.monotonic()
        if grants:
            while grants and grants[0] < now - 30:
                grants.popleft()
        if not grants or len(grants) < 2:
            return 1.0
        rate = len(grants) / max(now - grants[0], 1e-3)
        return round(min(max(excess / rate, 0.05), 60.0), 3)

    def why(self, tenant: str, task_id: str) -> dict[str, Any]:
        """The scheduler's live view of one task: placement state, reason, timers."""
        task = self.tasks.get((tenant, task_id))
        if task is None:
            return {"live": False}
        out: dict[str, Any] = {"live": True, "status": task.state.status.value}
        out.update(self.placement.why(task.key, time.time()))
        if task.state.not_before is not None and task.state.status == TaskStatus.PENDING:
            out["not_before"] = task.state.not_before.isoformat()
        if not any(s.accepting and s.serves(tenant) for s in self.placement.workers.values()):
            out["workers"] = 0
        return out

    # -- the loop ----------------------------------------------------------------------------------
    async def run(self) -> None:
        """React to events and deadlines until :meth:`shutdown`."""
        while not self._stopping:
            timeout = None
            if self._heap and self.ready and self.active:
                timeout = max(0.0, (self._heap[0][0] - datetime.now(UTC)).total_seconds())
            if not self._queue and not (self._place_needed and self.ready and self.active):
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
            if self._stopping:
                break
            records, self._queue = self._queue, []
            for record in records:
                self._apply(record)
            if self.ready and self.active:
                if not self._resumed:
                    self._resumed = True
                    self._resume_workflows()
                self._fire_due()
                if self._place_needed:
                    self._place_needed = False
                    self._place()

    async def shutdown(self) -> None:
        self._stopping = True
        self._stopped.set()
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
        elif aggregate == "workflow":
            self._apply_workflow(record)
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
                spec = _spec(d["name"], d["executor"], d["labels"])
                self._add_task(record.tenant, _submitted_state(record), record.seq, spec)
            elif task.seq == 0:  # placed at its submission (place_new) ...
                placed = self._placed_new.get(key)
                if placed is not None and placed[3] != record.event_id:
                    # ... but another service stored this id's submission first: ours
                    # fails, its lease with it; the task is the stored one.
                    del self._placed_new[key]
                    task.granting = False
                    self._forget(task)
                    self._apply_task(record)
                else:
                    task.seq = record.seq  # ... and now known stored
            return
        if task is None:
            if key in self._adopting:  # being read back: the read must cover this event
                self._adopting[key] = record.seq
            elif record.type == "TaskRedriven":  # from the dead-letter queue, or its workflow's
                self._unread_tasks.pop(key, None)
                self._adopting[key] = record.seq
                self._spawn(self._adopt(record.tenant, record.aggregate_id))
            elif key in self._unread_tasks:  # its read-back failed: the next must cover this
                self._unread_tasks[key] = record.seq
            return  # finished (not live)
        if record.seq <= task.seq:
            return  # a decision of ours already applied
        if record.type in _FINISHING:
            # No need to fold it: the task leaves the live set. Stop it on its worker if
            # it was cancelled or timed out while it ran.
            lease = task.state.lease
            if lease is not None and record.type in ("TaskCancelled", "TaskTimedOut"):
                reason = "cancelled" if record.type == "TaskCancelled" else "timed_out"
                self._stop_on_worker(task, lease, reason)
            self._forget(task)
            if task.state.workflow_id is not None:
                self._node_finished(task, record)
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
        if record.type == "RetryScheduled" and old.lease is not None:
            # The attempt's lease ended: if the worker still runs it (a start-to-close
            # timeout), it stops; one that reported the failure has nothing left to stop.
            self._stop_on_worker(task, old.lease, "retry scheduled")
        if new.status == TaskStatus.PENDING:
            if old.status != TaskStatus.PENDING:
                self._make_pending(task)
            elif record.type == "TaskBlocked":
                job = self.placement.jobs.get(key)
                if job is not None:
                    job.reason = new.blocked
        elif new.lease is not None and key not in self.placement.running:
            # leased by a decision we did not make (another scheduler): hold its worker
            self._set_pending(task, False)
            self.placement.assign(to_job(task), _worker_key(task.tenant, new.lease))
        self._track(task)

    def _apply_worker(self, record: EventRecord) -> None:
        key = (record.tenant, record.aggregate_id)
        worker = self.workers.get(key)
        if record.type == "WorkerRegistered":
            state = WORKER.evolve(None, self._typed(record))
            if worker is not None and worker.state.incarnation != state.incarnation:
                self._orphan_leases(key, "worker lost")  # the old process is gone
            self._add_worker(record.tenant, state, record.seq)
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
            self.placement.remove_worker(key)
            del self.workers[key]
        else:
            self.placement.set_accepting(key, worker.accepting)
            self._push(worker.state.expires_at, "worker", key, worker.state.incarnation)

    def _add_task(self, tenant: str, state: TaskState, seq: int, spec: dict[str, Any]) -> None:
        task = LiveTask(tenant, state, seq, spec, state.last_activity_at)
        self.tasks[task.key] = task
        wf = self.workflows.get((tenant, state.workflow_id)) if state.workflow_id else None
        if wf is not None and state.status == TaskStatus.PENDING:
            broken = [d for d in state.depends_on if wf.outcome.get(d, "completed") != "completed"]
            task.waiting = {d for d in state.depends_on if wf.outcome.get(d) != "completed"} or None
            if broken:
                self._skip(task, wf, broken[0])
            elif wf.stopping:
                self._decide(task, CancelTask(task_id=state.task_id, reason=self._why_stop(wf)))
        if state.status == TaskStatus.PENDING:
            self._make_pending(task)
            job = self.placement.jobs.get(task.key)
            if job is not None:
                job.reason = state.blocked  # already recorded: not told again
        elif state.lease is not None:
            self.placement.assign(to_job(task), _worker_key(tenant, state.lease))
        self._track(task)

    async def _adopt(self, tenant: str, task_id: str) -> None:
        """Load a task that came back to life (redriven) into the live set.

        Its events that the feed brings meanwhile find no live task; they only move
        ``_adopting[key]`` on, and the history read here covers them, so a task that
        ended meanwhile is not taken back in (a workflow's node then gets its outcome).
        """
        key = (tenant, task_id)
        try:
            while True:
                history = await self._read_fresh(tenant, "task", task_id, self._adopting)
                if history is None:  # logged; read again when this node (next) gains the lead
                    self._unread_tasks[key] = self._adopting.get(key, 0)
                    return
                if key in self.tasks:
                    return
                state = TASK.fold([h.event for h in history])
                if state is None:
                    return
                if (tenant, state.workflow_id or "") in self._unread_workflows:
                    # Its workflow is not held (not read back): read it after the workflow,
                    # as its node, when this node (next) gains the lead.
                    self._unread_tasks[key] = history[-1].seq
                    return
                loading = self._loading.get((tenant, state.workflow_id or ""))
                if loading is None:
                    break
                await loading.wait()  # its workflow is being read back: then read again
            wf = self.workflows.get((tenant, state.workflow_id or ""))
            if wf is not None:
                wf.redriving.discard(task_id)
            if state.status in LIVE:
                self._add_task(tenant, state, history[-1].seq, _spec_of(history[0].event.data))
                self._wake.set()
            elif wf is not None and task_id in wf.node_of and task_id not in wf.outcome:
                # ended before it was read back: the feed's copy of its end found no task
                self._node_outcome(wf, task_id, state.status.value, _last_result(history))
        finally:
            self._adopting.pop(key, None)

    async def _read_fresh(
        self, tenant: str, aggregate: str, aggregate_id: str, seen: dict[Key, int]
    ) -> list[StoredEvent] | None:
        """An aggregate's history, read until it reaches what the feed showed of it
        (``seen``): a direct get answered by a replica may lag a little. Errors and a
        history that stays behind are retried with a growing pause (``_RETRY_DELAYS``);
        None (logged) if it never comes: the caller leaves it to the next start."""
        key = (tenant, aggregate_id)
        for delay in (*_RETRY_DELAYS, None):
            try:
                for _ in range(50):
                    history = await self.service.store.read_aggregate(
                        tenant, aggregate, aggregate_id
                    )
                    if history and history[-1].seq >= seen.get(key, 0):
                        return history
                    await asyncio.sleep(0.02)
                problem = f"its history stops before sequence {seen.get(key, 0)}"
            except PantheonError as err:
                problem = err.message
            except nats.errors.Error as err:  # the connection's own (closed, buffer full)
                problem = repr(err)
            if delay is None or not self.active or self._stopping:
                break
            log.warning("history not read back yet; retrying", aggregate=aggregate,
                        id=aggregate_id, problem=problem, retry_in_s=delay)  # fmt: skip
            await self._pause(delay)
            if self._stopping:
                break  # no new try while shutting down
        if self._stopping:
            pass
        elif self.active:
            log.error("history not read back: left to the next start", aggregate=aggregate,
                      id=aggregate_id, problem=problem)  # fmt: skip
        else:  # a standby (or a leader that lost the lead) tries once
            log.warning("history not read back: read again if this node leads",
                        aggregate=aggregate, id=aggregate_id, problem=problem)  # fmt: skip
        return None

    async def _pause(self, seconds: float) -> None:
        """Wait before a retry; a shutdown cuts it short (it does not wait for a retry)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), seconds)

    def _make_pending(self, task: LiveTask) -> None:
        """The task is pending: placeable now, or once its retry is due."""
        self._set_pending(task, True)
        self.placement.remove(task.key)  # frees what an ended lease held
        if task.waiting:
            return  # held until its dependencies complete
        if task.state.workflow_id is not None:
            wf = self.workflows.get((task.tenant, task.state.workflow_id))
            if wf is not None and wf.stopping:
                return  # its cancellation is on the way
        not_before = task.state.not_before
        if not_before is not None and not_before > datetime.now(UTC):
            self._push(not_before, "retry", task.key, not_before.isoformat())
            return
        self.placement.add(to_job(task))
        self._place_needed = True
        self._wake.set()

    def _set_pending(self, task: LiveTask, pending: bool) -> None:
        ids_ = self._pending.setdefault(task.tenant, set())
        if pending:
            ids_.add(task.state.task_id)
        else:
            ids_.discard(task.state.task_id)
            if not ids_:
                del self._pending[task.tenant]

    def _forget(self, task: LiveTask) -> None:
        self._set_pending(task, False)
        self.placement.remove(task.key)
        del self.tasks[task.key]
        self._place_needed = True
        self._wake.set()

    def _add_worker(self, tenant: str, state: WorkerState, seq: int) -> None:
        key = (tenant, state.worker_id)
        self.workers[key] = LiveWorker(tenant, state, seq)
        cap = state.capacity
        self.placement.add_worker(
            key,
            Resources(cpu=cap.cpu, memory_mb=cap.memory_mb, gpu=cap.gpu, custom=dict(cap.custom)),
            state.slots,
            tenants=[tenant, *state.tenants],
            accepting=state.status == WorkerStatus.ACTIVE,
        )
        self._push(state.expires_at, "worker", key, state.incarnation)
        self._place_needed = True

    def _touch(self, key: Key, at: datetime) -> None:
        task = self.tasks.get(key)
        if task is not None and at > task.last_activity:
            task.last_activity = at
            self._track(task)

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
        key = task.key
        state = task.state
        lease = state.lease
        options = state.options
        if lease is not None:
            self._push(lease.expires_at, "lease", key, lease.lease_id)
            timeout = self._inactivity(task)
            if timeout > 0:
                self._push(
                    task.last_activity + timedelta(seconds=timeout), "idle", key, lease.lease_id
                )
            if options.start_to_close_timeout and state.started_at is not None:
                when = state.started_at + timedelta(seconds=options.start_to_close_timeout)
                self._push(when, "s2c", key, lease.lease_id)
        elif state.status == TaskStatus.PENDING and options.schedule_to_start_timeout:
            since = state.pending_since or state.submitted_at
            when = since + timedelta(seconds=options.schedule_to_start_timeout)
            self._push(when, "s2s", key, since.isoformat())

    def _fire_due(self) -> None:
        now = datetime.now(UTC)
        while self._heap and self._heap[0][0] <= now:
            _when, _, kind, key, token = heapq.heappop(self._heap)
            if kind == "worker":
                worker = self.workers.get(key)
                if worker and worker.state.incarnation == token and worker.state.expires_at <= now:
                    self._decide_worker(worker, LoseWorker(worker_id=key[1], incarnation=token))
                continue
            task = self.tasks.get(key)
            if task is None:
                continue
            state = task.state
            lease = state.lease
            if kind == "lease":
                if lease and lease.lease_id == token and lease.expires_at <= now:
                    self._decide(task, ExpireLease(task_id=key[1], lease_id=token))
            elif kind == "idle":
                if lease and lease.lease_id == token:
                    timeout = self._inactivity(task)
                    if timeout > 0 and task.last_activity + timedelta(seconds=timeout) <= now:
                        self._decide(
                            task,
                            TimeOutTask(
                                task_id=key[1], timeout=timeout, last_activity_at=task.last_activity
                            ),
                        )
            elif kind == "retry":
                nb = state.not_before
                due = state.status == TaskStatus.PENDING and nb and nb.isoformat() == token
                if due and key not in self.placement.jobs:
                    self.placement.add(to_job(task))
                    self._place_needed = True
            elif kind == "s2s":
                since = state.pending_since or state.submitted_at
                s2s = state.options.schedule_to_start_timeout
                if state.status == TaskStatus.PENDING and since.isoformat() == token and s2s:
                    self._decide(
                        task, TimeOutTask(task_id=key[1], timeout=s2s, kind="schedule_to_start")
                    )
            elif kind == "s2c":
                s2c = state.options.start_to_close_timeout
                if lease and lease.lease_id == token and s2c:
                    self._decide(
                        task,
                        TimeOutTask(
                            task_id=key[1], timeout=s2c, kind="start_to_close", lease_id=token
                        ),
                    )

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
        self, tenant: str, command: Any, known: tuple[Any, int] | None
    ) -> dict[str, Any] | None:
        if not self.active:
            return None  # a standby decides nothing; the leader derives it again
        epoch = self.epoch
        actor = f"scheduler#{epoch}" if epoch is not None else "scheduler"
        if command.actor != actor:  # a grant is made with it (a copy costs 4 us)
            command = command.model_copy(update={"actor": actor})
        async with self._slots:
            try:
                return await self.service.execute(tenant, command, known=known, epoch=epoch)
            except PantheonError as err:
                log.info(
                    "scheduler decision refused", command=type(command).__name__, error=err.message
                )
                return None
            except Exception:  # a bug must not vanish as "exception never retrieved"
                log.exception("scheduler decision crashed", command=type(command).__name__)
                return None

    def _orphan_leases(self, worker_key: Key, reason: str) -> None:
        for task in list(self.tasks.values()):
            lease = task.state.lease
            if lease is not None and _worker_key(task.tenant, lease) == worker_key:
                self._decide(
                    task,
                    ExpireLease(task_id=task.state.task_id, lease_id=lease.lease_id, reason=reason),
                )

    def _place(self) -> None:
        outcome = self.placement.place(time.time())
        for block in outcome.blocks:
            task = self.tasks.get(block.key)
            if task is not None and task.state.status == TaskStatus.PENDING:
                command = BlockTask(
                    task_id=block.key[1], reason=block.reason.value, details=block.details
                )
                self._decide(task, command)
        for grant in outcome.grants:
            task = self.tasks.get(grant.key)
            worker = self.workers.get(grant.worker)
            if task is None or worker is None or task.granting:
                self.placement.release(grant.key)
                continue
            task.granting = True
            self._set_pending(task, False)
            self._spawn(self._grant(task, worker))
            self._note_grant(task.tenant)

    def _note_grant(self, tenant: str) -> None:
        """Remember when a lease was decided (``_retry_after``'s placement rate)."""
        self._grants.setdefault(tenant, deque(maxlen=4096)).append(time.monotonic())

    async def _grant(self, task: LiveTask, worker: LiveWorker) -> None:
        command = self._grant_command(task, worker)
        try:
            result = await self._execute(task.tenant, command, (task.state, task.seq))
        finally:
            task.granting = False
        self._granted(task, worker, command, result)

    def _grant_command(self, task: LiveTask, worker: LiveWorker) -> GrantLease:
        epoch = self.epoch
        return GrantLease(
            actor=f"scheduler#{epoch}" if epoch is not None else "scheduler",
            task_id=task.state.task_id,
            lease_id=ids.new_id(),
            worker_id=worker.state.worker_id,
            ttl=task.state.options.heartbeat_timeout or self.config.lease_ttl,
            epoch=epoch,
            worker_tenant=worker.tenant if worker.tenant != task.tenant else None,
        )

    def _granted(
        self,
        task: LiveTask,
        worker: LiveWorker,
        command: GrantLease,
        result: dict[str, Any] | None,
        at_once: bool = False,
    ) -> None:
        """After a grant's append: offer the task to its worker (``at_once``: now, not
        with the other offers of this loop turn), or (refused) give the capacity
        back."""
        key = task.key
        if result is None or "fencing_token" not in result:
            # Refused (cancelled meanwhile, or leased elsewhere): give the capacity back;
            # the event that changed the task is on its way through the feed.
            if self.tasks.get(key) is task and task.state.lease is None:
                self.placement.release(key)
                if task.state.status == TaskStatus.PENDING:
                    self._make_pending(task)
            return
        lease_id, ttl = command.lease_id, command.ttl
        if task.seq < result["seq"]:  # apply our own decision now; the feed copy is then skipped
            lease = Lease(
                lease_id, worker.state.worker_id, result["fencing_token"], result["fencing_token"],
                datetime.fromisoformat(result["expires_at"]), ttl, command.worker_tenant,
            )  # fmt: skip
            task.state = replace(
                task.state,
                status=TaskStatus.LEASED,
                lease=lease,
                attempt=lease.attempt,
                blocked=None,
                not_before=None,
            )
            task.seq = result["seq"]
            self._track(task)
        offer = {
            "type": "offer",
            "tenant": task.tenant,
            "task_id": task.state.task_id,
            "lease_id": lease_id,
            "fencing_token": result["fencing_token"],
            "attempt": result["fencing_token"],
            "ttl": ttl,
            **task.spec,
        }
        if task.state.depends_on:
            wf = self.workflows.get((task.tenant, task.state.workflow_id or ""))
            if wf is not None:
                offer["inputs"] = {
                    wf.node_of.get(d, d): wf.results.get(d) for d in task.state.depends_on
                }
        subject = self.subjects.work(task.tenant, worker.state.worker_id)
        if at_once or not worker.state.offer_batches:
            self._send([(subject, orjson.dumps(offer))])
            return
        self._offer(subject, offer)

    # -- a new task's lease in its submission's wake ------------------------------------------
    def place_new(self, tenant: str, state: TaskState, submitted: Event[Any]) -> GrantLease | None:
        """Called by the command service (same process) for a task it is about to submit:
        a lease decided now, to be appended right behind the submission
        (``EventStore.append_after``), or None (the task then takes the ordinary path:
        the feed brings its submission, :meth:`_place` decides).

        Only when nothing else waits (no pending job anywhere, the feed applied), so
        the new task overtakes nobody, and only for a task placeable as it is (no
        workflow, no retry time). The capacity is held from now on;
        :meth:`placed_new` is told how the appends went. docs/decisions.md, "A new
        task's lease in its submission's wake".
        """
        key = (tenant, state.task_id)
        if (
            not self.idle()
            or key in self.tasks
            or state.status != TaskStatus.PENDING
            or state.workflow_id is not None
            or state.not_before is not None
        ):
            return None
        spec = _spec_of(submitted.data)
        task = LiveTask(tenant, state, 0, spec, state.last_activity_at)
        self.placement.add(to_job(task))
        grant = next(iter(self.placement.place(time.time()).grants), None)
        worker = self.workers.get(grant.worker) if grant is not None else None
        if grant is None or grant.key != key or worker is None:
            self.placement.remove(key)  # whatever it told or held is derived again later
            return None
        self.tasks[key] = task
        task.granting = True
        self._note_grant(tenant)
        command = self._grant_command(task, worker)
        self._placed_new[key] = (task, worker, command, submitted.event_id)
        return command

    def idle(self) -> bool:
        """Nothing waits and the scheduler is live (the feed applied, the leader): the
        precondition of :meth:`place_new`, cheap enough to ask before a submission."""
        return not (self.placement.jobs or self._queue) and self.ready and self.active

    def placed_new(
        self, key: Key, submitted_seq: int | None, result: dict[str, Any] | None
    ) -> None:
        """How the appends of a :meth:`place_new` went: the submission's sequence (None:
        not stored) and the grant's result (None: refused or unknown; the feed tells
        the rest)."""
        entry = self._placed_new.pop(key, None)
        if entry is None:
            return
        task, worker, command, _event_id = entry
        task.granting = False
        if self.tasks.get(key) is not task:
            return  # gone meanwhile (the feed saw it finish)
        if submitted_seq is None and task.seq == 0:  # not stored, nor seen in the feed
            self._forget(task)
            return
        task.seq = max(task.seq, submitted_seq or 0)
        self._track(task)
        # Nothing else was pending when it was placed: no offers to wait for.
        self._granted(task, worker, command, result, at_once=True)

    def _offer(self, subject: str, offer: dict[str, Any]) -> None:
        """Send ``offer`` with the others for the same worker decided in this loop turn:
        one message (``{"type": "offers", "offers": [...]}``, a lone one as it is), to a
        worker that registered with ``offer_batches``."""
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._send_offers)
        self._outbox.setdefault(subject, []).append(offer)

    def _send_offers(self) -> None:
        outbox, self._outbox = self._outbox, {}
        messages = []
        for subject, offers in outbox.items():
            for i in range(0, len(offers), OFFERS_PER_MESSAGE):
                chunk = offers[i : i + OFFERS_PER_MESSAGE]
                body = chunk[0] if len(chunk) == 1 else {"type": "offers", "offers": chunk}
                messages.append((subject, orjson.dumps(body)))
        self._send(messages)

    def _send(self, messages: list[tuple[str, bytes]]) -> None:
        """Publish offers: at once on our own connection (no task, no flusher turn)."""
        if not isinstance(self.nc, Connection):
            self._spawn(self._publish(messages))
            return
        try:
            for subject, data in messages:
                self.nc.publish_now(subject, data)
        except nats.errors.Error as err:
            log.warning("offers not sent", error=repr(err))  # their leases expire

    async def _publish(self, messages: list[tuple[str, bytes]]) -> None:
        for subject, data in messages:
            await self.nc.publish(subject, data)

    # -- workflows ---------------------------------------------------------------------------------
    def _apply_workflow(self, record: EventRecord) -> None:
        key = (record.tenant, record.aggregate_id)
        wf = self.workflows.get(key)
        if record.type == "WorkflowCreated":
            if wf is None:
                created = self._typed(record)
                state = WORKFLOW.evolve(None, created)
                self.workflows[key] = LiveWorkflow.of(record.tenant, state, record.seq)
                if self._resumed and self.active:
                    self._spawn(self._materialize(record.tenant, record.aggregate_id, created))
            return
        if key in self._loading:  # being read back: the read must cover this event
            self._loading_seen[key] = record.seq
            return
        if record.type == "WorkflowRedriven":
            if wf is None or record.seq > wf.seq:
                # Finished, so not in the live set: its graph is read back from the log.
                self.workflows.pop(key, None)
                self._unread_workflows.pop(key, None)
                self._load_workflow(key, record.seq)
            return
        if key in self._unread_workflows:  # its read-back failed: the next must cover this
            if record.type == "WorkflowFinished":  # finished by the leader: nothing to read
                del self._unread_workflows[key]
            else:
                self._unread_workflows[key] = record.seq
            return
        if wf is None or record.seq <= wf.seq:
            return
        wf.state = WORKFLOW.evolve(wf.state, self._typed(record))
        wf.seq = record.seq
        if record.type == "WorkflowFinished":
            del self.workflows[key]
        elif record.type == "WorkflowCancelRequested":
            self._stop_workflow(wf, except_downstream_of=None)
            self._check_finished(wf)

    def _load_workflow(self, key: Key, seen: int) -> None:
        """Read a redriven workflow back from the log (up to ``seen`` at least)."""
        self._loading[key] = asyncio.Event()
        self._loading_seen[key] = seen
        self._spawn(self._reload_workflow(*key))

    def _resume_workflows(self) -> None:
        """After start-up or on gaining the lead: read back what failed to be read back
        (a standby tries once), finish creating tasks, and finish workflows whose nodes
        all ended."""
        unread_workflows, self._unread_workflows = self._unread_workflows, {}
        for key, seen in unread_workflows.items():
            if key not in self._loading and key not in self.workflows:
                self._load_workflow(key, seen)
        unread_tasks, self._unread_tasks = self._unread_tasks, {}
        for key, seen in unread_tasks.items():  # after the workflows: they wait for them
            if key not in self._adopting and key not in self.tasks:
                self._adopting[key] = seen
                self._spawn(self._adopt(*key))
        for (tenant, wf_id), wf in list(self.workflows.items()):
            if wf.state.status == "created":
                self._spawn(self._materialize(tenant, wf_id))
            wf.finishing = False
            for task_id in wf.node_of:  # decisions a crash or a standby may have left undone
                task = self.tasks.get((tenant, task_id))
                if task is None or task.state.status != TaskStatus.PENDING:
                    continue
                broken = [
                    d for d in wf.deps[task_id] if wf.outcome.get(d, "completed") != "completed"
                ]
                if broken:
                    self._skip(task, wf, broken[0])
                elif wf.stopping:
                    self._decide(task, CancelTask(task_id=task_id, reason=self._why_stop(wf)))
            self._redrive_nodes(wf)
            self._check_finished(wf)

    async def _materialize(
        self, tenant: str, workflow_id: str, created: Event[Any] | None = None
    ) -> None:
        """Create every node's task (an existing one is a harmless conflict), then start.

        ``created``: the WorkflowCreated event when the caller has it (live); after a
        restart it is read from the log.
        """
        if created is None:
            history = await self._read_fresh(tenant, "workflow", workflow_id, {})
            if history is None:  # logged; it stays created: the next start or leader goes on
                return
            created = history[0].event

        def command(node: NodeSpec) -> SubmitWorkflowTask:
            return SubmitWorkflowTask.model_validate(
                {
                    **node.spec,
                    "name": node.name,
                    "task_id": node.task_id,
                    "workflow_id": workflow_id,
                    "node": node.name,
                    "depends_on": node.depends_on,
                    "correlation_id": created.correlation_id,
                    "actor": created.actor,
                }
            )

        nodes = in_dependency_order(created.data.nodes)
        gate = asyncio.Semaphore(32)

        async def submit(node: NodeSpec) -> None:
            async with gate:
                with contextlib.suppress(ConflictError):  # created by an earlier run
                    await self.service.execute(tenant, command(node), known=(None, 0))

        try:
            try:
                # In atomic batches (docs/decisions.md, "A workflow's tasks in atomic
                # batches"), dependencies first, the first batches small: the first
                # layer is stored, placed and running while the rest are decided.
                for chunk in growing_chunks(nodes, MATERIALIZE_FIRST):
                    await self.service.create_all(tenant, [command(n) for n in chunk])
            except (ConcurrencyError, UnavailableError):
                # ...or, when some exist already (an earlier run), one by one.
                await asyncio.gather(*(submit(n) for n in nodes))
        except PantheonError as err:
            log.warning("workflow tasks not all created", workflow_id=workflow_id, error=str(err))
            return
        wf = self.workflows.get((tenant, workflow_id))
        if wf is not None:
            await self._execute(tenant, StartWorkflow(workflow_id=workflow_id), (wf.state, wf.seq))

    @staticmethod
    def _why_stop(wf: LiveWorkflow) -> str:
        if wf.state.cancel_requested:
            return "workflow cancelled"
        return FAIL_FAST_REASON

    def _skip(self, task: LiveTask, wf: LiveWorkflow, dependency: str) -> None:
        node = wf.node_of.get(dependency, dependency)
        status = wf.outcome.get(dependency, "failed")
        command = SkipTask(
            task_id=task.state.task_id,
            dependency=dependency,
            reason=f"dependency {node} ended {status}",
        )
        self._decide(task, command)

    def _stop_workflow(self, wf: LiveWorkflow, except_downstream_of: str | None) -> None:
        """Cancel every live node (the dependents of a failure are skipped instead)."""
        spare = wf.downstream(except_downstream_of) if except_downstream_of else set()
        reason = self._why_stop(wf)
        for task_id in wf.node_of:
            if task_id in wf.outcome or task_id in spare:
                continue
            task = self.tasks.get((wf.tenant, task_id))
            if task is not None:
                self._decide(task, CancelTask(task_id=task_id, reason=reason))

    def _node_finished(self, task: LiveTask, record: EventRecord) -> None:
        wf = self.workflows.get((task.tenant, task.state.workflow_id or ""))
        if wf is None:
            return
        status = _FINISHED_STATUS[record.type]
        self._node_outcome(wf, task.state.task_id, status, record.data.get("result"))

    def _node_outcome(self, wf: LiveWorkflow, task_id: str, status: str, result: Any) -> None:
        """A node ended: its dependents go on (or are skipped), the workflow may end."""
        wf.outcome[task_id] = status
        if status == "completed":
            wf.results[task_id] = result
        for dependent in wf.dependents.get(task_id, ()):
            other = self.tasks.get((wf.tenant, dependent))
            if other is None or other.state.status != TaskStatus.PENDING:
                continue  # not created yet: it looks at the outcomes when it is
            if status == "completed":
                if other.waiting:
                    other.waiting.discard(task_id)
                if not other.waiting and not wf.stopping:
                    self._make_pending(other)
            else:
                self._skip(other, wf, task_id)
        if status != "completed" and wf.state.failure_policy == "fail_fast" and not wf.stopping:
            wf.failing = True
            self._stop_workflow(wf, except_downstream_of=task_id)
        self._check_finished(wf)

    def _check_finished(self, wf: LiveWorkflow) -> None:
        if wf.finishing or len(wf.outcome) < len(wf.node_of):
            return
        wf.finishing = True
        counts: dict[str, int] = {}
        for status in wf.outcome.values():
            counts[status] = counts.get(status, 0) + 1
        not_completed = [t for t in wf.node_of if wf.outcome[t] != "completed"]
        command = FinishWorkflow(
            workflow_id=wf.state.workflow_id, counts=counts, not_completed=not_completed
        )
        self._spawn(self._execute(wf.tenant, command, (wf.state, wf.seq)))

    # -- a workflow's redrive --------------------------------------------------------------------
    async def _reload_workflow(self, tenant: str, workflow_id: str) -> None:
        """A redriven workflow comes back into the live set: its graph, and the results
        of the completed nodes that the nodes running again depend on, read from the log.

        Every node outside the redrive completed (``WorkflowFinished.not_completed``);
        the redrive's nodes have no outcome until they end again. Then (leader) they are
        brought back (:meth:`_redrive_nodes`).
        """
        key = (tenant, workflow_id)
        wf: LiveWorkflow | None = None
        try:
            while True:
                seen = self._loading_seen
                history = await self._read_fresh(tenant, "workflow", workflow_id, seen)
                if history is None:  # logged; read again when this node (next) gains the lead
                    self._unread_workflows[key] = self._loading_seen.get(key, 0)
                    return
                state = WORKFLOW.fold([h.event for h in history])
                redriven = next(
                    (h.event.data for h in reversed(history)
                     if isinstance(h.event.data, WorkflowRedriven)),
                    None,
                )  # fmt: skip
                if state is None or state.finished or redriven is None:
                    return
                wf = LiveWorkflow.of(tenant, state, history[-1].seq)
                again = set(redriven.tasks)
                for task_id in wf.node_of:
                    if task_id not in again:
                        wf.outcome[task_id] = "completed"
                needed = {d for t in again for d in wf.deps.get(t, ()) if d not in again}
                results = await self._results(tenant, needed)
                if results is None:  # logged; read again when this node (next) gains the lead
                    self._unread_workflows[key] = self._loading_seen.get(key, 0)
                    return
                wf.results = results
                wf.redriving = again
                wf.redrive_reason = redriven.reason
                if self._loading_seen.get(key, 0) <= wf.seq:
                    break  # else the workflow moved on while its results were read
            self.workflows[key] = wf
        except PantheonError as err:
            log.warning("redriven workflow not loaded", workflow_id=workflow_id, error=str(err))
            return
        finally:
            self._loading_seen.pop(key, None)
            loaded = self._loading.pop(key, None)
            if loaded is not None:
                loaded.set()
        if wf is not None and self.active and self._resumed:
            self._redrive_nodes(wf)

    async def _results(self, tenant: str, task_ids: set[str]) -> dict[str, Any] | None:
        """The results of completed tasks, from their ``TaskCompleted`` in the log; None
        if a history was not read back (retried as any read-back, then logged)."""
        gate = asyncio.Semaphore(16)
        out: dict[str, Any] = {}
        unread: list[str] = []

        async def one(task_id: str) -> None:
            async with gate:
                history = await self._read_fresh(tenant, "task", task_id, {})
            if history is None:
                unread.append(task_id)
            elif any(isinstance(h.event.data, TaskCompleted) for h in history):
                out[task_id] = _last_result(history)

        await asyncio.gather(*(one(t) for t in task_ids))
        return None if unread else out

    def _redrive_nodes(self, wf: LiveWorkflow) -> None:
        """Bring back the redrive's nodes not seen back yet, dependencies first (the
        scheduler appends their ``TaskRedriven``; one decided twice changes nothing)."""
        if not wf.redriving or not self.active:
            return
        nodes = [
            n
            for n in in_dependency_order(list(wf.state.nodes))
            if n.task_id in wf.redriving
            and (wf.tenant, n.task_id) not in self.tasks
            and (wf.tenant, n.task_id) not in self._adopting
        ]
        if nodes:
            self._spawn(self._bring_back(wf, nodes))

    async def _bring_back(self, wf: LiveWorkflow, nodes: list[NodeSpec]) -> None:
        gate = asyncio.Semaphore(32)
        key = (wf.tenant, wf.state.workflow_id)

        async def one(node: NodeSpec) -> None:
            command = RedriveWorkflowTask(
                task_id=node.task_id,
                workflow_id=wf.state.workflow_id,
                redrive=wf.state.redrives,
                reason=wf.redrive_reason or "workflow redriven",
                waiting_for=[d for d in node.depends_on if wf.outcome.get(d) != "completed"],
            )
            for delay in (*_RETRY_DELAYS, None):
                async with gate:
                    result = await self._execute(wf.tenant, command, None)
                if (
                    result is not None
                    or delay is None
                    or not self.active
                    or self._stopping
                    or self.workflows.get(key) is not wf
                    or node.task_id not in wf.redriving
                ):
                    break
                # refused or failed (the refusal is logged by _execute): try again
                log.warning("workflow node not brought back yet; retrying",
                            workflow_id=wf.state.workflow_id, task_id=node.task_id,
                            retry_in_s=delay)  # fmt: skip
                await self._pause(delay)
                if self._stopping:
                    break  # no new try while shutting down
            if (
                result is None
                and self.active
                and not self._stopping
                and self.workflows.get(key) is wf
                and node.task_id in wf.redriving
            ):
                log.error("workflow node not brought back: left to the next start",
                          workflow_id=wf.state.workflow_id, task_id=node.task_id)  # fmt: skip
            if (
                result is not None
                and result.get("archived")
                and self.workflows.get(key) is wf
                and node.task_id not in wf.outcome
            ):
                # Archived since it ended: it stays as it ended, and counts so.
                wf.redriving.discard(node.task_id)
                self._node_outcome(wf, node.task_id, result["status"], None)

        await asyncio.gather(*(one(n) for n in nodes))

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


def in_dependency_order(nodes: list[NodeSpec]) -> list[NodeSpec]:
    """The nodes by depth (a node after all its dependencies), in their order within
    a depth. The graph was checked acyclic when the workflow was created."""
    index = {n.task_id: i for i, n in enumerate(nodes)}
    sorter = graphlib.TopologicalSorter(
        {n.task_id: [d for d in n.depends_on if d in index] for n in nodes}
    )
    sorter.prepare()
    order: list[NodeSpec] = []
    while sorter.is_active():
        ready = sorter.get_ready()  # one depth: every node whose dependencies came before
        order += sorted((nodes[index[t]] for t in ready), key=lambda n: index[n.task_id])
        sorter.done(*ready)
    return order


def growing_chunks(items: list[Any], first: int) -> Iterator[list[Any]]:
    """``items`` in consecutive chunks of ``first``, then twice as many each time."""
    size, start = max(1, first), 0
    while start < len(items):
        yield items[start : start + size]
        start += size
        size *= 2
