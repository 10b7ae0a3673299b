"""The task aggregate: commands, events, state and the pure decide/evolve.

Life of a task (an agent is a task whose executor is ``agent``)::

    pending --LeaseGranted--> leased --TaskStarted--> running --TaskCompleted--> completed
       ^  |                     |                        |------TaskFailed-----> failed
       |  +--TaskBlocked (why it waits; stays pending)   |------TaskTimedOut---> timed_out
       +---LeaseExpired/LeaseReleased (attempts left)----+
       +---RetryScheduled (a failure, retry policy allows; waits until not_before)
    any non-terminal --TaskCancelled--> cancelled
    pending --TaskTimedOut (schedule_to_start)--> timed_out
    pending --TaskSkipped (a workflow dependency did not complete)--> skipped
    failed/timed_out --TaskRedriven--> pending       (failed tasks are the dead-letter queue)
    (a workflow's node: failed/timed_out/cancelled/skipped --TaskRedriven--> pending, when
     its workflow is redriven)
    terminal --TaskArchived--> (gone from read models)

A lease carries a fencing token (the task's lease counter: 1, 2, 3...). Every
report from a worker (start, heartbeat, progress, completion, failure,
release) names its lease and token; a report for a lease that is not the live
one, or whose ``expires_at`` has passed, is refused with ``stale_lease`` and
changes nothing.

Commands without a ``verb`` (GrantLease, ExpireLease, TimeOutTask, BlockTask) are the
scheduler's decisions: they go through the same ``decide`` but are never
routed from NATS.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints

from pantheon_es.commands import Command
from pantheon_es.domain import AggregateType, DecideContext, Decision, register
from pantheon_es.errors import ConflictError, InternalError, NotFoundError, StaleLeaseError
from pantheon_es.events import Event, EventData
from pantheon_es.specs import (
    AgentSpec,
    ErrorInfo,
    ExecutorSpec,
    Labels,
    Priority,
    Resources,
    RetryPolicy,
    SchedulingOptions,
    Seconds,
    Usage,
)


class TaskStatus(StrEnum):
    PENDING = "pending"
    LEASED = "leased"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"
    SKIPPED = "skipped"  # a workflow task whose dependency did not complete


TERMINAL = frozenset(
    {
        TaskStatus.COMPLETED,
        TaskStatus.FAILED,
        TaskStatus.CANCELLED,
        TaskStatus.TIMED_OUT,
        TaskStatus.SKIPPED,
    }
)
LIVE = frozenset({TaskStatus.PENDING, TaskStatus.LEASED, TaskStatus.RUNNING})

TaskId = Annotated[
    str, StringConstraints(min_length=26, max_length=26, pattern=r"^[0-9A-HJKMNP-TV-Z]{26}$")
]
TaskName = Annotated[str, StringConstraints(min_length=1, max_length=200)]
Reason = Annotated[str, StringConstraints(max_length=2000)]
ActivityState = Literal["active", "waiting_for_input"]

#: Lease losses (expiry, worker lost, hand-back) a task survives before it fails.
DEFAULT_MAX_ATTEMPTS = 3


# -- commands: clients ------------------------------------------------------------------


class SubmitTask(Command, SchedulingOptions, aggregate="task", verb="submit"):
    """Submit a task to run; it starts ``pending``."""

    creates = True

    name: TaskName
    executor: ExecutorSpec
    priority: Priority = Field("medium", validate_default=True)
    resources: Resources = Field(default_factory=Resources)
    labels: Labels = Field(default_factory=dict)
    task_id: TaskId | None = Field(
        None, description="Choose the id (a ULID) yourself; default: the service makes one."
    )
    inactivity_timeout: Seconds | None = Field(
        None,
        description="Time out a running task with no activity for this long; "
        "0 = never; default: the node's setting (30 minutes).",
    )
    max_attempts: int = Field(DEFAULT_MAX_ATTEMPTS, ge=1, le=100)

    def target_id(self) -> str | None:
        return self.task_id


class SpawnAgent(Command, SchedulingOptions, aggregate="task", verb="spawn"):
    """Spawn an agent: a task whose executor is a coding-agent CLI (``agent``)."""

    creates = True

    prompt: Annotated[str, StringConstraints(min_length=1, max_length=200_000)]
    files: list[str] = Field(default_factory=list, max_length=1000)
    delegates: list[str] = Field(default_factory=list, max_length=100)
    template: Annotated[str, StringConstraints(max_length=100)] | None = None
    name: TaskName = "agent"
    priority: Priority = Field("medium", validate_default=True)
    resources: Resources = Field(default_factory=Resources)
    labels: Labels = Field(default_factory=dict)
    agent_id: TaskId | None = Field(None, description="Choose the id (a ULID) yourself.")
    inactivity_timeout: Seconds | None = None
    max_attempts: int = Field(DEFAULT_MAX_ATTEMPTS, ge=1, le=100)

    def target_id(self) -> str | None:
        return self.agent_id


class CancelTask(Command, aggregate="task", verb="cancel"):
    """Cancel a task that has not finished. Cancelling a cancelled task is a no-op."""

    task_id: TaskId
    reason: Reason | None = None

    def target_id(self) -> str | None:
        return self.task_id


class _LeaseReport(Command):
    """A report from the worker holding a lease: names the lease and its fencing token."""

    task_id: TaskId
    lease_id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    fencing_token: int = Field(ge=1)

    def target_id(self) -> str | None:
        return self.task_id


class StartTask(_LeaseReport, aggregate="task", verb="start"):
    """The worker started running the task."""

    pid: int | None = None


class Heartbeat(_LeaseReport, aggregate="task", verb="heartbeat"):
    """Renew the lease. ``activity``: the task did something since the last report."""

    activity: bool = True
    usage: Usage | None = None


class ReportProgress(_LeaseReport, aggregate="task", verb="progress"):
    """Progress of a running task (counts as activity)."""

    progress: float | None = Field(None, ge=0, le=1)
    message: Annotated[str, StringConstraints(max_length=2000)] = ""
    state: ActivityState = "active"


class CompleteTask(_LeaseReport, aggregate="task", verb="complete"):
    """The task finished; ``result`` is any JSON value."""

    result: Any = None
    usage: Usage | None = None
    started_at: datetime | None = Field(
        None, description="When it started, if the start was not reported separately."
    )


class FailTask(_LeaseReport, aggregate="task", verb="fail"):
    """The task failed."""

    error: ErrorInfo
    usage: Usage | None = None
    started_at: datetime | None = None


class ReleaseTask(_LeaseReport, aggregate="task", verb="release"):
    """Hand the lease back (graceful worker shutdown); the task is offered again."""

    reason: Reason = "released by worker"


class SubmitWorkflowTask(SubmitTask):
    """Internal: a workflow's node becomes a task (the scheduler creates them)."""

    workflow_id: str
    node: str
    depends_on: list[str] = Field(default_factory=list)  # task ids


class RedriveTask(Command, aggregate="task", verb="redrive"):
    """Run a failed or timed-out task again (the dead-letter queue's re-drive).

    It starts pending with a fresh allowance of attempts; its lease counter
    (fencing token) goes on from where it was.
    """

    task_id: TaskId
    reason: Reason = "redriven"

    def target_id(self) -> str | None:
        return self.task_id


class RedriveWorkflowTask(Command, aggregate="task"):
    """Internal: a node of a redriven workflow runs again (the scheduler decides these).

    ``redrive`` is the workflow's redrive number: a node already brought back by it
    is left as it is, so deciding it twice (a restart mid-redrive) is harmless.
    ``waiting_for``: its dependencies (task ids) that had not completed then.
    """

    task_id: TaskId
    workflow_id: str
    redrive: int = Field(ge=1)
    reason: Reason = "workflow redriven"
    waiting_for: list[str] = Field(default_factory=list)

    def target_id(self) -> str | None:
        return self.task_id


class ArchiveTask(Command, aggregate="task", verb="archive"):
    """Drop a finished task from the read models; its history stays in the log."""

    task_id: TaskId
    reason: Reason = "cleanup"

    def target_id(self) -> str | None:
        return self.task_id


# -- commands: the scheduler (internal) -------------------------------------------------------


class GrantLease(Command, aggregate="task"):
    task_id: TaskId
    lease_id: str
    worker_id: str
    ttl: float
    epoch: int | None = None  # the granting scheduler's leadership epoch
    worker_tenant: str | None = None  # a worker of another tenant that serves this one

    def target_id(self) -> str | None:
        return self.task_id


class ExpireLease(Command, aggregate="task"):
    task_id: TaskId
    lease_id: str
    reason: Literal["not renewed", "worker lost", "worker stopped"] = "not renewed"

    def target_id(self) -> str | None:
        return self.task_id


TimeoutKind = Literal["inactivity", "schedule_to_start", "start_to_close"]


class TimeOutTask(Command, aggregate="task"):
    task_id: TaskId
    timeout: float
    kind: TimeoutKind = "inactivity"
    #: The latest activity the scheduler saw, messages included (the task's own
    #: events do not show messages sent to or by it).
    last_activity_at: datetime | None = None
    #: start_to_close: the lease whose attempt ran too long
    lease_id: str | None = None

    def target_id(self) -> str | None:
        return self.task_id


class SkipTask(Command, aggregate="task"):
    """Internal: a workflow dependency of this pending task did not complete."""

    task_id: TaskId
    dependency: str
    reason: str

    def target_id(self) -> str | None:
        return self.task_id


class BlockTask(Command, aggregate="task"):
    """Record why a pending task cannot be placed (only when the reason changes)."""

    task_id: TaskId
    reason: str
    details: dict[str, Any] = Field(default_factory=dict)

    def target_id(self) -> str | None:
        return self.task_id


# -- events -------------------------------------------------------------------------------------


class TaskSubmitted(
    EventData, SchedulingOptions, type_name="TaskSubmitted", version=1, aggregate="task"
):
    name: str
    executor: ExecutorSpec
    priority: int
    resources: Resources
    labels: dict[str, str]
    idempotency_key: str | None = None
    inactivity_timeout: float | None = None
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    workflow_id: str | None = None
    node: str | None = None
    depends_on: list[str] = Field(default_factory=list)


class LeaseGranted(EventData, type_name="LeaseGranted", version=1, aggregate="task"):
    lease_id: str
    worker_id: str
    attempt: int
    fencing_token: int
    expires_at: datetime
    ttl: float
    epoch: int | None = None  # the granting scheduler's leadership epoch
    worker_tenant: str | None = None  # the worker's tenant, when not the task's


class TaskStarted(EventData, type_name="TaskStarted", version=1, aggregate="task"):
    lease_id: str
    started_at: datetime
    pid: int | None = None


class LeaseRenewed(EventData, type_name="LeaseRenewed", version=1, aggregate="task"):
    lease_id: str
    expires_at: datetime
    activity: bool
    usage: Usage | None = None


class TaskProgressed(EventData, type_name="TaskProgressed", version=1, aggregate="task"):
    lease_id: str
    progress: float | None = None
    message: str = ""
    state: str = "active"


class LeaseExpired(EventData, type_name="LeaseExpired", version=1, aggregate="task"):
    lease_id: str
    attempt: int
    reason: str


class LeaseReleased(EventData, type_name="LeaseReleased", version=1, aggregate="task"):
    lease_id: str
    attempt: int
    reason: str


class TaskCompleted(EventData, type_name="TaskCompleted", version=1, aggregate="task"):
    lease_id: str
    result: Any = None
    usage: Usage | None = None
    #: When it started, if no TaskStarted was recorded (a task that finished before
    #: its worker reported the start): one event instead of a 2-event batch.
    started_at: datetime | None = None


class TaskFailed(EventData, type_name="TaskFailed", version=1, aggregate="task"):
    lease_id: str | None
    error: ErrorInfo
    usage: Usage | None = None
    started_at: datetime | None = None


class TaskTimedOut(EventData, type_name="TaskTimedOut", version=1, aggregate="task"):
    lease_id: str | None
    timeout: float
    last_activity_at: datetime
    kind: str = "inactivity"


class TaskSkipped(EventData, type_name="TaskSkipped", version=1, aggregate="task"):
    """A workflow task that will not run: a dependency failed, was cancelled or skipped."""

    dependency: str
    reason: str


class TaskBlocked(EventData, type_name="TaskBlocked", version=1, aggregate="task"):
    """Why a pending task cannot be placed now (placement.BlockReason values)."""

    reason: str
    details: dict[str, Any] = Field(default_factory=dict)


class RetryScheduled(EventData, type_name="RetryScheduled", version=1, aggregate="task"):
    """An attempt failed and the retry policy allows another, from ``not_before`` on."""

    lease_id: str | None
    attempt: int
    error: ErrorInfo
    delay: float
    not_before: datetime
    usage: Usage | None = None


class TaskRedriven(EventData, type_name="TaskRedriven", version=1, aggregate="task"):
    previous_status: str
    reason: str
    #: a workflow's node: the workflow's redrive that brought it back
    workflow_redrive: int | None = None
    #: a workflow's node: its dependencies (task ids) that had not completed yet
    waiting_for: list[str] | None = None


class TaskCancelled(EventData, type_name="TaskCancelled", version=1, aggregate="task"):
    reason: str | None = None
    previous_status: str
    lease_id: str | None = None


class TaskArchived(EventData, type_name="TaskArchived", version=1, aggregate="task"):
    reason: str
    status: str


# -- state ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Lease:
    lease_id: str
    worker_id: str
    attempt: int
    fencing_token: int
    expires_at: datetime
    ttl: float
    worker_tenant: str | None = None  # the worker's tenant, when not the task's


@dataclass(frozen=True, slots=True)
class TaskState:
    task_id: str
    status: TaskStatus
    name: str
    priority: int
    resources: Resources
    executor_kind: str
    submitted_at: datetime
    last_activity_at: datetime
    inactivity_timeout: float | None = None
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    attempt: int = 0  # leases granted so far; also the last fencing token
    lease: Lease | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    archived: bool = False
    version: int = 1
    options: SchedulingOptions = SchedulingOptions()  # noqa: RUF009 (frozen, shared safely)
    #: When it last became ready to place (submitted, lease lost, retry due, redriven).
    pending_since: datetime | None = None
    blocked: str | None = None  # the last TaskBlocked reason, while pending
    not_before: datetime | None = None  # a scheduled retry's earliest start
    attempts_base: int = 0  # ``attempt`` at the last redrive
    workflow_id: str | None = None
    node: str | None = None
    depends_on: tuple[str, ...] = ()
    #: the last workflow redrive that brought this node back (0: none)
    workflow_redrive: int = 0

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def attempt_limit(self) -> int:
        retry = self.options.retry
        return retry.max_attempts if retry is not None else self.max_attempts

    @property
    def attempts_used(self) -> int:
        return self.attempt - self.attempts_base


#: The fields an event changes (evolve applies them and the version in one ``replace``).
Changes = dict[str, Any]


@functools.singledispatch
def _apply(data: EventData, state: TaskState, event: Event[Any]) -> Changes:
    raise InternalError(f"task aggregate cannot apply {event.type}")


@_apply.register
def _leased(data: LeaseGranted, state: TaskState, event: Event[Any]) -> Changes:
    lease = Lease(
        data.lease_id,
        data.worker_id,
        data.attempt,
        data.fencing_token,
        data.expires_at,
        data.ttl,
        data.worker_tenant,
    )
    return dict(
        status=TaskStatus.LEASED,
        lease=lease,
        attempt=data.attempt,
        blocked=None,
        not_before=None,
    )


@_apply.register
def _started(data: TaskStarted, state: TaskState, event: Event[Any]) -> Changes:
    return dict(
        status=TaskStatus.RUNNING,
        started_at=data.started_at,
        last_activity_at=event.occurred_at,
    )


@_apply.register
def _renewed(data: LeaseRenewed, state: TaskState, event: Event[Any]) -> Changes:
    assert state.lease is not None
    activity = event.occurred_at if data.activity else state.last_activity_at
    return dict(lease=replace(state.lease, expires_at=data.expires_at), last_activity_at=activity)


@_apply.register
def _progressed(data: TaskProgressed, state: TaskState, event: Event[Any]) -> Changes:
    return dict(last_activity_at=event.occurred_at)


def _back_to_pending(state: TaskState, event: Event[Any]) -> Changes:
    return dict(status=TaskStatus.PENDING, lease=None, pending_since=event.occurred_at)


@_apply.register
def _blocked(data: TaskBlocked, state: TaskState, event: Event[Any]) -> Changes:
    return dict(blocked=data.reason)


@_apply.register
def _retry_scheduled(data: RetryScheduled, state: TaskState, event: Event[Any]) -> Changes:
    return dict(
        status=TaskStatus.PENDING,
        lease=None,
        pending_since=data.not_before,
        not_before=data.not_before,
        blocked="waiting_for_retry",
    )


@_apply.register
def _redriven(data: TaskRedriven, state: TaskState, event: Event[Any]) -> Changes:
    changes: Changes = dict(
        status=TaskStatus.PENDING,
        lease=None,
        finished_at=None,
        pending_since=event.occurred_at,
        blocked=None,
        not_before=None,
        attempts_base=state.attempt,
    )
    if data.workflow_redrive is not None:
        changes["workflow_redrive"] = data.workflow_redrive
    return changes


@_apply.register
def _expired(data: LeaseExpired, state: TaskState, event: Event[Any]) -> Changes:
    return _back_to_pending(state, event)


@_apply.register
def _released(data: LeaseReleased, state: TaskState, event: Event[Any]) -> Changes:
    return _back_to_pending(state, event)


def _finish(state: TaskState, status: TaskStatus, event: Event[Any]) -> Changes:
    started = getattr(event.data, "started_at", None) or state.started_at
    return dict(status=status, lease=None, finished_at=event.occurred_at, started_at=started)


@_apply.register
def _completed(data: TaskCompleted, state: TaskState, event: Event[Any]) -> Changes:
    return _finish(state, TaskStatus.COMPLETED, event)


@_apply.register
def _failed(data: TaskFailed, state: TaskState, event: Event[Any]) -> Changes:
    return _finish(state, TaskStatus.FAILED, event)


@_apply.register
def _timed_out(data: TaskTimedOut, state: TaskState, event: Event[Any]) -> Changes:
    return _finish(state, TaskStatus.TIMED_OUT, event)


@_apply.register
def _cancelled(data: TaskCancelled, state: TaskState, event: Event[Any]) -> Changes:
    return _finish(state, TaskStatus.CANCELLED, event)


@_apply.register
def _skipped(data: TaskSkipped, state: TaskState, event: Event[Any]) -> Changes:
    return _finish(state, TaskStatus.SKIPPED, event)


@_apply.register
def _archived(data: TaskArchived, state: TaskState, event: Event[Any]) -> Changes:
    return dict(archived=True)


def evolve(state: TaskState | None, event: Event[Any]) -> TaskState:
    """Fold one event into the task's state."""
    data = event.data
    if isinstance(data, TaskSubmitted):
        return TaskState(
            task_id=event.aggregate_id,
            status=TaskStatus.PENDING,
            name=data.name,
            priority=data.priority,
            resources=data.resources,
            executor_kind=data.executor.kind,
            submitted_at=event.occurred_at,
            last_activity_at=event.occurred_at,
            inactivity_timeout=data.inactivity_timeout,
            max_attempts=data.max_attempts,
            options=data.options(),
            pending_since=event.occurred_at,
            workflow_id=data.workflow_id,
            node=data.node,
            depends_on=tuple(data.depends_on),
        )
    if state is None:
        raise InternalError(f"{event.type} before TaskSubmitted for {event.aggregate_id}")
    return replace(state, version=state.version + 1, **_apply(data, state, event))


# -- decide ---------------------------------------------------------------------------------------


def _require(state: TaskState | None, task_id: str) -> TaskState:
    if state is None or state.archived:
        raise NotFoundError(f"task {task_id} not found", details={"task_id": task_id})
    return state


def live_lease(state: TaskState | None, report: _LeaseReport, now: datetime) -> Lease:
    """The lease a report names, if it is the live one; else ``stale_lease``."""
    task = _require(state, report.task_id)
    lease = task.lease
    details = {
        "task_id": report.task_id,
        "lease_id": report.lease_id,
        "fencing_token": report.fencing_token,
        "status": task.status.value,
    }
    if (
        lease is None
        or lease.lease_id != report.lease_id
        or lease.fencing_token != report.fencing_token
    ):
        live = f"live token {lease.fencing_token}" if lease else "no live lease"
        raise StaleLeaseError(
            f"lease {report.lease_id} (token {report.fencing_token}) is not the live lease of task "
            f"{report.task_id} ({task.status.value}, {live})",
            details=details,
        )
    if now >= lease.expires_at:
        raise StaleLeaseError(
            f"lease {report.lease_id} of task {report.task_id} expired at "
            f"{lease.expires_at.isoformat()}",
            details={**details, "expires_at": lease.expires_at.isoformat()},
        )
    return lease


def _status(state: TaskState, **extra: Any) -> dict[str, Any]:
    return {"task_id": state.task_id, "status": state.status.value, **extra}


def _unreported_start(
    state: TaskState, started_at: datetime | None, now: datetime
) -> datetime | None:
    """The start time a finish must carry, if no TaskStarted was recorded."""
    if state.status != TaskStatus.LEASED:
        return None
    return started_at or now


@functools.singledispatch
def _decide(command: Command, state: TaskState | None, ctx: DecideContext) -> Decision:
    raise InternalError(f"task aggregate has no handler for {type(command).__name__}")


def _submitted(command: SubmitTask | SpawnAgent, executor: Any) -> TaskSubmitted:
    return TaskSubmitted(
        name=command.name,
        executor=executor,
        priority=command.priority,
        resources=command.resources,
        labels=command.labels,
        idempotency_key=command.idempotency_key,
        inactivity_timeout=command.inactivity_timeout,
        max_attempts=command.max_attempts,
        **command.options().model_dump(exclude_defaults=True),
        **(
            {
                "workflow_id": command.workflow_id,
                "node": command.node,
                "depends_on": command.depends_on,
            }
            if isinstance(command, SubmitWorkflowTask)
            else {}
        ),
    )


@_decide.register
def _submit(command: SubmitTask, state: TaskState | None, ctx: DecideContext) -> Decision:
    if state is not None:
        raise ConflictError(
            f"task {ctx.aggregate_id} already exists", details={"task_id": ctx.aggregate_id}
        )
    event = _submitted(command, command.executor)
    return Decision([event], {"task_id": ctx.aggregate_id, "status": TaskStatus.PENDING.value})


@_decide.register
def _spawn(command: SpawnAgent, state: TaskState | None, ctx: DecideContext) -> Decision:
    if state is not None:
        raise ConflictError(
            f"agent {ctx.aggregate_id} already exists", details={"agent_id": ctx.aggregate_id}
        )
    executor = AgentSpec(
        prompt=command.prompt,
        files=command.files,
        delegates=command.delegates,
        template=command.template,
    )
    result = {"agent_id": ctx.aggregate_id, "task_id": ctx.aggregate_id, "status": "pending"}
    return Decision([_submitted(command, executor)], result)


@_decide.register
def _cancel(command: CancelTask, state: TaskState | None, ctx: DecideContext) -> Decision:
    task = _require(state, command.task_id)
    if task.status == TaskStatus.CANCELLED:
        return Decision([], _status(task, changed=False))
    if task.terminal:
        raise ConflictError(
            f"task {task.task_id} is {task.status.value} and cannot be cancelled",
            details={"task_id": task.task_id, "status": task.status.value},
        )
    event = TaskCancelled(
        reason=command.reason,
        previous_status=task.status.value,
        lease_id=task.lease.lease_id if task.lease else None,
    )
    return Decision([event], {"task_id": task.task_id, "status": "cancelled", "changed": True})


@_decide.register
def _start(command: StartTask, state: TaskState | None, ctx: DecideContext) -> Decision:
    lease = live_lease(state, command, ctx.now)
    assert state is not None
    if state.status == TaskStatus.RUNNING:
        return Decision([], _status(state, changed=False))
    event = TaskStarted(lease_id=lease.lease_id, started_at=ctx.now, pid=command.pid)
    return Decision([event], {"task_id": state.task_id, "status": "running", "changed": True})


@_decide.register
def _heartbeat(command: Heartbeat, state: TaskState | None, ctx: DecideContext) -> Decision:
    lease = live_lease(state, command, ctx.now)
    assert state is not None
    expires_at = ctx.now + timedelta(seconds=lease.ttl)
    event = LeaseRenewed(
        lease_id=lease.lease_id,
        expires_at=expires_at,
        activity=command.activity,
        usage=command.usage,
    )
    return Decision([event], _status(state, expires_at=expires_at.isoformat()))


@_decide.register
def _progress(command: ReportProgress, state: TaskState | None, ctx: DecideContext) -> Decision:
    lease = live_lease(state, command, ctx.now)
    assert state is not None
    event = TaskProgressed(
        lease_id=lease.lease_id,
        progress=command.progress,
        message=command.message,
        state=command.state,
    )
    return Decision([event], _status(state))


@_decide.register
def _complete(command: CompleteTask, state: TaskState | None, ctx: DecideContext) -> Decision:
    lease = live_lease(state, command, ctx.now)
    assert state is not None
    event = TaskCompleted(
        lease_id=lease.lease_id,
        result=command.result,
        usage=command.usage,
        started_at=_unreported_start(state, command.started_at, ctx.now),
    )
    return Decision([event], {"task_id": state.task_id, "status": "completed"})


def jitter_unit(task_id: str, attempt: int) -> float:
    """A fixed pseudo-random number in [0, 1) per attempt: jitter that replays identically."""
    digest = hashlib.sha256(f"{task_id}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def retry_delay(state: TaskState, error: ErrorInfo) -> float | None:
    """Seconds until the next attempt if the retry policy allows one after ``error``."""
    retry: RetryPolicy | None = state.options.retry
    if retry is None or error.type in retry.non_retryable:
        return None
    if state.attempts_used >= retry.max_attempts:
        return None
    return retry.delay(state.attempts_used, jitter_unit(state.task_id, state.attempt))


def _schedule_retry(
    state: TaskState, lease_id: str | None, error: ErrorInfo, delay: float, ctx: DecideContext,
    usage: Usage | None = None,
) -> Decision:  # fmt: skip
    not_before = ctx.now + timedelta(seconds=delay)
    event = RetryScheduled(
        lease_id=lease_id,
        attempt=state.attempt,
        error=error,
        delay=round(delay, 6),
        not_before=not_before,
        usage=usage,
    )
    return Decision(
        [event],
        {"task_id": state.task_id, "status": "pending", "retry_at": not_before.isoformat()},
    )


@_decide.register
def _fail(command: FailTask, state: TaskState | None, ctx: DecideContext) -> Decision:
    lease = live_lease(state, command, ctx.now)
    assert state is not None
    delay = retry_delay(state, command.error)
    if delay is not None:
        return _schedule_retry(state, lease.lease_id, command.error, delay, ctx, command.usage)
    event = TaskFailed(
        lease_id=lease.lease_id,
        error=command.error,
        usage=command.usage,
        started_at=_unreported_start(state, command.started_at, ctx.now),
    )
    return Decision([event], {"task_id": state.task_id, "status": "failed"})


def _lose_lease(state: TaskState, lease: Lease, event: EventData) -> Decision:
    """A lease ended without a result: offered again, or failed after the last attempt."""
    events: list[EventData] = [event]
    if state.attempts_used >= state.attempt_limit:
        reason = getattr(event, "reason", "lease lost")
        events.append(
            TaskFailed(
                lease_id=None,
                error=ErrorInfo(
                    type="AttemptsExhausted",
                    message=f"{state.attempts_used} of {state.attempt_limit} attempts lost their "
                    f"lease (last: {reason})",
                ),
            )
        )
        return Decision(events, {"task_id": state.task_id, "status": "failed"})
    return Decision(events, {"task_id": state.task_id, "status": "pending"})


@_decide.register
def _release(command: ReleaseTask, state: TaskState | None, ctx: DecideContext) -> Decision:
    lease = live_lease(state, command, ctx.now)
    assert state is not None
    event = LeaseReleased(lease_id=lease.lease_id, attempt=lease.attempt, reason=command.reason)
    return _lose_lease(state, lease, event)


@_decide.register
def _archive(command: ArchiveTask, state: TaskState | None, ctx: DecideContext) -> Decision:
    task = _require(state, command.task_id)
    if not task.terminal:
        raise ConflictError(
            f"task {task.task_id} is {task.status.value}; only finished tasks are archived",
            details={"task_id": task.task_id, "status": task.status.value},
        )
    event = TaskArchived(reason=command.reason, status=task.status.value)
    return Decision(
        [event], {"task_id": task.task_id, "status": task.status.value, "archived": True}
    )


@_decide.register
def _grant(command: GrantLease, state: TaskState | None, ctx: DecideContext) -> Decision:
    task = _require(state, command.task_id)
    if task.status != TaskStatus.PENDING:
        raise ConflictError(f"task {task.task_id} is {task.status.value}, not pending")
    attempt = task.attempt + 1
    event = LeaseGranted(
        lease_id=command.lease_id,
        worker_id=command.worker_id,
        attempt=attempt,
        fencing_token=attempt,
        expires_at=ctx.now + timedelta(seconds=command.ttl),
        ttl=command.ttl,
        epoch=command.epoch,
        worker_tenant=command.worker_tenant,
    )
    result = {
        "task_id": task.task_id,
        "fencing_token": attempt,
        "expires_at": event.expires_at.isoformat(),
    }
    return Decision([event], result)


@_decide.register
def _expire(command: ExpireLease, state: TaskState | None, ctx: DecideContext) -> Decision:
    task = _require(state, command.task_id)
    lease = task.lease
    if lease is None or lease.lease_id != command.lease_id:
        return Decision([], _status(task, changed=False))  # already ended some other way
    if command.reason == "not renewed" and ctx.now < lease.expires_at:
        return Decision([], _status(task, changed=False))  # renewed in the meantime
    event = LeaseExpired(lease_id=lease.lease_id, attempt=lease.attempt, reason=command.reason)
    return _lose_lease(task, lease, event)


@_decide.register
def _redrive(command: RedriveTask, state: TaskState | None, ctx: DecideContext) -> Decision:
    task = _require(state, command.task_id)
    if task.status not in (TaskStatus.FAILED, TaskStatus.TIMED_OUT):
        raise ConflictError(
            f"task {task.task_id} is {task.status.value}; only failed or timed-out tasks are "
            "redriven",
            details={"task_id": task.task_id, "status": task.status.value},
        )
    if task.workflow_id is not None:
        raise ConflictError(
            f"task {task.task_id} belongs to workflow {task.workflow_id}: its dependents and the "
            "workflow's outcome would not follow a redrive of one task; redrive the workflow "
            f"(pantheon workflow redrive {task.workflow_id})",
            details={"task_id": task.task_id, "workflow_id": task.workflow_id},
        )
    event = TaskRedriven(previous_status=task.status.value, reason=command.reason)
    return Decision([event], {"task_id": task.task_id, "status": "pending", "changed": True})


#: What a workflow's redrive brings back: every way a node can end but completed.
NODE_REDRIVABLE = frozenset(
    {TaskStatus.FAILED, TaskStatus.TIMED_OUT, TaskStatus.CANCELLED, TaskStatus.SKIPPED}
)


@_decide.register
def _redrive_node(
    command: RedriveWorkflowTask, state: TaskState | None, ctx: DecideContext
) -> Decision:
    if state is None:
        raise NotFoundError(
            f"task {command.task_id} not found", details={"task_id": command.task_id}
        )
    if state.archived:  # cleaned up meanwhile: it stays as it ended
        return Decision([], _status(state, changed=False, archived=True))
    if state.workflow_id != command.workflow_id:
        raise ConflictError(
            f"task {state.task_id} is not a task of workflow {command.workflow_id}",
            details={"task_id": state.task_id, "workflow_id": command.workflow_id},
        )
    if state.workflow_redrive >= command.redrive or state.status not in NODE_REDRIVABLE:
        return Decision([], _status(state, changed=False))  # brought back already
    event = TaskRedriven(
        previous_status=state.status.value,
        reason=command.reason,
        workflow_redrive=command.redrive,
        waiting_for=list(command.waiting_for) or None,
    )
    return Decision([event], {"task_id": state.task_id, "status": "pending", "changed": True})


@_decide.register
def _skip(command: SkipTask, state: TaskState | None, ctx: DecideContext) -> Decision:
    task = _require(state, command.task_id)
    if task.status != TaskStatus.PENDING:
        return Decision([], _status(task, changed=False))
    event = TaskSkipped(dependency=command.dependency, reason=command.reason)
    return Decision([event], {"task_id": task.task_id, "status": "skipped"})


@_decide.register
def _block(command: BlockTask, state: TaskState | None, ctx: DecideContext) -> Decision:
    task = _require(state, command.task_id)
    if task.status != TaskStatus.PENDING or task.blocked == command.reason:
        return Decision([], _status(task, changed=False))
    event = TaskBlocked(reason=command.reason, details=command.details)
    return Decision([event], _status(task, changed=True))


def _timeout_decision(task: TaskState, command: TimeOutTask, last_activity: datetime) -> Decision:
    event = TaskTimedOut(
        lease_id=task.lease.lease_id if task.lease else None,
        timeout=command.timeout,
        last_activity_at=last_activity,
        kind=command.kind,
    )
    return Decision([event], {"task_id": task.task_id, "status": "timed_out"})


@_decide.register
def _time_out(command: TimeOutTask, state: TaskState | None, ctx: DecideContext) -> Decision:
    task = _require(state, command.task_id)
    unchanged = Decision([], _status(task, changed=False))
    if command.kind == "schedule_to_start":
        since = task.pending_since or task.submitted_at
        if task.status != TaskStatus.PENDING or ctx.now < since + timedelta(
            seconds=command.timeout
        ):
            return unchanged
        return _timeout_decision(task, command, task.last_activity_at)
    if command.kind == "start_to_close":
        lease = task.lease
        if lease is None or lease.lease_id != command.lease_id:
            return unchanged
        # measured from the grant: the lease's expiry minus its ttl is when it was last
        # renewed, so use the start (or the grant time if it never reported one)
        began = task.started_at if task.status == TaskStatus.RUNNING else None
        if began is None or ctx.now < began + timedelta(seconds=command.timeout):
            return unchanged
        error = ErrorInfo(
            type="StartToCloseTimeout",
            message=f"attempt {task.attempt} ran longer than {command.timeout:g} s",
        )
        delay = retry_delay(task, error)
        if delay is not None:
            return _schedule_retry(task, lease.lease_id, error, delay, ctx)
        return _timeout_decision(task, command, task.last_activity_at)
    last_activity = max(task.last_activity_at, command.last_activity_at or task.last_activity_at)
    idle_until = last_activity + timedelta(seconds=command.timeout)
    if task.status not in (TaskStatus.LEASED, TaskStatus.RUNNING) or ctx.now < idle_until:
        return unchanged
    return _timeout_decision(task, command, last_activity)


def decide(state: TaskState | None, command: Command, ctx: DecideContext) -> Decision:
    """Decide what a task command does, given the task's current state."""
    return _decide(command, state, ctx)


TASK: AggregateType[TaskState] = register(AggregateType(name="task", evolve=evolve, decide=decide))
