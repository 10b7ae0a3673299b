"""Read model ``workflows``: one row per workflow; its nodes' states come from ``tasks``.

KV ``<tenant>.workflow.<id>``. Queries ``workflow.get`` (the workflow, its
counts by status and every node) and ``workflow.list``. The scheduler rebuilds
the live workflows from this table at start.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

import aiosqlite
import orjson
from pydantic import BaseModel, ConfigDict, Field

from pantheon_es.errors import NotFoundError
from pantheon_es.events import EventRecord
from pantheon_es.tasks import TaskId
from pantheon_es.workflows import (
    WorkflowCancelRequested,
    WorkflowCreated,
    WorkflowFinished,
    WorkflowRedriven,
    WorkflowStarted,
)
from projections.base import Batch, Queries, ReadModel, Row, Table, aggregate_row, handles, paged

MODEL = "workflow"
#: Unfinished workflows, as the partial index ``workflows_live`` says it (see tasks.py).
LIVE_CONDITION = "status IN ('created', 'running', 'cancelling')"

WORKFLOWS = Table(
    name="workflows",
    columns=(
        "id",
        "tenant",
        "name",
        "status",
        "failure_policy",
        "labels",
        "nodes",
        "total",
        "counts",
        "created_at",
        "started_at",
        "cancel_requested_at",
        "cancel_reason",
        "finished_at",
        "actor",
        "correlation_id",
        "redrives",
        "last_redrive",
        "last_seq",
    ),
    key=("tenant", "id"),
    json_columns=frozenset({"labels", "nodes", "counts", "last_redrive"}),
    ddl="""
    CREATE TABLE IF NOT EXISTS workflows (
        id TEXT NOT NULL,
        tenant TEXT NOT NULL,
        name TEXT NOT NULL,
        status TEXT NOT NULL,
        failure_policy TEXT NOT NULL,
        labels TEXT NOT NULL,
        nodes TEXT NOT NULL,
        total INTEGER NOT NULL,
        counts TEXT,
        created_at TEXT NOT NULL,
        started_at TEXT,
        cancel_requested_at TEXT,
        cancel_reason TEXT,
        finished_at TEXT,
        actor TEXT NOT NULL,
        correlation_id TEXT NOT NULL,
        redrives INTEGER NOT NULL,
        last_redrive TEXT,
        last_seq INTEGER NOT NULL,
        PRIMARY KEY (tenant, id)
    ) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS workflows_tenant_status ON workflows (tenant, status, id);
    CREATE INDEX IF NOT EXISTS workflows_live ON workflows (id)
        WHERE status IN ('created', 'running', 'cancelling');
    """,
)


class WorkflowsModel(ReadModel):
    name = "workflows"
    tables = (WORKFLOWS,)
    kv_models = ((WORKFLOWS, MODEL),)

    def _put(self, uow: Batch, row: Row) -> None:
        uow.put(WORKFLOWS, row)
        uow.publish(row["tenant"], MODEL, row["id"], row)

    def _update(self, uow: Batch, ev: EventRecord, **changes: Any) -> None:
        old = uow.get(WORKFLOWS, (ev.tenant, ev.aggregate_id))
        if old is not None:
            self._put(uow, {**old, **changes, "last_seq": ev.seq})

    @handles(WorkflowCreated)
    def created(self, uow: Batch, ev: EventRecord) -> None:
        d = ev.data
        nodes = [
            {"name": n["name"], "task_id": n["task_id"], "depends_on": n["depends_on"]}
            for n in d["nodes"]
        ]
        self._put(
            uow,
            {
                "id": ev.aggregate_id,
                "tenant": ev.tenant,
                "name": d["name"],
                "status": "created",
                "failure_policy": d["failure_policy"],
                "labels": d["labels"],
                "nodes": nodes,
                "total": len(nodes),
                "counts": None,
                "created_at": ev.occurred_at,
                "started_at": None,
                "cancel_requested_at": None,
                "cancel_reason": None,
                "finished_at": None,
                "actor": ev.actor,
                "correlation_id": ev.correlation_id,
                "redrives": 0,
                "last_redrive": None,
                "last_seq": ev.seq,
            },
        )

    @handles(WorkflowStarted, load=aggregate_row(WORKFLOWS))
    def started(self, uow: Batch, ev: EventRecord) -> None:
        self._update(uow, ev, status="running", started_at=ev.occurred_at)

    @handles(WorkflowCancelRequested, load=aggregate_row(WORKFLOWS))
    def cancel_requested(self, uow: Batch, ev: EventRecord) -> None:
        self._update(
            uow,
            ev,
            status="cancelling",
            cancel_requested_at=ev.occurred_at,
            cancel_reason=ev.data.get("reason"),
        )

    @handles(WorkflowFinished, load=aggregate_row(WORKFLOWS))
    def finished(self, uow: Batch, ev: EventRecord) -> None:
        d = ev.data
        self._update(uow, ev, status=d["status"], counts=d["counts"], finished_at=ev.occurred_at)

    @handles(WorkflowRedriven, load=aggregate_row(WORKFLOWS))
    def redriven(self, uow: Batch, ev: EventRecord) -> None:
        """Running again; ``last_redrive`` keeps what ended and which tasks run again
        (its ``seq`` tells the scheduler, at start, which of them are back already)."""
        d = ev.data
        old = uow.get(WORKFLOWS, (ev.tenant, ev.aggregate_id))
        if old is None:
            return
        last_redrive = {
            "redrive": d["redrive"],
            "at": ev.occurred_at,
            "seq": ev.seq,
            "reason": d["reason"],
            "previous_status": d["previous_status"],
            "previous_counts": old["counts"],
            "previous_finished_at": old["finished_at"],
            "tasks": d["tasks"],
        }
        self._update(
            uow,
            ev,
            status="running",
            counts=None,
            finished_at=None,
            cancel_requested_at=None,
            cancel_reason=None,
            redrives=d["redrive"],
            last_redrive=last_redrive,
        )


# -- queries ------------------------------------------------------------------------------------


class _Query(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    min_seq: int | None = Field(None, ge=0)


class GetWorkflow(_Query):
    workflow_id: TaskId
    nodes: bool = Field(True, description="Include every node's task state.")


class ListWorkflows(_Query):
    status: list[
        Literal["created", "running", "cancelling", "completed", "failed", "cancelled"]
    ] = Field(default_factory=list)
    limit: int = Field(50, ge=1, le=1000)
    offset: int = Field(0, ge=0)


#: What an archived node no longer shows (its row, with these, is gone; the log has them).
_NO_DETAILS = {
    "blocked_reason": None,
    "error": None,
    "result": None,
    "progress": None,
    "progress_message": None,
}

NODE_COLUMNS = (
    "id, node, status, attempt, worker_id, started_at, finished_at, blocked_reason, "
    "error, result, progress, progress_message"
)


async def get_workflow(db: aiosqlite.Connection, tenant: str, query: GetWorkflow) -> Row:
    cols = ", ".join(WORKFLOWS.columns)
    async with db.execute(
        f"SELECT {cols} FROM workflows WHERE tenant = ? AND id = ?", (tenant, query.workflow_id)
    ) as cur:
        found = await cur.fetchone()
    if found is None:
        raise NotFoundError(
            f"workflow {query.workflow_id} not found", details={"workflow_id": query.workflow_id}
        )
    wf = WORKFLOWS.from_db(found)
    counts: dict[str, int] = {}
    async with db.execute(
        "SELECT status, count(*) FROM tasks WHERE tenant = ? AND workflow_id = ? GROUP BY status",
        (tenant, query.workflow_id),
    ) as cur:
        for status, count in await cur.fetchall():
            counts[status] = count
    # A node whose task was archived (cleanup) counts, and shows, as it ended.
    archived: dict[str, dict[str, Any]] = {}
    async with db.execute(
        "SELECT task_id, status, attempt, worker_id, started_at, finished_at, archived_at "
        "FROM archived_nodes WHERE tenant = ? AND workflow_id = ?",
        (tenant, query.workflow_id),
    ) as cur:
        for r in await cur.fetchall():
            task_id, status, attempt, worker, started, finished, archived_at = r
            counts[status] = counts.get(status, 0) + 1
            archived[task_id] = {
                **_NO_DETAILS,
                "status": status,
                "attempt": attempt,
                "worker_id": worker,
                "started_at": started,
                "finished_at": finished,
                "archived_at": archived_at,
            }
    wf["task_counts"] = counts
    wf["tasks_created"] = sum(counts.values())
    wf["tasks_archived"] = len(archived)
    if query.nodes:
        states: dict[str, dict[str, Any]] = {}
        async with db.execute(
            f"SELECT {NODE_COLUMNS} FROM tasks WHERE tenant = ? AND workflow_id = ?",
            (tenant, query.workflow_id),
        ) as cur:
            for r in await cur.fetchall():
                (task_id, _node, status, attempt, worker, started, finished, blocked, error,
                 result, progress, message) = r  # fmt: skip
                states[task_id] = {
                    "status": status,
                    "attempt": attempt,
                    "worker_id": worker,
                    "started_at": started,
                    "finished_at": finished,
                    "blocked_reason": blocked,
                    "error": _json(error),
                    "result": _json(result),
                    "progress": progress,
                    "progress_message": message,
                }
        states.update(archived)
        wf["nodes"] = [
            {**n, **states.get(n["task_id"], {"status": "not_created"})} for n in wf["nodes"]
        ]
    created = datetime.fromisoformat(wf["created_at"])
    end = datetime.fromisoformat(wf["finished_at"]) if wf["finished_at"] else datetime.now(UTC)
    wf["duration_s"] = round((end - created).total_seconds(), 3)
    return wf


def _json(value: str | None) -> Any:
    return orjson.loads(value) if value is not None else None


async def list_workflows(
    db: aiosqlite.Connection, tenant: str, query: ListWorkflows
) -> dict[str, Any]:
    cond, params = "tenant = ?", [tenant]
    if query.status:
        cond += f" AND status IN ({', '.join('?' for _ in query.status)})"
        params += list(query.status)
    result = await paged(
        db, WORKFLOWS, cond, params, order="id DESC", limit=query.limit, offset=query.offset
    )
    for row in result["items"]:
        row.pop("nodes", None)
    return result


QUERIES: Queries = {
    (MODEL, "get"): (GetWorkflow, get_workflow),
    (MODEL, "list"): (ListWorkflows, list_workflows),
}
