"""The workflow aggregate: a DAG of named tasks, its failure policy and its end.

``CreateWorkflow`` is validated whole before anything is appended: node names
unique, every dependency known, no cycle (the error names the cycle). It
appends ``WorkflowCreated`` with every node's spec and the task id chosen for
it. The scheduler then creates the tasks (``SubmitTask`` with the chosen id, so
doing it twice is harmless) and appends ``WorkflowStarted``; it holds each
task until its dependencies completed, hands their results to it, skips the
dependents of a failure (policy ``continue``) or cancels the rest
(``fail_fast``), and finishes the workflow when every node is terminal::

    created --WorkflowStarted--> running --WorkflowFinished--> completed | failed | cancelled
                         \\--WorkflowCancelRequested--> (cancelling) --WorkflowFinished--> cancelled
    failed | cancelled --WorkflowRedriven--> running

``RedriveWorkflow`` runs the nodes that did not complete again (``WorkflowFinished``
names them): the scheduler appends ``TaskRedriven`` on each, and each waits for its
dependencies as on a first run; completed nodes keep their results.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints

from pantheon_es.commands import Command
from pantheon_es.domain import AggregateType, DecideContext, Decision, register
from pantheon_es.errors import ConflictError, InternalError, InvalidError, NotFoundError
from pantheon_es.events import Event, EventData
from pantheon_es.specs import (
    ExecutorSpec,
    Frozen,
    Labels,
    Priority,
    Resources,
    SchedulingOptions,
    Seconds,
)
from pantheon_es.tasks import DEFAULT_MAX_ATTEMPTS, TaskId

NodeName = Annotated[
    str, StringConstraints(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
]
FailurePolicy = Literal["fail_fast", "continue"]
#: The reason of the TaskCancelled that stops a fail_fast workflow's other tasks
#: (tools/whatif.py tells these cancellations apart by it).
FAIL_FAST_REASON = "fail_fast: another task of the workflow did not complete"
MAX_NODES = 5000


class WorkflowNode(SchedulingOptions):
    """One task of a workflow, by name, with the names of the nodes it depends on."""

    name: NodeName
    executor: ExecutorSpec
    depends_on: list[NodeName] = Field(default_factory=list, max_length=MAX_NODES)
    priority: Priority = Field("medium", validate_default=True)
    resources: Resources = Field(default_factory=Resources)
    labels: Labels = Field(default_factory=dict)
    inactivity_timeout: Seconds | None = None
    max_attempts: int = Field(DEFAULT_MAX_ATTEMPTS, ge=1, le=100)


class CreateWorkflow(Command, aggregate="workflow", verb="create"):
    """Create a workflow (a DAG of tasks) and start it."""

    creates = True

    name: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    tasks: list[WorkflowNode] = Field(min_length=1, max_length=MAX_NODES)
    failure_policy: FailurePolicy = "fail_fast"
    labels: Labels = Field(default_factory=dict)
    workflow_id: TaskId | None = Field(None, description="Choose the id (a ULID) yourself.")

    def target_id(self) -> str | None:
        return self.workflow_id


class CancelWorkflow(Command, aggregate="workflow", verb="cancel"):
    """Cancel a workflow: pending tasks are cancelled, running ones stopped on their worker."""

    workflow_id: TaskId
    reason: Annotated[str, StringConstraints(max_length=2000)] | None = None

    def target_id(self) -> str | None:
        return self.workflow_id


class RedriveWorkflow(Command, aggregate="workflow", verb="redrive"):
    """Run a failed or cancelled workflow's nodes that did not complete again.

    Completed nodes keep their results and do not run again; the others (failed,
    timed out, skipped, cancelled) start pending and wait for their dependencies
    as on a first run. The workflow is running again until every node is terminal.
    """

    workflow_id: TaskId
    reason: Annotated[str, StringConstraints(max_length=2000)] = "redriven"

    def target_id(self) -> str | None:
        return self.workflow_id


class StartWorkflow(Command, aggregate="workflow"):
    """Internal: every task of the workflow exists."""

    workflow_id: str

    def target_id(self) -> str | None:
        return self.workflow_id


class FinishWorkflow(Command, aggregate="workflow"):
    """Internal: every node is terminal; ``counts`` by task status, and the task ids of
    the nodes that did not complete (what a redrive runs again), in node order."""

    workflow_id: str
    counts: dict[str, int]
    not_completed: list[str] = Field(default_factory=list)

    def target_id(self) -> str | None:
        return self.workflow_id


# -- events ---------------------------------------------------------------------------------------


class NodeSpec(Frozen):
    """A node as recorded: its spec, its task id and its dependencies' task ids."""

    name: str
    task_id: str
    depends_on: list[str]  # task ids
    spec: dict[str, Any]  # the WorkflowNode fields but name and depends_on (JSON)


class WorkflowCreated(EventData, type_name="WorkflowCreated", version=1, aggregate="workflow"):
    name: str
    failure_policy: str
    labels: dict[str, str]
    nodes: list[NodeSpec]
    idempotency_key: str | None = None


class WorkflowStarted(EventData, type_name="WorkflowStarted", version=1, aggregate="workflow"):
    tasks: int


class WorkflowCancelRequested(
    EventData, type_name="WorkflowCancelRequested", version=1, aggregate="workflow"
):
    reason: str | None = None


class WorkflowFinished(EventData, type_name="WorkflowFinished", version=1, aggregate="workflow"):
    status: str  # completed | failed | cancelled
    counts: dict[str, int]
    #: task ids of the nodes that did not complete, in node order (None: recorded
    #: before redrives existed)
    not_completed: list[str] | None = None


class WorkflowRedriven(EventData, type_name="WorkflowRedriven", version=1, aggregate="workflow"):
    """A failed or cancelled workflow runs again: ``tasks`` (ids) are the nodes that
    did not complete; the scheduler appends ``TaskRedriven`` on each."""

    reason: str
    redrive: int  # 1 for the workflow's first redrive, 2 for the next, ...
    previous_status: str
    tasks: list[str]


# -- state -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkflowState:
    workflow_id: str
    name: str
    status: str  # created | running | completed | failed | cancelled
    failure_policy: str
    nodes: tuple[NodeSpec, ...]
    created_at: datetime
    cancel_requested: bool = False
    finished_at: datetime | None = None
    redrives: int = 0
    #: after WorkflowFinished: the task ids of the nodes that did not complete
    not_completed: tuple[str, ...] | None = None

    @property
    def finished(self) -> bool:
        return self.finished_at is not None


@functools.singledispatch
def _apply(data: EventData, state: WorkflowState, event: Event[Any]) -> WorkflowState:
    raise InternalError(f"workflow aggregate cannot apply {event.type}")


@_apply.register
def _started(data: WorkflowStarted, state: WorkflowState, event: Event[Any]) -> WorkflowState:
    return replace(state, status="running" if state.status == "created" else state.status)


@_apply.register
def _cancel_requested(
    data: WorkflowCancelRequested, state: WorkflowState, event: Event[Any]
) -> WorkflowState:
    return replace(state, cancel_requested=True)


@_apply.register
def _finished(data: WorkflowFinished, state: WorkflowState, event: Event[Any]) -> WorkflowState:
    not_completed = tuple(data.not_completed) if data.not_completed is not None else None
    return replace(
        state, status=data.status, finished_at=event.occurred_at, not_completed=not_completed
    )


@_apply.register
def _redriven(data: WorkflowRedriven, state: WorkflowState, event: Event[Any]) -> WorkflowState:
    return replace(
        state,
        status="running",
        finished_at=None,
        cancel_requested=False,
        redrives=data.redrive,
        not_completed=None,
    )


def evolve(state: WorkflowState | None, event: Event[Any]) -> WorkflowState:
    data = event.data
    if isinstance(data, WorkflowCreated):
        return WorkflowState(
            workflow_id=event.aggregate_id,
            name=data.name,
            status="created",
            failure_policy=data.failure_policy,
            nodes=tuple(data.nodes),
            created_at=event.occurred_at,
        )
    if state is None:
        raise InternalError(f"{event.type} before WorkflowCreated for {event.aggregate_id}")
    return _apply(data, state, event)


# -- validation and decide ----------------------------------------------------------------------


def find_cycle(deps: dict[str, list[str]]) -> list[str] | None:
    """A dependency cycle as ``[a, b, ..., a]``, or ``None`` (iterative DFS, any size)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for root in deps:
        if state.get(root):
            continue
        path: list[str] = []
        stack: list[tuple[str, int]] = [(root, 0)]
        while stack:
            node, i = stack.pop()
            if i == 0:
                state[node] = 1
                path.append(node)
            children = deps.get(node, [])
            if i < len(children):
                stack.append((node, i + 1))
                child = children[i]
                mark = state.get(child)
                if mark == 1:
                    return [*path[path.index(child) :], child]
                if not mark:
                    stack.append((child, 0))
            else:
                state[node] = 2
                path.pop()
    return None


def validate_graph(nodes: list[WorkflowNode]) -> None:
    """Unique names, known dependencies, no cycle; else ``invalid`` naming the culprit."""
    names: set[str] = set()
    for node in nodes:
        if node.name in names:
            raise InvalidError(
                f"task name {node.name!r} is used twice", details={"duplicate": node.name}
            )
        names.add(node.name)
    for node in nodes:
        for dep in node.depends_on:
            if dep not in names:
                raise InvalidError(
                    f"task {node.name!r} depends on {dep!r}, which is not in the workflow",
                    details={"task": node.name, "unknown_dependency": dep},
                )
            if dep == node.name:
                raise InvalidError(
                    f"task {node.name!r} depends on itself", details={"cycle": [dep, dep]}
                )
    cycle = find_cycle({n.name: list(n.depends_on) for n in nodes})
    if cycle is not None:
        raise InvalidError(
            f"the dependencies form a cycle: {' -> '.join(cycle)}", details={"cycle": cycle}
        )


@functools.singledispatch
def _decide(command: Command, state: WorkflowState | None, ctx: DecideContext) -> Decision:
    raise InternalError(f"workflow aggregate has no handler for {type(command).__name__}")


def _require(state: WorkflowState | None, workflow_id: str) -> WorkflowState:
    if state is None:
        raise NotFoundError(
            f"workflow {workflow_id} not found", details={"workflow_id": workflow_id}
        )
    return state


@_decide.register
def _create(command: CreateWorkflow, state: WorkflowState | None, ctx: DecideContext) -> Decision:
    if state is not None:
        raise ConflictError(f"workflow {ctx.aggregate_id} already exists")
    validate_graph(command.tasks)
    task_ids = {node.name: ctx.new_id() for node in command.tasks}
    nodes = [
        NodeSpec(
            name=node.name,
            task_id=task_ids[node.name],
            depends_on=[task_ids[d] for d in node.depends_on],
            spec=node.model_dump(mode="json", exclude={"name", "depends_on"}, exclude_defaults=True)
            | {"executor": node.executor.model_dump(mode="json")},
        )
        for node in command.tasks
    ]
    event = WorkflowCreated(
        name=command.name,
        failure_policy=command.failure_policy,
        labels=command.labels,
        nodes=nodes,
        idempotency_key=command.idempotency_key,
    )
    result = {
        "workflow_id": ctx.aggregate_id,
        "status": "created",
        "tasks": {n.name: n.task_id for n in nodes},
    }
    return Decision([event], result)


@_decide.register
def _cancel(command: CancelWorkflow, state: WorkflowState | None, ctx: DecideContext) -> Decision:
    wf = _require(state, command.workflow_id)
    if wf.finished or wf.cancel_requested:
        return Decision([], {"workflow_id": wf.workflow_id, "status": wf.status, "changed": False})
    event = WorkflowCancelRequested(reason=command.reason)
    return Decision(
        [event], {"workflow_id": wf.workflow_id, "status": "cancelling", "changed": True}
    )


@_decide.register
def _start(command: StartWorkflow, state: WorkflowState | None, ctx: DecideContext) -> Decision:
    wf = _require(state, command.workflow_id)
    if wf.status != "created":
        return Decision([], {"workflow_id": wf.workflow_id, "status": wf.status})
    return Decision([WorkflowStarted(tasks=len(wf.nodes))], {"workflow_id": wf.workflow_id})


@_decide.register
def _finish(command: FinishWorkflow, state: WorkflowState | None, ctx: DecideContext) -> Decision:
    wf = _require(state, command.workflow_id)
    if wf.finished:
        return Decision([], {"workflow_id": wf.workflow_id, "status": wf.status})
    counts = command.counts
    if wf.cancel_requested:
        status = "cancelled"
    elif counts.get("completed", 0) == len(wf.nodes):
        status = "completed"
    else:
        status = "failed"
    event = WorkflowFinished(status=status, counts=counts, not_completed=command.not_completed)
    return Decision([event], {"workflow_id": wf.workflow_id, "status": status})


#: A finished workflow in one of these is redriven (docs/decisions.md, "Redriving a workflow").
REDRIVABLE = frozenset({"failed", "cancelled"})


@_decide.register
def _redrive(command: RedriveWorkflow, state: WorkflowState | None, ctx: DecideContext) -> Decision:
    wf = _require(state, command.workflow_id)
    status = "cancelling" if wf.cancel_requested and not wf.finished else wf.status
    details = {"workflow_id": wf.workflow_id, "status": status}
    if not wf.finished:
        raise ConflictError(
            f"workflow {wf.workflow_id} is {status}; only a finished workflow that failed or "
            "was cancelled is redriven",
            details=details,
        )
    if wf.status not in REDRIVABLE:
        raise ConflictError(
            f"workflow {wf.workflow_id} is {wf.status}; only a workflow that failed or was "
            "cancelled is redriven",
            details=details,
        )
    if wf.not_completed is None:
        raise ConflictError(
            f"workflow {wf.workflow_id} finished before finished workflows recorded which "
            "tasks did not complete; run it again",
            details=details,
        )
    if not wf.not_completed:
        raise ConflictError(
            f"every task of workflow {wf.workflow_id} completed: nothing to run again",
            details=details,
        )
    event = WorkflowRedriven(
        reason=command.reason,
        redrive=wf.redrives + 1,
        previous_status=wf.status,
        tasks=list(wf.not_completed),
    )
    names = {n.task_id: n.name for n in wf.nodes}
    result = {
        "workflow_id": wf.workflow_id,
        "status": "running",
        "redrive": event.redrive,
        "tasks": {names.get(t, t): t for t in event.tasks},
    }
    return Decision([event], result)


def decide(state: WorkflowState | None, command: Command, ctx: DecideContext) -> Decision:
    return _decide(command, state, ctx)


WORKFLOW: AggregateType[WorkflowState] = register(
    AggregateType(name="workflow", evolve=evolve, decide=decide)
)
