"""What if the recorded workload had met another scheduling policy? (``pantheon whatif``)

Three steps, each usable alone:

1. :func:`read_workload` streams the log (read-only: an ordered consumer, no publish) and
   :class:`WorkloadBuilder` folds it into a :class:`Workload`: every task's arrival, request
   and scheduling options, its attempts as recorded (lease granted -> attempt ended) and the
   gaps between them (retry delays), its recorded wait; every worker's capacity over time.
2. :class:`Simulator` replays the arrivals in simulated time through
   :class:`pantheon_es.placement.Placement`, the very policy the live scheduler runs, with the
   policy of a :class:`PolicyFile`.
3. :func:`compare` puts the recorded and the simulated runs side by side: wait percentiles per
   priority band and per tenant, utilisation per resource and makespan; with a tenant, that
   tenant's figures only (the simulation still runs every tenant's work: they compete for
   the same workers and limits).

What is modelled and what is not: docs/whatif.md.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import statistics
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pantheon_es.errors import InvalidError
from pantheon_es.events import EventRecord
from pantheon_es.placement import Amount, Job, Key, Placement, Policy, Quota, serves
from pantheon_es.specs import PRIORITY_LEVELS
from pantheon_es.store import EventStore
from pantheon_es.workflow_file import read_document
from pantheon_es.workflows import FAIL_FAST_REASON
from tools.events import read_records

# -- the policy file -----------------------------------------------------------------------------


class PolicyFileError(ValueError):
    """A policy file that cannot be read or does not validate (the CLI exits 2)."""


Weight = Annotated[float, Field(gt=0)]
Limit = Annotated[int, Field(ge=1)]


class PolicyFile(BaseModel):
    """The scheduling policy to simulate (a YAML or JSON file; examples/whatif-*.yaml).

    Every field is optional; the defaults are those of ``pantheon up``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str | None = Field(None, description="A label for the report.")
    mode: Literal["priority", "fifo"] = Field(
        "priority",
        description="priority: priority bands with aging and fair share (the live policy); "
        "fifo: plain arrival order (no priorities, aging or fair share).",
    )
    aging_per_s: float = Field(1.0, gt=0, description="Priority points gained per second ready.")
    band: int = Field(100, gt=0, description="Width of a priority band, in points.")
    tenant_weights: dict[str, Weight] = Field(
        default_factory=dict, description="Fair-share weight per tenant (default 1)."
    )
    fairness_weights: dict[str, Weight] = Field(
        default_factory=dict, description="Fair-share weight per fairness key (default 1)."
    )
    max_running_agents: int | None = Field(None, ge=1, description="Global limit on agents.")
    concurrency_limits: dict[str, Limit] = Field(
        default_factory=dict, description="Running limit per concurrency key."
    )
    max_running_per_tenant: int | None = Field(
        None, ge=1, description="Running limit of every tenant without its own."
    )
    tenant_max_running: dict[str, Limit] = Field(
        default_factory=dict, description="Running limit per tenant."
    )
    max_pending_per_tenant: int | None = Field(
        100_000,
        ge=1,
        description="Pending bound of every tenant without its own: a submit past it is "
        "refused (overloaded); null: no bound.",
    )
    tenant_max_pending: dict[str, Limit] = Field(
        default_factory=dict, description="Pending bound per tenant."
    )
    unschedulable: Literal["reject", "block"] = Field(
        "reject",
        description="reject: refuse a submit no registered worker could ever hold; "
        "block: accept it and let it wait for a big enough worker.",
    )
    backfill_window: int = Field(256, ge=1)
    max_reservations: int = Field(1, ge=0)

    def to_policy(self) -> Policy:
        return Policy(
            aging_per_s=self.aging_per_s,
            band=self.band,
            fifo=self.mode == "fifo",
            tenant_weights=dict(self.tenant_weights),
            fairness_weights=dict(self.fairness_weights),
            max_running_agents=self.max_running_agents,
            concurrency_limits=dict(self.concurrency_limits),
            default_quota=Quota(self.max_running_per_tenant, self.max_pending_per_tenant),
            tenant_quotas={
                t: Quota(
                    self.tenant_max_running.get(t, self.max_running_per_tenant),
                    self.tenant_max_pending.get(t, self.max_pending_per_tenant),
                )
                for t in {*self.tenant_max_running, *self.tenant_max_pending}
            },
            unschedulable=self.unschedulable,
            backfill_window=self.backfill_window,
            max_reservations=self.max_reservations,
        )

    def label(self) -> str:
        return self.name or self.mode


def parse_policy(doc: Any, source: str = "policy") -> PolicyFile:
    """Validate a decoded policy document; errors name the field."""
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise PolicyFileError(f"{source}: expected a mapping of policy fields")
    try:
        policy = PolicyFile.model_validate(doc)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors()
        )
        raise PolicyFileError(f"{source}: {problems}") from None
    return policy


def load_policy(path: Path) -> PolicyFile:
    """Read a YAML or JSON (``.json``) policy file."""
    try:
        doc = read_document(path)
    except InvalidError as exc:
        raise PolicyFileError(exc.message) from None
    return parse_policy(doc, str(path))


# -- the recorded workload -----------------------------------------------------------------------

#: Events that end an attempt (the lease stops holding the worker's capacity).
_ATTEMPT_ENDS = frozenset(
    {
        "TaskCompleted",
        "TaskFailed",
        "TaskTimedOut",
        "TaskCancelled",
        "RetryScheduled",
        "LeaseExpired",
        "LeaseReleased",
    }
)
_TERMINAL = {
    "TaskCompleted": "completed",
    "TaskFailed": "failed",
    "TaskTimedOut": "timed_out",
    "TaskCancelled": "cancelled",
    "TaskSkipped": "skipped",
}


@dataclass(slots=True)
class Attempt:
    """One recorded attempt: a lease held from ``start`` for ``duration`` seconds."""

    start: float | None  # None: not run in the recording (its duration is an estimate)
    duration: float
    worker: Key | None = None
    #: Seconds from this attempt's end to the task being ready again (retry delay, redrive).
    gap: float = 0.0
    censored: bool = False  # still running at the cut-off: duration is a lower bound
    #: stopped on its worker by its fail_fast workflow's failure: duration is a lower bound
    cut_short: bool = False


@dataclass(slots=True)
class TaskRecord:
    key: Key
    name: str
    priority: int
    resources: dict[str, Any]
    agent: bool
    submitted: float
    fairness_key: str = ""
    concurrency_key: str | None = None
    concurrency_limit: int | None = None
    depends_on: tuple[str, ...] = ()
    attempts: list[Attempt] = field(default_factory=list)
    outcome: str = "pending"  # pending, running, or a terminal status
    #: its schedule-to-start timeout, seconds (the simulation fires it anew)
    schedule_to_start: float | None = None
    workflow_id: str | None = None  # a workflow's task is admitted with its workflow
    #: it timed out waiting to start (TaskTimedOut kind schedule_to_start)
    start_timed_out: bool = False
    #: cancelled because another task of its fail_fast workflow failed, before it ran or
    #: while it ran (the simulation cancels it when that happens there)
    stopped_by_workflow: bool = False
    ended: float | None = None  # recorded terminal time
    #: When it left without ever running (cancelled, timed out or skipped while pending).
    withdrawn: float | None = None
    estimated: bool = False  # attempts[0].duration is an estimate
    # -- while folding --
    open_since: float | None = None
    open_worker: Key | None = None
    ended_attempt_at: float | None = None

    @property
    def first_grant(self) -> float | None:
        return self.attempts[0].start if self.attempts and not self.estimated else None


@dataclass(frozen=True, slots=True)
class WorkerChange:
    at: float
    kind: Literal["join", "drain", "leave"]
    key: Key
    capacity: Mapping[str, Any] | None = None
    slots: int = 0
    tenants: tuple[str, ...] = ()
    incarnation: str = ""


@dataclass
class Workload:
    """The arrivals, attempts and worker capacity of a stretch of the log."""

    origin: datetime | None  # time 0 of every float time (the first event's)
    cutoff: float  # the last event's time
    last_seq: int
    events: int
    tasks: dict[Key, TaskRecord]
    workers: list[WorkerChange]
    #: median observed attempt length per task name, and of every attempt (for a task the
    #: simulation runs that has no recorded attempt)
    medians: dict[str, float] = field(default_factory=dict)
    median: float = 0.0
    #: (tenant, workflow id) of the workflows whose failure policy is fail_fast
    fail_fast: set[Key] = field(default_factory=set)

    def estimate(self, name: str) -> float:
        return self.medians.get(name, self.median)


def _ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


class WorkloadBuilder:
    """Folds event records (in log order) into a :class:`Workload`. Pure: no I/O."""

    def __init__(self) -> None:
        self.origin: datetime | None = None
        self._t0 = 0.0
        self.now = 0.0
        self.last_seq = 0
        self.events = 0
        self.tasks: dict[Key, TaskRecord] = {}
        self.workers: list[WorkerChange] = []
        self._incarnations: dict[Key, str] = {}
        self.fail_fast: set[Key] = set()

    def add(self, record: EventRecord) -> None:
        at = _ts(record.occurred_at)
        if self.origin is None:
            self.origin = datetime.fromisoformat(record.occurred_at)
            self._t0 = at
        t = max(at - self._t0, 0.0)
        self.now = max(self.now, t)
        self.last_seq = record.seq
        self.events += 1
        if record.aggregate == "task":
            self._task(record, t)
        elif record.aggregate == "worker":
            self._worker(record, t)
        elif (
            record.type == "WorkflowCreated"
            and record.data.get("failure_policy", "fail_fast") == "fail_fast"
        ):
            self.fail_fast.add((record.tenant, record.aggregate_id))

    def _task(self, r: EventRecord, t: float) -> None:
        key = (r.tenant, r.aggregate_id)
        d = r.data
        if r.type == "TaskSubmitted":
            self.tasks[key] = TaskRecord(
                key=key,
                name=d.get("name", ""),
                priority=int(d.get("priority", PRIORITY_LEVELS["medium"])),
                resources=dict(d.get("resources") or {}),
                agent=(d.get("executor") or {}).get("kind") == "agent",
                submitted=t,
                fairness_key=d.get("fairness_key") or "",
                concurrency_key=d.get("concurrency_key"),
                concurrency_limit=d.get("concurrency_limit"),
                depends_on=tuple(d.get("depends_on") or ()),
                schedule_to_start=d.get("schedule_to_start_timeout"),
                workflow_id=d.get("workflow_id"),
            )
            return
        task = self.tasks.get(key)
        if task is None:  # its submit is before the stretch read: nothing to simulate
            return
        if r.type == "LeaseGranted":
            worker = (d.get("worker_tenant") or r.tenant, d["worker_id"])
            task.open_since, task.open_worker = t, worker
            task.outcome = "running"
            return
        running = task.open_since is not None
        if r.type in _ATTEMPT_ENDS and task.open_since is not None:
            task.attempts.append(
                Attempt(task.open_since, max(t - task.open_since, 0.0), task.open_worker)
            )
            task.open_since = task.open_worker = None
            task.ended_attempt_at = t
            if r.type == "RetryScheduled":
                task.attempts[-1].gap = max(_ts(d["not_before"]) - self._t0 - t, 0.0)
            task.outcome = "pending"
        if r.type in _TERMINAL:
            task.outcome = _TERMINAL[r.type]
            task.ended = t
            if r.type == "TaskTimedOut" and d.get("kind") == "schedule_to_start":
                # The simulation fires this timeout anew, from when it is ready there.
                task.start_timed_out = True
            elif (
                r.type == "TaskCancelled"
                and d.get("reason") == FAIL_FAST_REASON
                and (running or not task.attempts)
            ):
                # The simulation stops it when its workflow fails there; an attempt this
                # cancellation stopped on its worker had not run its course.
                task.stopped_by_workflow = True
                if running:
                    task.attempts[-1].cut_short = True
            elif not task.attempts:
                task.withdrawn = t
        elif r.type == "TaskRedriven":
            task.outcome = "pending"
            task.ended = task.withdrawn = None
            task.start_timed_out = task.stopped_by_workflow = False
            if task.attempts:
                end = task.ended_attempt_at or t
                task.attempts[-1].gap = max(t - end, 0.0)
                task.attempts[-1].cut_short = False  # replayed as recorded, as any retried

    def _worker(self, r: EventRecord, t: float) -> None:
        key = (r.tenant, r.aggregate_id)
        d = r.data
        if r.type == "WorkerRegistered":
            self._incarnations[key] = d["incarnation"]
            tenants = (r.tenant, *(d.get("tenants") or ()))
            change = WorkerChange(
                t, "join", key, dict(d["capacity"]), int(d["slots"]), tenants, d["incarnation"]
            )
            self.workers.append(change)
        elif self._incarnations.get(key) != d.get("incarnation"):
            return  # a stale incarnation's event
        elif r.type == "WorkerDraining":
            self.workers.append(WorkerChange(t, "drain", key))
        elif r.type in ("WorkerStopped", "WorkerLost"):
            del self._incarnations[key]
            self.workers.append(WorkerChange(t, "leave", key))

    def finish(self) -> Workload:
        """Close what is still open at the cut-off; estimate what never ran."""
        cutoff = self.now
        observed: dict[str, list[float]] = {}
        every: list[float] = []
        for task in self.tasks.values():
            if task.open_since is not None:
                task.attempts.append(
                    Attempt(task.open_since, max(cutoff - task.open_since, 0.0),
                            task.open_worker, censored=True)
                )  # fmt: skip
                task.open_since = task.open_worker = None
            for a in task.attempts:
                if not a.censored and not a.cut_short:
                    observed.setdefault(task.name, []).append(a.duration)
                    every.append(a.duration)
        fallback = statistics.median(every) if every else 0.0
        medians = {name: statistics.median(values) for name, values in observed.items()}
        for task in self.tasks.values():
            if not task.attempts and task.outcome != "skipped":
                task.attempts.append(Attempt(None, medians.get(task.name, fallback)))
                task.estimated = True
        return Workload(
            self.origin, cutoff, self.last_seq, self.events, self.tasks, self.workers,
            medians, fallback, self.fail_fast,
        )  # fmt: skip


async def read_workload(
    store: EventStore,
    *,
    until_seq: int | None = None,
    until: datetime | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Workload:
    """Stream the log from sequence 1 up to ``until_seq`` / ``until`` (default: its end now).

    Read-only: an ordered push consumer (no publish, nothing appended).
    """
    builder = WorkloadBuilder()
    last = await store.last_seq()
    target = min(last, until_seq) if until_seq is not None else last
    limit = until.timestamp() if until is not None else None
    if target < 1:
        return builder.finish()
    records = read_records(store, 1, target)
    async with contextlib.aclosing(records):
        async for batch, _position in records:
            for record in batch:
                if limit is not None and _ts(record.occurred_at) > limit:
                    return builder.finish()
                builder.add(record)
            if progress is not None:
                progress(builder.last_seq, target)
    return builder.finish()


# -- the simulation ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Run:
    """One attempt as it ran (recorded or simulated)."""

    key: Key
    attempt: int
    worker: Key
    start: float
    end: float


@dataclass
class Outcome:
    """When each task became ready and first started, and every attempt, of one run."""

    ready: dict[Key, float]
    first_start: dict[Key, float]
    runs: list[Run]
    end: float  # the last attempt's end (or the last task's withdrawal)
    #: when each task was done: its last attempt's end, withdrawal or skip
    finished: dict[Key, float] = field(default_factory=dict)
    #: tasks that left without running: withdrawn, skipped, timed out before a start, refused
    gone: set[Key] = field(default_factory=set)
    #: timed out waiting to start (schedule_to_start)
    timed_out: set[Key] = field(default_factory=set)
    #: refused at submit: key -> "overloaded" or "unschedulable" (None: not known, as for
    #: the recording, whose log holds only the submits that were accepted)
    refused: dict[Key, str] | None = None
    #: cancelled by the failure of another task of their fail_fast workflow, while waiting
    #: or while running (the simulation only; the recording's are in its log)
    cancelled: set[Key] = field(default_factory=set)


# Same-time order: ends free capacity before workers change, before work arrives; a
# schedule-to-start timeout due at the same time as a placement pass fires first.
_FINISH, _LEAVE, _DRAIN, _JOIN, _READY, _ARRIVE, _WITHDRAW, _TIMEOUT = range(8)
#: Recorded outcomes after which a dependent does not run (it is skipped).
_FAILED = frozenset({"failed", "cancelled", "timed_out", "skipped"})


def _amount(resources: Mapping[str, Any]) -> Amount:
    return Amount(
        float(resources.get("cpu", 1.0)),
        float(resources.get("memory_mb", 0)),
        float(resources.get("gpu", 0)),
        dict(resources.get("custom") or {}),
    )


class Simulator:
    """Drives :class:`Placement` through the recorded arrivals in simulated time.

    Attempts take their recorded durations and are followed by their recorded gaps (retry
    delays); a dependent becomes ready when its last dependency ends, and is skipped if one
    did not complete; a task withdrawn in the recording (cancelled while pending) is
    withdrawn at the same time if it has not started. A worker that leaves while running an
    attempt loses it: the attempt runs again in full. Submits pass the policy's admission
    (pending bound, unschedulable requests) at their arrival, a workflow's tasks together;
    a schedule-to-start timeout fires when a ready task has not started in time.
    """

    def __init__(self, workload: Workload, policy: Policy) -> None:
        self.w = workload
        self.policy = policy
        self.p = Placement(policy)
        self._heap: list[tuple[float, int, int, Key, Any]] = []
        self._n = itertools.count()
        self._next_attempt: dict[Key, int] = {}
        self._running: dict[Key, tuple[int, Key, float]] = {}  # key -> (attempt, worker, start)
        self._waiting: dict[Key, set[str]] = {}
        self._dependents: dict[Key, list[Key]] = {}
        self._done: set[Key] = set()
        self._arrived: set[Key] = set()
        self._incarnation: dict[Key, str] = {}
        #: when each task last became ready to place (its schedule-to-start timer's token)
        self._ready_since: dict[Key, float] = {}
        #: ended without completing in the simulation: its dependents are skipped
        self._failed: set[Key] = set()
        #: admitted tasks not running and not done, per tenant (the pending bound counts them)
        self._pending: dict[str, set[Key]] = {}
        #: (tenant, workflow id) -> its tasks in the workload; and the admission verdict
        self._members: dict[Key, list[Key]] = {}
        self._verdicts: dict[Key, str] = {}
        #: fail_fast workflows that failed in the simulation
        self._stopped: set[Key] = set()
        self.ready: dict[Key, float] = {}
        self.first_start: dict[Key, float] = {}
        self.runs: list[Run] = []
        self.end = 0.0
        self.finished: dict[Key, float] = {}
        self.gone: set[Key] = set()
        self.timed_out: set[Key] = set()
        self.refused: dict[Key, str] = {}
        self.cancelled: set[Key] = set()

    def _push(self, at: float, kind: int, key: Key, payload: Any = None) -> None:
        heapq.heappush(self._heap, (at, kind, next(self._n), key, payload))

    def run(self) -> Outcome:
        tasks = self.w.tasks
        for key, task in tasks.items():
            self._push(task.submitted, _ARRIVE, key)
            if task.withdrawn is not None and task.outcome != "skipped":
                self._push(task.withdrawn, _WITHDRAW, key)
            deps = {d for d in task.depends_on if (key[0], d) in tasks}
            if deps:
                self._waiting[key] = deps
                for d in deps:
                    self._dependents.setdefault((key[0], d), []).append(key)
            if task.workflow_id is not None:
                self._members.setdefault((key[0], task.workflow_id), []).append(key)
        for change in self.w.workers:
            kind = {"join": _JOIN, "drain": _DRAIN, "leave": _LEAVE}[change.kind]
            self._push(change.at, kind, change.key, change)
        while self._heap:
            now = self._heap[0][0]
            while self._heap and self._heap[0][0] == now:
                _t, kind, _n, key, payload = heapq.heappop(self._heap)
                self._handle(now, kind, key, payload)
            self._place(now)
        return Outcome(
            self.ready, self.first_start, self.runs, self.end, self.finished, self.gone,
            self.timed_out, self.refused, self.cancelled,
        )  # fmt: skip

    def _handle(self, now: float, kind: int, key: Key, payload: Any) -> None:
        if kind == _ARRIVE:
            refusal = self._admit(key)
            if refusal:
                self.refused[key] = refusal
                self.gone.add(key)
                self._done.add(key)  # its workflow's other tasks are refused with it
                return
            self._arrived.add(key)
            self._set_pending(key, True)
            workflow = self.w.tasks[key].workflow_id
            if workflow is not None and (key[0], workflow) in self._stopped:
                self.gone.add(key)  # its fail_fast workflow failed already
                self._failed.add(key)
                self._finish(key, now)
            elif key not in self._waiting:
                self._make_ready(key, now)
        elif kind == _READY:
            if key not in self._done:  # not cancelled by its workflow during the retry delay
                self._enqueue(key, now)
        elif kind == _FINISH:
            attempt, worker, start = payload
            if self._running.get(key) == (attempt, worker, start):
                del self._running[key]
                self.p.release(key)
                self.runs.append(Run(key, attempt, worker, start, now))
                self.end = max(self.end, now)
                task = self.w.tasks[key]
                if attempt + 1 < len(task.attempts):
                    self._next_attempt[key] = attempt + 1
                    self._set_pending(key, True)
                    self._push(now + task.attempts[attempt].gap, _READY, key)
                elif (
                    task.outcome in _FAILED
                    and not task.start_timed_out
                    and not task.stopped_by_workflow
                ):
                    self._fail(key, now)
                else:
                    self._finish(key, now)
        elif kind == _WITHDRAW:
            if key not in self.first_start and key not in self._done:
                self.p.remove(key)
                self.gone.add(key)
                self._fail(key, now)
        elif kind == _TIMEOUT:
            if (
                key not in self._done
                and key not in self._running
                and self._ready_since.get(key) == payload
                and key in self.p.jobs
            ):
                self.p.remove(key)
                self.timed_out.add(key)
                if key not in self.first_start:
                    self.gone.add(key)
                self._fail(key, now)
        elif kind == _JOIN:
            change: WorkerChange = payload
            old = self._incarnation.get(key)
            if old is not None and old != change.incarnation:
                self._leave(key, now)  # the old process is gone: its attempts are lost
            self._incarnation[key] = change.incarnation
            cap = dict(change.capacity or {})
            self.p.add_worker(key, _amount(cap), change.slots, tenants=change.tenants)
        elif kind == _DRAIN:
            self.p.set_accepting(key, False)
        elif kind == _LEAVE:
            self._incarnation.pop(key, None)
            self._leave(key, now)

    def _admit(self, key: Key) -> str:
        """ "" if the submit is accepted, else why not (``overloaded``, ``unschedulable``):
        the checks of the live scheduler's admission, a workflow's tasks all at once at
        the arrival of its first."""
        task = self.w.tasks[key]
        if task.workflow_id is None:
            return self._check(key[0], [task])
        group = (key[0], task.workflow_id)
        verdict = self._verdicts.get(group)
        if verdict is None:
            members = [self.w.tasks[k] for k in self._members[group]]
            verdict = self._verdicts[group] = self._check(key[0], members)
        return verdict

    def _check(self, tenant: str, tasks: list[TaskRecord]) -> str:
        if self.policy.unschedulable == "reject":
            for task in tasks:
                if self.p.impossible(tenant, _amount(task.resources)) is not None:
                    return "unschedulable"
        bound = self.policy.quota(tenant).max_pending
        if bound is not None and len(self._pending.get(tenant, ())) + len(tasks) > bound:
            return "overloaded"
        return ""

    def _set_pending(self, key: Key, pending: bool) -> None:
        if pending:
            self._pending.setdefault(key[0], set()).add(key)
        else:
            self._pending.get(key[0], set()).discard(key)

    def _enqueue(self, key: Key, now: float) -> None:
        """Ready to place from ``now``: into the policy, with its schedule-to-start timer."""
        self.p.add(self._job(key, now))
        self._ready_since[key] = now
        timeout = self.w.tasks[key].schedule_to_start
        if timeout:
            self._push(now + timeout, _TIMEOUT, key, now)

    def _leave(self, worker: Key, now: float) -> None:
        for key in self.p.remove_worker(worker):
            self.p.release(key)
            attempt, _w, start = self._running.pop(key)
            self.runs.append(Run(key, attempt, worker, start, now))
            self._set_pending(key, True)
            self._enqueue(key, now)  # the same attempt, again in full

    def _make_ready(self, key: Key, now: float) -> None:
        if key in self._done:
            return  # withdrawn before its dependencies ended
        self.ready.setdefault(key, now)
        self._next_attempt[key] = 0
        task = self.w.tasks[key]
        deps = [(key[0], d) for d in task.depends_on if (key[0], d) in self.w.tasks]
        recorded_skip = task.outcome == "skipped" and not task.attempts
        if any(d in self._failed for d in deps) or (recorded_skip and not self._revived(deps)):
            self.gone.add(key)
            self._fail(key, now)
            return
        self._enqueue(key, now)

    def _fail(self, key: Key, now: float) -> None:
        """``key`` ended without completing: its dependents will be skipped, and a
        fail_fast workflow cancels its other tasks, as the live scheduler does: a waiting
        one leaves, a running one is stopped on its worker now (its worker is free at once
        for the next placement pass, at this same moment)."""
        self._failed.add(key)
        self._finish(key, now)
        workflow = self.w.tasks[key].workflow_id
        group = (key[0], workflow or "")
        if workflow is None or group not in self.w.fail_fast or group in self._stopped:
            return
        self._stopped.add(group)
        for member in self._members.get(group, ()):
            if member in self._done or member not in self._arrived:
                continue  # ended, or not created yet (cancelled when it arrives)
            running = self._running.pop(member, None)
            if running is not None:  # its _FINISH event no longer matches: ignored
                attempt, worker, start = running
                self.p.release(member)
                self.runs.append(Run(member, attempt, worker, start, now))
            else:
                self.p.remove(member)
                if member not in self.first_start:
                    self.gone.add(member)
            self.cancelled.add(member)
            self._failed.add(member)
            self._finish(member, now)

    def _revived(self, deps: list[Key]) -> bool:
        """A task skipped in the recording runs here if what skipped it is gone: a
        dependency that timed out waiting to start there started here."""
        return any(
            self.w.tasks[d].start_timed_out and self.w.tasks[d].first_grant is None
            and d in self.first_start
            for d in deps
        )  # fmt: skip

    def _finish(self, key: Key, now: float) -> None:
        if key in self._done:
            return
        self._done.add(key)
        self._set_pending(key, False)
        self.end = max(self.end, now)
        self.finished[key] = now
        for dependent in self._dependents.get(key, ()):
            waiting = self._waiting.get(dependent)
            if waiting is None:
                continue
            waiting.discard(key[1])
            if not waiting:
                del self._waiting[dependent]
                if dependent in self._arrived:
                    self._make_ready(dependent, now)

    def _job(self, key: Key, since: float) -> Job:
        t = self.w.tasks[key]
        return Job(
            key,
            t.priority,
            since,
            _amount(t.resources),
            agent=t.agent,
            fairness_key=t.fairness_key,
            concurrency_key=t.concurrency_key,
            concurrency_limit=t.concurrency_limit,
        )

    def _place(self, now: float) -> None:
        for grant in self.p.place(now).grants:
            key = grant.key
            attempt = self._next_attempt.get(key, 0)
            self._running[key] = (attempt, grant.worker, now)
            self._set_pending(key, False)
            self.first_start.setdefault(key, now)
            task = self.w.tasks[key]
            if attempt < len(task.attempts):
                recorded_attempt = task.attempts[attempt]
                duration = recorded_attempt.duration
                if recorded_attempt.cut_short:  # it had run this long at least
                    duration = max(duration, self.w.estimate(task.name))
            else:  # skipped in the recording, so never run there (see _revived)
                duration = self.w.estimate(task.name)
            self._push(now + duration, _FINISH, key, (attempt, grant.worker, now))


def recorded(workload: Workload) -> Outcome:
    """What really happened, in the same shape as a simulation's outcome."""
    tasks = workload.tasks
    ready: dict[Key, float] = {}
    first: dict[Key, float] = {}
    runs: list[Run] = []
    finished: dict[Key, float] = {}
    gone: set[Key] = set()
    timed_out: set[Key] = set()
    end = 0.0
    for key, task in tasks.items():
        deps = [tasks[(key[0], d)] for d in task.depends_on if (key[0], d) in tasks]
        ends = [d.ended for d in deps]
        if all(e is not None for e in ends):
            ready[key] = max([task.submitted, *(e for e in ends if e is not None)])
        if task.first_grant is not None:
            first[key] = task.first_grant
        if not task.estimated:
            for i, a in enumerate(task.attempts):
                if a.start is not None and a.worker is not None:
                    runs.append(Run(key, i, a.worker, a.start, a.start + a.duration))
                    end = max(end, a.start + a.duration)
        if task.ended is not None:
            end = max(end, task.ended)
            finished[key] = task.ended
        if task.start_timed_out:
            timed_out.add(key)
        never = task.first_grant is None
        if (
            task.withdrawn is not None
            or task.outcome == "skipped"
            or ((task.start_timed_out or task.stopped_by_workflow) and never)
        ):
            gone.add(key)
    return Outcome(ready, first, runs, end, finished, gone, timed_out, None)


def simulate(workload: Workload, policy: Policy) -> Outcome:
    return Simulator(workload, policy).run()


# -- the comparison ------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted ``values`` (q in 0..100)."""
    rank = max(math.ceil(q / 100 * len(values)), 1)
    return values[min(rank, len(values)) - 1]


def summary(values: Iterable[float]) -> dict[str, Any]:
    vs = sorted(values)
    if not vs:
        return {"count": 0, "p50": None, "p90": None, "p99": None, "max": None}
    return {
        "count": len(vs),
        "p50": round(percentile(vs, 50), 6),
        "p90": round(percentile(vs, 90), 6),
        "p99": round(percentile(vs, 99), 6),
        "max": round(vs[-1], 6),
    }


def band_name(priority: int) -> str:
    """The named level whose band holds ``priority`` (bands of 100 points)."""
    base = priority // 100 * 100
    for name, number in PRIORITY_LEVELS.items():
        if number == base:
            return name
    return f"{base}-{base + 99}"


def _capacity_seconds(
    workload: Workload, start: float, end: float, tenant: str | None = None
) -> tuple[dict[str, float], dict[Key, Amount], dict[Key, int]]:
    """Capacity-seconds each resource was available in [start, end], and every worker's
    capacity (a worker still registered at the cut-off stays to the end); with ``tenant``,
    of the workers serving that tenant only."""
    avail: dict[str, float] = {}
    caps: dict[Key, Amount] = {}
    slots: dict[Key, int] = {}
    joined: dict[Key, float] = {}

    def close(key: Key, at: float) -> None:
        since = joined.pop(key, None)
        if since is None:
            return
        span = max(min(at, end) - max(since, start), 0.0)
        cap = caps[key]
        for res, value in _vector(cap, slots[key]).items():
            avail[res] = avail.get(res, 0.0) + value * span

    for change in workload.workers:
        if change.kind == "join":
            close(change.key, change.at)
            if tenant is not None and not serves(change.tenants, tenant):
                continue
            caps[change.key] = _amount(change.capacity or {})
            slots[change.key] = change.slots
            joined[change.key] = change.at
        elif change.kind == "leave":
            close(change.key, change.at)
    for key in list(joined):
        close(key, end)
    return avail, caps, slots


def _vector(a: Amount, n: int) -> dict[str, float]:
    out = {"slots": float(n), "cpu": a.cpu, "memory_mb": a.memory_mb, "gpu": a.gpu}
    out.update({f"custom:{k}": v for k, v in a.custom.items()})
    return out


def measure(workload: Workload, outcome: Outcome, tenant: str | None = None) -> dict[str, Any]:
    """Wait percentiles per band and tenant, utilisation per resource and makespan.

    With ``tenant``, of that tenant's tasks only: their waits; their makespan (first
    submit to their last attempt's end or withdrawal); utilisation as the share of the
    capacity of the workers serving the tenant that its attempts held over that span.
    """

    def mine(key: Key) -> bool:
        return tenant is None or key[0] == tenant

    waits: dict[Key, float] = {
        k: max(outcome.first_start[k] - outcome.ready[k], 0.0)
        for k in outcome.first_start
        if k in outcome.ready and mine(k)
    }
    by_band: dict[str, list[float]] = {}
    by_tenant: dict[str, list[float]] = {}
    for key, wait in waits.items():
        task = workload.tasks[key]
        by_band.setdefault(band_name(task.priority), []).append(wait)
        by_tenant.setdefault(key[0], []).append(wait)
    runs = [run for run in outcome.runs if mine(run.key)]
    start = min((t.submitted for k, t in workload.tasks.items() if mine(k)), default=0.0)
    if tenant is None:
        end = max(outcome.end, start)
    else:
        ends = [run.end for run in runs]
        ends += [at for k, at in outcome.finished.items() if mine(k)]
        end = max([start, *ends])
    avail, _caps, _slots = _capacity_seconds(workload, start, end, tenant)
    busy: dict[str, float] = {}
    for run in runs:
        span = max(min(run.end, end) - max(run.start, start), 0.0)
        need = _amount(workload.tasks[run.key].resources)
        for res, value in _vector(need, 1).items():
            busy[res] = busy.get(res, 0.0) + value * span
    utilisation = {
        res: round(busy.get(res, 0.0) / total, 6) if total > 0 else None
        for res, total in sorted(avail.items())
        if total > 0 or busy.get(res)
    }
    order = {name: i for i, name in enumerate(PRIORITY_LEVELS)}
    return {
        "wait": {
            "all": summary(waits.values()),
            "by_priority": {
                b: summary(v)
                for b, v in sorted(by_band.items(), key=lambda kv: (order.get(kv[0], 9), kv[0]))
            },
            "by_tenant": {t: summary(v) for t, v in sorted(by_tenant.items())},
        },
        "started": sum(1 for k in outcome.first_start if mine(k)),
        "not_started": sum(
            1
            for k in workload.tasks
            if mine(k) and k not in outcome.first_start and k not in outcome.gone
        ),
        "timed_out_before_start": sum(
            1 for k in outcome.timed_out if mine(k) and k not in outcome.first_start
        ),
        "refused": None
        if outcome.refused is None
        else {
            why: sum(1 for k, r in outcome.refused.items() if r == why and mine(k))
            for why in ("overloaded", "unschedulable")
        },
        "utilisation": utilisation,
        "makespan": round(end - start, 6),
    }


def compare(
    workload: Workload, policy_file: PolicyFile, tenant: str | None = None
) -> dict[str, Any]:
    """The report: the recorded run and the simulated one, side by side.

    The simulation always runs every tenant's work (they compete for the same workers and
    limits); ``tenant`` narrows what is reported to that tenant's tasks and the workers
    serving it.
    """
    simulated = simulate(workload, policy_file.to_policy())
    tasks = [t for k, t in workload.tasks.items() if tenant is None or k[0] == tenant]
    joins = [c for c in workload.workers if c.kind == "join"]
    return {
        "policy": {"label": policy_file.label(), **policy_file.model_dump(exclude={"name"})},
        "tenant": tenant,
        "log": {
            "from": workload.origin.isoformat() if workload.origin else None,
            "last_seq": workload.last_seq,
            "events": workload.events,
            "span_s": round(workload.cutoff, 6),
        },
        "tasks": {
            "total": len(tasks),
            "estimated_duration": sum(1 for t in tasks if t.estimated),
            "still_running_at_cutoff": sum(1 for t in tasks if any(a.censored for a in t.attempts)),
            "never_ran": sum(1 for t in tasks if t.first_grant is None),
            "retried": sum(1 for t in tasks if len(t.attempts) > 1),
            "workers": len({c.key for c in joins if tenant is None or serves(c.tenants, tenant)}),
        },
        "recorded": measure(workload, recorded(workload), tenant),
        "simulated": measure(workload, simulated, tenant),
    }


# -- the report as tables ------------------------------------------------------------------------


def _fmt(value: float | None, unit: str = "") -> str:
    return "-" if value is None else f"{value:.3f}{unit}"


def _quantiles(s: Mapping[str, Any]) -> str:
    return " / ".join(_fmt(s[q]) for q in ("p50", "p90", "p99", "max"))


def tables(report: dict[str, Any]) -> list[Any]:
    """Rich tables of a :func:`compare` report: waits per band, per tenant, then totals."""
    from rich.table import Table

    rec, sim = report["recorded"], report["simulated"]
    label = report["policy"]["label"]
    out: list[Any] = []
    for title, part in (("priority band", "by_priority"), ("tenant", "by_tenant")):
        table = Table(title=f"Wait from ready to first lease, seconds, per {title}")
        table.add_column(title.upper())
        for side in ("recorded", label):
            table.add_column("n", justify="right")
            table.add_column(f"{side}: p50 / p90 / p99 / max", justify="right")
        groups = list(dict.fromkeys([*rec["wait"][part], *sim["wait"][part]]))
        empty = summary([])
        for group in [*groups, "all"]:
            cells = [group]
            for side in (rec, sim):
                s = side["wait"]["all"] if group == "all" else side["wait"][part].get(group, empty)
                cells += [str(s["count"]), _quantiles(s)]
            table.add_row(*cells, end_section=bool(groups) and group == groups[-1])
        out.append(table)
    totals = Table(title="Utilisation (busy / available capacity-seconds) and makespan")
    totals.add_column("MEASURE")
    totals.add_column("recorded", justify="right")
    totals.add_column(label, justify="right")
    for res in dict.fromkeys([*rec["utilisation"], *sim["utilisation"]]):
        r, s = rec["utilisation"].get(res), sim["utilisation"].get(res)
        totals.add_row(
            f"utilisation {res}",
            "-" if r is None else f"{r:.1%}",
            "-" if s is None else f"{s:.1%}",
        )
    totals.add_row("makespan", _fmt(rec["makespan"], " s"), _fmt(sim["makespan"], " s"))
    totals.add_row("tasks started", str(rec["started"]), str(sim["started"]))
    totals.add_row("never started", str(rec["not_started"]), str(sim["not_started"]))
    totals.add_row(
        "timed out before a start",
        str(rec["timed_out_before_start"]),
        str(sim["timed_out_before_start"]),
    )
    for why in ("overloaded", "unschedulable"):
        cells = [
            "-" if side["refused"] is None else str(side["refused"][why]) for side in (rec, sim)
        ]
        totals.add_row(f"refused: {why}", *cells)
    out.append(totals)
    return out
