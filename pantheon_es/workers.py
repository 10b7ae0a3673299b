"""The worker aggregate: a process that runs tasks, its capacity and liveness.

A worker registers with its capacity (cpu, memory_mb, gpu, custom resources),
``slots`` (tasks at once) and labels, then renews its registration by
heartbeat. Each process start is a new *incarnation*: registering again with
the same worker id replaces the old incarnation, whose leases the scheduler
expires. A worker whose heartbeats stop is declared lost by the scheduler's
timer (``WorkerLost``), and its leases expire with it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any

from pydantic import Field, StringConstraints

from pantheon_es.commands import Command
from pantheon_es.domain import AggregateType, DecideContext, Decision, register
from pantheon_es.errors import ConflictError, InternalError, NotFoundError
from pantheon_es.events import Event, EventData
from pantheon_es.specs import Frozen, Labels, Token, Usage


class WorkerStatus(StrEnum):
    ACTIVE = "active"
    DRAINING = "draining"
    STOPPED = "stopped"
    LOST = "lost"


GONE = frozenset({WorkerStatus.STOPPED, WorkerStatus.LOST})


class Capacity(Frozen):
    """What a worker offers."""

    cpu: float = Field(ge=0, le=4096)
    memory_mb: int = Field(ge=0)
    gpu: int = Field(0, ge=0)
    custom: dict[Token, Annotated[float, Field(ge=0)]] = Field(default_factory=dict)


Incarnation = Annotated[str, StringConstraints(min_length=1, max_length=64)]


# -- commands ---------------------------------------------------------------------------------


class _WorkerCommand(Command):
    worker_id: Token
    incarnation: Incarnation

    def target_id(self) -> str | None:
        return self.worker_id


class RegisterWorker(_WorkerCommand, aggregate="worker", verb="register"):
    """Register (or re-register) a worker process."""

    capacity: Capacity
    slots: int = Field(16, ge=1, le=100_000, description="Tasks it runs at once.")
    labels: Labels = Field(default_factory=dict)
    hostname: Annotated[str, StringConstraints(max_length=255)] = ""
    pid: int = 0
    version: Annotated[str, StringConstraints(max_length=64)] = ""
    ttl: float = Field(
        15.0, gt=0, le=3600, description="Declared lost this long after its last heartbeat."
    )
    tenants: list[Annotated[str, StringConstraints(pattern=r"^(\*|[A-Za-z0-9_-]{1,128})$")]] = (
        Field(
            default_factory=list,
            max_length=1000,
            description="Other tenants whose tasks it also runs ('*': every tenant); its own "
            "always. Offers come on pantheon.work.<task's tenant>.<worker_id>.",
        )
    )
    offer_batches: bool = Field(
        False,
        description='It takes several offers in one work message ({"type": "offers", '
        '"offers": [...]}); otherwise every offer comes alone.',
    )


class WorkerHeartbeat(_WorkerCommand, aggregate="worker", verb="heartbeat"):
    """The worker is alive; its own resource use and how many tasks it runs."""

    usage: Usage | None = None
    running: int = Field(0, ge=0)


class DrainWorker(_WorkerCommand, aggregate="worker", verb="drain"):
    """Stop offering tasks to this worker (it finishes what it runs)."""


class StopWorker(_WorkerCommand, aggregate="worker", verb="stop"):
    """The worker is shutting down; leases it still holds expire."""


class LoseWorker(_WorkerCommand, aggregate="worker"):
    """Internal: the scheduler's timer saw no heartbeat in time."""


# -- events ---------------------------------------------------------------------------------------


class WorkerRegistered(EventData, type_name="WorkerRegistered", version=1, aggregate="worker"):
    incarnation: str
    capacity: Capacity
    slots: int
    labels: dict[str, str]
    hostname: str
    pid: int
    version: str
    ttl: float
    expires_at: datetime
    tenants: list[str] = Field(default_factory=list)
    offer_batches: bool = False


class WorkerRenewed(EventData, type_name="WorkerRenewed", version=1, aggregate="worker"):
    incarnation: str
    expires_at: datetime
    usage: Usage | None = None
    running: int = 0


class WorkerDraining(EventData, type_name="WorkerDraining", version=1, aggregate="worker"):
    incarnation: str


class WorkerStopped(EventData, type_name="WorkerStopped", version=1, aggregate="worker"):
    incarnation: str


class WorkerLost(EventData, type_name="WorkerLost", version=1, aggregate="worker"):
    incarnation: str
    last_expiry: datetime


# -- state --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerState:
    worker_id: str
    incarnation: str
    status: WorkerStatus
    capacity: Capacity
    slots: int
    labels: dict[str, str]
    ttl: float
    expires_at: datetime
    registered_at: datetime
    tenants: tuple[str, ...] = ()  # others it serves besides its own ("*": all)
    offer_batches: bool = False  # takes {"type": "offers"} messages


@functools.singledispatch
def _apply(data: EventData, state: WorkerState, event: Event[Any]) -> WorkerState:
    raise InternalError(f"worker aggregate cannot apply {event.type}")


@_apply.register
def _renewed(data: WorkerRenewed, state: WorkerState, event: Event[Any]) -> WorkerState:
    return replace(state, expires_at=data.expires_at)


@_apply.register
def _draining(data: WorkerDraining, state: WorkerState, event: Event[Any]) -> WorkerState:
    return replace(state, status=WorkerStatus.DRAINING)


@_apply.register
def _stopped(data: WorkerStopped, state: WorkerState, event: Event[Any]) -> WorkerState:
    return replace(state, status=WorkerStatus.STOPPED)


@_apply.register
def _lost(data: WorkerLost, state: WorkerState, event: Event[Any]) -> WorkerState:
    return replace(state, status=WorkerStatus.LOST)


def evolve(state: WorkerState | None, event: Event[Any]) -> WorkerState:
    data = event.data
    if isinstance(data, WorkerRegistered):
        return WorkerState(
            worker_id=event.aggregate_id,
            incarnation=data.incarnation,
            status=WorkerStatus.ACTIVE,
            capacity=data.capacity,
            slots=data.slots,
            labels=data.labels,
            ttl=data.ttl,
            expires_at=data.expires_at,
            registered_at=event.occurred_at,
            tenants=tuple(data.tenants),
            offer_batches=data.offer_batches,
        )
    if state is None:
        raise InternalError(f"{event.type} before WorkerRegistered for {event.aggregate_id}")
    return _apply(data, state, event)


# -- decide ---------------------------------------------------------------------------------------


def _current(state: WorkerState | None, command: _WorkerCommand) -> WorkerState:
    if state is None:
        raise NotFoundError(
            f"worker {command.worker_id} is not registered",
            details={"worker_id": command.worker_id},
        )
    if state.incarnation != command.incarnation or state.status in GONE:
        raise ConflictError(
            f"worker {command.worker_id} incarnation {command.incarnation} is not the registered, "
            f"live one ({state.status.value}); register again",
            details={
                "worker_id": command.worker_id,
                "status": state.status.value,
                "register": True,
            },
        )
    return state


@functools.singledispatch
def _decide(command: Command, state: WorkerState | None, ctx: DecideContext) -> Decision:
    raise InternalError(f"worker aggregate has no handler for {type(command).__name__}")


@_decide.register
def _register(command: RegisterWorker, state: WorkerState | None, ctx: DecideContext) -> Decision:
    event = WorkerRegistered(
        incarnation=command.incarnation,
        capacity=command.capacity,
        slots=command.slots,
        labels=command.labels,
        hostname=command.hostname,
        pid=command.pid,
        version=command.version,
        ttl=command.ttl,
        expires_at=ctx.now + timedelta(seconds=command.ttl),
        tenants=command.tenants,
        offer_batches=command.offer_batches,
    )
    return Decision([event], {"worker_id": command.worker_id, "status": "active"})


@_decide.register
def _heartbeat(command: WorkerHeartbeat, state: WorkerState | None, ctx: DecideContext) -> Decision:
    worker = _current(state, command)
    expires_at = ctx.now + timedelta(seconds=worker.ttl)
    event = WorkerRenewed(
        incarnation=command.incarnation,
        expires_at=expires_at,
        usage=command.usage,
        running=command.running,
    )
    return Decision([event], {"worker_id": worker.worker_id, "status": worker.status.value})


@_decide.register
def _drain(command: DrainWorker, state: WorkerState | None, ctx: DecideContext) -> Decision:
    worker = _current(state, command)
    if worker.status == WorkerStatus.DRAINING:
        return Decision([], {"worker_id": worker.worker_id, "status": "draining"})
    return Decision(
        [WorkerDraining(incarnation=command.incarnation)],
        {"worker_id": worker.worker_id, "status": "draining"},
    )


@_decide.register
def _stop(command: StopWorker, state: WorkerState | None, ctx: DecideContext) -> Decision:
    worker = _current(state, command)
    return Decision(
        [WorkerStopped(incarnation=command.incarnation)],
        {"worker_id": worker.worker_id, "status": "stopped"},
    )


@_decide.register
def _lose(command: LoseWorker, state: WorkerState | None, ctx: DecideContext) -> Decision:
    if (
        state is None
        or state.incarnation != command.incarnation
        or state.status in GONE
        or ctx.now < state.expires_at
    ):
        return Decision([], {"worker_id": command.worker_id, "changed": False})
    event = WorkerLost(incarnation=command.incarnation, last_expiry=state.expires_at)
    return Decision([event], {"worker_id": command.worker_id, "status": "lost"})


def decide(state: WorkerState | None, command: Command, ctx: DecideContext) -> Decision:
    return _decide(command, state, ctx)


WORKER: AggregateType[WorkerState] = register(
    AggregateType(name="worker", evolve=evolve, decide=decide)
)
