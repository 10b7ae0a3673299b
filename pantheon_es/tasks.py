"""The task aggregate: its commands, events, state and pure decide/evolve.

A task is submitted (``pending``) and may be cancelled (``cancelled``).
Leasing, running and finishing arrive with the worker and scheduler.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import Field, StringConstraints

from pantheon_es.commands import Command
from pantheon_es.domain import AggregateType, DecideContext, Decision, register
from pantheon_es.errors import ConflictError, InternalError, NotFoundError
from pantheon_es.events import Event, EventData
from pantheon_es.specs import ExecutorSpec, Labels, Priority, Resources


class TaskStatus(StrEnum):
    PENDING = "pending"
    CANCELLED = "cancelled"


TERMINAL = frozenset({TaskStatus.CANCELLED})

TaskId = Annotated[
    str, StringConstraints(min_length=26, max_length=26, pattern=r"^[0-9A-HJKMNP-TV-Z]{26}$")
]
TaskName = Annotated[str, StringConstraints(min_length=1, max_length=200)]
Reason = Annotated[str, StringConstraints(max_length=2000)]


# -- commands ------------------------------------------------------------------------


class SubmitTask(Command, aggregate="task", verb="submit"):
    """Submit a task to run; it starts ``pending``."""

    creates = True

    name: TaskName
    executor: ExecutorSpec
    priority: Priority = Field("medium", validate_default=True)
    resources: Resources = Field(default_factory=Resources)
    labels: Labels = Field(default_factory=dict)

    def target_id(self) -> str | None:
        return None


class CancelTask(Command, aggregate="task", verb="cancel"):
    """Cancel a task that has not finished. Cancelling a cancelled task is a no-op."""

    task_id: TaskId
    reason: Reason | None = None

    def target_id(self) -> str | None:
        return self.task_id


# -- events ------------------------------------------------------------------------------


class TaskSubmitted(EventData, type_name="TaskSubmitted", version=1, aggregate="task"):
    name: str
    executor: ExecutorSpec
    priority: int
    resources: Resources
    labels: dict[str, str]
    idempotency_key: str | None = None


class TaskCancelled(EventData, type_name="TaskCancelled", version=1, aggregate="task"):
    reason: str | None = None
    previous_status: str


# -- state ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TaskState:
    task_id: str
    status: TaskStatus
    name: str
    priority: int
    submitted_at: datetime
    version: int = 1

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


@functools.singledispatch
def _apply(data: EventData, state: TaskState | None, event: Event[Any]) -> TaskState:
    raise InternalError(f"task aggregate cannot apply {event.type}")


@_apply.register
def _submitted(data: TaskSubmitted, state: TaskState | None, event: Event[Any]) -> TaskState:
    return TaskState(
        task_id=event.aggregate_id,
        status=TaskStatus.PENDING,
        name=data.name,
        priority=data.priority,
        submitted_at=event.occurred_at,
    )


@_apply.register
def _cancelled(data: TaskCancelled, state: TaskState | None, event: Event[Any]) -> TaskState:
    if state is None:
        raise InternalError(f"TaskCancelled before TaskSubmitted for {event.aggregate_id}")
    return replace(state, status=TaskStatus.CANCELLED, version=state.version + 1)


def evolve(state: TaskState | None, event: Event[Any]) -> TaskState:
    """Fold one event into the task's state."""
    return _apply(event.data, state, event)


# -- decide --------------------------------------------------------------------------------------


@functools.singledispatch
def _decide(command: Command, state: TaskState | None, ctx: DecideContext) -> Decision:
    raise InternalError(f"task aggregate has no handler for {type(command).__name__}")


@_decide.register
def _submit(command: SubmitTask, state: TaskState | None, ctx: DecideContext) -> Decision:
    if state is not None:  # ids are fresh per submit; a hit means an id collision
        raise ConflictError(f"task {ctx.aggregate_id} already exists")
    event = TaskSubmitted(
        name=command.name,
        executor=command.executor,
        priority=command.priority,
        resources=command.resources,
        labels=command.labels,
        idempotency_key=command.idempotency_key,
    )
    return Decision([event], {"task_id": ctx.aggregate_id, "status": TaskStatus.PENDING.value})


@_decide.register
def _cancel(command: CancelTask, state: TaskState | None, ctx: DecideContext) -> Decision:
    if state is None:
        raise NotFoundError(
            f"task {command.task_id} not found", details={"task_id": command.task_id}
        )
    if state.status == TaskStatus.CANCELLED:
        return Decision(
            [], {"task_id": state.task_id, "status": state.status.value, "changed": False}
        )
    if state.terminal:
        raise ConflictError(
            f"task {state.task_id} is {state.status.value} and cannot be cancelled",
            details={"task_id": state.task_id, "status": state.status.value},
        )
    event = TaskCancelled(reason=command.reason, previous_status=state.status.value)
    return Decision(
        [event], {"task_id": state.task_id, "status": TaskStatus.CANCELLED.value, "changed": True}
    )


def decide(state: TaskState | None, command: Command, ctx: DecideContext) -> Decision:
    """Decide what a task command does, given the task's current state."""
    return _decide(command, state, ctx)


TASK: AggregateType[TaskState] = register(AggregateType(name="task", evolve=evolve, decide=decide))
