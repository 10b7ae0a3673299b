"""Read model ``tasks``: one row per task, its current state.

KV: ``<tenant>.task.<id>``. Queries: ``task.get`` and ``task.list``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import aiosqlite
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from pantheon_es.errors import NotFoundError
from pantheon_es.events import EventRecord
from pantheon_es.specs import priority_name
from pantheon_es.tasks import TaskCancelled, TaskId, TaskStatus, TaskSubmitted
from projections.base import Batch, Queries, ReadModel, Row, Table, aggregate_row, handles

MODEL = "task"
PENDING = TaskStatus.PENDING.value
CANCELLED = TaskStatus.CANCELLED.value

TASKS = Table(
    name="tasks",
    columns=(
        "id",
        "tenant",
        "name",
        "status",
        "priority",
        "priority_name",
        "executor_kind",
        "executor",
        "resources",
        "labels",
        "submitted_at",
        "updated_at",
        "cancelled_at",
        "cancel_reason",
        "actor",
        "correlation_id",
        "idempotency_key",
        "version",
        "last_seq",
    ),
    key=("tenant", "id"),
    json_columns=frozenset({"executor", "resources", "labels"}),
    ddl="""
    CREATE TABLE IF NOT EXISTS tasks (
        id TEXT NOT NULL,
        tenant TEXT NOT NULL,
        name TEXT NOT NULL,
        status TEXT NOT NULL,
        priority INTEGER NOT NULL,
        priority_name TEXT NOT NULL,
        executor_kind TEXT NOT NULL,
        executor TEXT NOT NULL,
        resources TEXT NOT NULL,
        labels TEXT NOT NULL,
        submitted_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        cancelled_at TEXT,
        cancel_reason TEXT,
        actor TEXT NOT NULL,
        correlation_id TEXT NOT NULL,
        idempotency_key TEXT,
        version INTEGER NOT NULL,
        last_seq INTEGER NOT NULL,
        PRIMARY KEY (tenant, id)
    ) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS tasks_tenant_status ON tasks (tenant, status, id);
    """,
)


class TasksModel(ReadModel):
    name = "tasks"
    tables = (TASKS,)
    kv_models = ((TASKS, MODEL),)

    @handles(TaskSubmitted)
    def submitted(self, uow: Batch, ev: EventRecord) -> None:
        d = ev.data
        at = ev.occurred_at
        row: Row = {
            "id": ev.aggregate_id,
            "tenant": ev.tenant,
            "name": d["name"],
            "status": PENDING,
            "priority": d["priority"],
            "priority_name": priority_name(d["priority"]),
            "executor_kind": d["executor"]["kind"],
            "executor": d["executor"],
            "resources": d["resources"],
            "labels": d["labels"],
            "submitted_at": at,
            "updated_at": at,
            "cancelled_at": None,
            "cancel_reason": None,
            "actor": ev.actor,
            "correlation_id": ev.correlation_id,
            "idempotency_key": d.get("idempotency_key"),
            "version": 1,
            "last_seq": ev.seq,
        }
        uow.put(TASKS, row)
        uow.publish(ev.tenant, MODEL, ev.aggregate_id, row)

    @handles(TaskCancelled, load=aggregate_row(TASKS))
    def cancelled(self, uow: Batch, ev: EventRecord) -> None:
        old = uow.get(TASKS, (ev.tenant, ev.aggregate_id))
        if old is None:
            return
        row = {
            **old,
            "status": CANCELLED,
            "cancelled_at": ev.occurred_at,
            "cancel_reason": ev.data.get("reason"),
            "updated_at": ev.occurred_at,
            "version": old["version"] + 1,
            "last_seq": ev.seq,
        }
        uow.put(TASKS, row)
        uow.publish(ev.tenant, MODEL, ev.aggregate_id, row)


# -- queries -----------------------------------------------------------------------------------


class _Query(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    min_seq: int | None = Field(
        None, ge=0, description="Wait until the read model has applied this stream sequence."
    )


class GetTask(_Query):
    task_id: TaskId


class ListTasks(_Query):
    status: list[TaskStatus] | None = None
    name: Annotated[str, StringConstraints(max_length=200)] | None = Field(
        None, description="Exact task name."
    )
    labels: dict[str, str] = Field(default_factory=dict, description="Every label must match.")
    limit: int = Field(50, ge=1, le=1000)
    offset: int = Field(0, ge=0)
    order: Literal["newest", "oldest"] = "newest"


def page(items: list[Row], total: int, limit: int, offset: int) -> dict[str, Any]:
    """A page of results with the pagination facts a UI needs."""
    total_pages = max(1, -(-total // limit))
    return {
        "items": items,
        "total": total,
        "limit": limit,
        "offset": offset,
        "has_more": offset + len(items) < total,
        "current_page": offset // limit + 1,
        "total_pages": total_pages,
    }


async def get_task(db: aiosqlite.Connection, tenant: str, query: GetTask) -> Row:
    cols = ", ".join(TASKS.columns)
    async with db.execute(
        f"SELECT {cols} FROM tasks WHERE tenant = ? AND id = ?", (tenant, query.task_id)
    ) as cur:
        found = await cur.fetchone()
    if found is None:
        raise NotFoundError(f"task {query.task_id} not found", details={"task_id": query.task_id})
    return TASKS.from_db(found)


async def list_tasks(db: aiosqlite.Connection, tenant: str, query: ListTasks) -> dict[str, Any]:
    where = ["tenant = ?"]
    params: list[Any] = [tenant]
    if query.status:
        where.append(f"status IN ({', '.join('?' for _ in query.status)})")
        params += [s.value for s in query.status]
    if query.name is not None:
        where.append("name = ?")
        params.append(query.name)
    for key, value in sorted(query.labels.items()):
        where.append("json_extract(labels, ?) = ?")
        params += [f'$."{key}"', value]
    cond = " AND ".join(where)
    async with db.execute(f"SELECT count(*) FROM tasks WHERE {cond}", params) as cur:
        row = await cur.fetchone()
        total = int(row[0]) if row else 0
    order = "DESC" if query.order == "newest" else "ASC"
    cols = ", ".join(TASKS.columns)
    async with db.execute(
        f"SELECT {cols} FROM tasks WHERE {cond} ORDER BY id {order} LIMIT ? OFFSET ?",
        [*params, query.limit, query.offset],
    ) as cur:
        rows = [TASKS.from_db(r) for r in await cur.fetchall()]
    return page(rows, total, query.limit, query.offset)


QUERIES: Queries = {
    (MODEL, "get"): (GetTask, get_task),
    (MODEL, "list"): (ListTasks, list_tasks),
}
