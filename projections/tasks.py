"""Read model ``tasks``: one row per task (an agent is a task with executor ``agent``).

KV ``<tenant>.task.<id>``. Queries ``task.get``, ``task.list``, ``task.monitor``.
Message traffic counts as activity: a message sent to or by a task moves its
``last_activity_at``; the pending-message count lives on the recipient's row.
An archived task's row (and its messages) leave the read models; the log keeps
its history.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import aiosqlite
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from pantheon_es import ids
from pantheon_es.errors import NotFoundError
from pantheon_es.events import EventRecord
from pantheon_es.mailbox import MessagesDelivered, MessageSent
from pantheon_es.specs import OPTION_FIELDS, priority_name
from pantheon_es.tasks import (
    LeaseExpired,
    LeaseGranted,
    LeaseReleased,
    LeaseRenewed,
    RetryScheduled,
    TaskArchived,
    TaskBlocked,
    TaskCancelled,
    TaskCompleted,
    TaskFailed,
    TaskId,
    TaskProgressed,
    TaskRedriven,
    TaskSkipped,
    TaskStarted,
    TaskStatus,
    TaskSubmitted,
    TaskTimedOut,
)
from projections.base import (
    Batch,
    Key,
    Queries,
    ReadModel,
    Row,
    Table,
    aggregate_row,
    handles,
    paged,
)

MODEL = "task"
LIVE = ("pending", "leased", "running")
LIVE_CONDITION = "status IN ('pending', 'leased', 'running')"
#: Agents are read through their partial index; a query must state its condition
#: literally (AGENT_CONDITION) for SQLite to accept it.
AGENT_CONDITION = "executor_kind = 'agent'"
AGENT_ROWS = "tasks INDEXED BY tasks_agents"
#: Finished tasks by when they finished (retention and ``finished_before``): only finished
#: rows have ``finished_at``, so a sweep reads the due rows, not the history.
FINISHED_ROWS = "tasks INDEXED BY tasks_finished"
#: The live rows of every tenant through ``tasks_tenant_status``, without scanning the
#: history: the tenants by a loose index scan (one seek each), then per tenant the three
#: live status ranges. The scheduler's start-up reads these (docs/decisions.md).
LIVE_ROWS_FROM = f"""
    (WITH RECURSIVE tenants(t) AS (
        SELECT min(tenant) FROM tasks
        UNION ALL
        SELECT (SELECT min(tenant) FROM tasks WHERE tenant > t) FROM tenants WHERE t IS NOT NULL
    )
    SELECT tasks.* FROM tenants JOIN tasks INDEXED BY tasks_tenant_status ON tasks.tenant = t
    WHERE {LIVE_CONDITION})
"""
FINISHED = ("completed", "failed", "cancelled", "timed_out", "skipped")
#: A live agent with no activity for this long counts as idle in summaries.
IDLE_AFTER_S = 300.0

TASK_JSON = frozenset(
    {
        "executor",
        "resources",
        "labels",
        "result",
        "error",
        "options",
        "blocked_details",
        "depends_on",
    }
)

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
        "attempt",
        "max_attempts",
        "lease_id",
        "fencing_token",
        "worker_id",
        "worker_tenant",
        "lease_expires_at",
        "lease_ttl",
        "started_at",
        "finished_at",
        "last_activity_at",
        "activity",
        "progress",
        "progress_message",
        "pending_messages",
        "cpu_percent",
        "memory_mb",
        "inactivity_timeout",
        "result",
        "error",
        "cancel_reason",
        "actor",
        "correlation_id",
        "idempotency_key",
        "options",
        "pending_since",
        "blocked_reason",
        "blocked_details",
        "not_before",
        "attempts_base",
        "workflow_id",
        "node",
        "depends_on",
        "version",
        "task_seq",
        "last_seq",
    ),
    key=("tenant", "id"),
    json_columns=TASK_JSON,
    # Handlers read these from events, never from the row: all of them stay text.
    opaque_json=TASK_JSON,
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
        attempt INTEGER NOT NULL,
        max_attempts INTEGER NOT NULL,
        lease_id TEXT,
        fencing_token INTEGER,
        worker_id TEXT,
        worker_tenant TEXT,
        lease_expires_at TEXT,
        lease_ttl REAL,
        started_at TEXT,
        finished_at TEXT,
        last_activity_at TEXT NOT NULL,
        activity TEXT NOT NULL,
        progress REAL,
        progress_message TEXT,
        pending_messages INTEGER NOT NULL,
        cpu_percent REAL,
        memory_mb REAL,
        inactivity_timeout REAL,
        result TEXT,
        error TEXT,
        cancel_reason TEXT,
        actor TEXT NOT NULL,
        correlation_id TEXT NOT NULL,
        idempotency_key TEXT,
        options TEXT NOT NULL,
        pending_since TEXT,
        blocked_reason TEXT,
        blocked_details TEXT,
        not_before TEXT,
        attempts_base INTEGER NOT NULL,
        workflow_id TEXT,
        node TEXT,
        depends_on TEXT NOT NULL,
        version INTEGER NOT NULL,
        task_seq INTEGER NOT NULL,
        last_seq INTEGER NOT NULL,
        PRIMARY KEY (tenant, id)
    ) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS tasks_tenant_status ON tasks (tenant, status, id);
    CREATE INDEX IF NOT EXISTS tasks_agents ON tasks (tenant, id, status)
        WHERE executor_kind = 'agent';
    CREATE INDEX IF NOT EXISTS tasks_workflow ON tasks (tenant, workflow_id)
        WHERE workflow_id IS NOT NULL;
    CREATE INDEX IF NOT EXISTS tasks_finished ON tasks (finished_at, tenant)
        WHERE finished_at IS NOT NULL;
    """,
)


#: A workflow node whose task was archived: its last status, so ``workflow.get`` still
#: shows how it ended (the task's own row is gone; docs/decisions.md, "Workflows").
ARCHIVED_NODES = Table(
    name="archived_nodes",
    columns=(
        "tenant",
        "workflow_id",
        "task_id",
        "status",
        "attempt",
        "worker_id",
        "started_at",
        "finished_at",
        "archived_at",
        "last_seq",
    ),
    key=("tenant", "workflow_id", "task_id"),
    ddl="""
    CREATE TABLE IF NOT EXISTS archived_nodes (
        tenant TEXT NOT NULL,
        workflow_id TEXT NOT NULL,
        task_id TEXT NOT NULL,
        status TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        worker_id TEXT,
        started_at TEXT,
        finished_at TEXT,
        archived_at TEXT NOT NULL,
        last_seq INTEGER NOT NULL,
        PRIMARY KEY (tenant, workflow_id, task_id)
    ) WITHOUT ROWID;
    """,
)


def _sender_row(event: EventRecord) -> list[tuple[Table, Key]]:
    sender = event.data.get("sender", "")
    return [(TASKS, (event.tenant, sender))] if ids.is_id(sender) else []


class TasksModel(ReadModel):
    name = "tasks"
    tables = (TASKS, ARCHIVED_NODES)
    kv_models = ((TASKS, MODEL),)

    def _update(self, uow: Batch, ev: EventRecord, **changes: Any) -> Row | None:
        row = uow.get(TASKS, (ev.tenant, ev.aggregate_id))
        if row is None:
            return None
        # In place: the row belongs to this batch (a copy of 48 columns per event cost more).
        row["version"] += 1
        row.update(changes)
        row["updated_at"] = ev.occurred_at
        row["last_seq"] = row["task_seq"] = ev.seq  # an event of the task aggregate itself
        self._put(uow, row)
        return row

    def _put(self, uow: Batch, row: Row) -> None:
        uow.put(TASKS, row)
        uow.publish(row["tenant"], MODEL, row["id"], row)

    @handles(TaskSubmitted, creates=aggregate_row(TASKS))
    def submitted(self, uow: Batch, ev: EventRecord) -> None:
        d = ev.data
        at = ev.occurred_at
        self._put(
            uow,
            {
                "id": ev.aggregate_id,
                "tenant": ev.tenant,
                "name": d["name"],
                "status": "pending",
                "priority": d["priority"],
                "priority_name": priority_name(d["priority"]),
                "executor_kind": d["executor"]["kind"],
                "executor": d["executor"],
                "resources": d["resources"],
                "labels": d["labels"],
                "submitted_at": at,
                "updated_at": at,
                "attempt": 0,
                "max_attempts": d.get("max_attempts", 3),
                **self._NO_LEASE,
                "started_at": None,
                "finished_at": None,
                "last_activity_at": at,
                "activity": "active",
                "progress": None,
                "progress_message": None,
                "pending_messages": 0,
                "cpu_percent": None,
                "memory_mb": None,
                "inactivity_timeout": d.get("inactivity_timeout"),
                "result": None,
                "error": None,
                "cancel_reason": None,
                "actor": ev.actor,
                "correlation_id": ev.correlation_id,
                "idempotency_key": d.get("idempotency_key"),
                "options": {k: d[k] for k in OPTION_FIELDS if d.get(k) is not None},
                "pending_since": at,
                "blocked_reason": "dependency_unmet" if d.get("depends_on") else None,
                "blocked_details": {"depends_on": d["depends_on"]} if d.get("depends_on") else None,
                "not_before": None,
                "attempts_base": 0,
                "workflow_id": d.get("workflow_id"),
                "node": d.get("node"),
                "depends_on": d.get("depends_on") or [],
                "version": 1,
                "task_seq": ev.seq,
                "last_seq": ev.seq,
            },
        )

    @handles(LeaseGranted, load=aggregate_row(TASKS))
    def leased(self, uow: Batch, ev: EventRecord) -> None:
        d = ev.data
        self._update(
            uow,
            ev,
            status="leased",
            attempt=d["attempt"],
            lease_id=d["lease_id"],
            fencing_token=d["fencing_token"],
            worker_id=d["worker_id"],
            worker_tenant=d.get("worker_tenant"),
            lease_expires_at=d["expires_at"],
            lease_ttl=d["ttl"],
            **self._UNBLOCKED,
        )

    @handles(TaskStarted, load=aggregate_row(TASKS))
    def started(self, uow: Batch, ev: EventRecord) -> None:
        self._update(
            uow,
            ev,
            status="running",
            started_at=ev.data["started_at"],
            last_activity_at=ev.occurred_at,
        )

    @handles(LeaseRenewed, load=aggregate_row(TASKS))
    def renewed(self, uow: Batch, ev: EventRecord) -> None:
        d = ev.data
        changes: dict[str, Any] = {"lease_expires_at": d["expires_at"]}
        if d.get("activity"):
            changes["last_activity_at"] = ev.occurred_at
        if d.get("usage"):
            changes["cpu_percent"] = d["usage"]["cpu_percent"]
            changes["memory_mb"] = d["usage"]["memory_mb"]
        self._update(uow, ev, **changes)

    @handles(TaskProgressed, load=aggregate_row(TASKS))
    def progressed(self, uow: Batch, ev: EventRecord) -> None:
        d = ev.data
        self._update(
            uow,
            ev,
            progress=d.get("progress"),
            progress_message=d.get("message"),
            activity=d.get("state", "active"),
            last_activity_at=ev.occurred_at,
        )

    _NO_LEASE: dict[str, Any] = {  # noqa: RUF012 - a constant
        "lease_id": None,
        "fencing_token": None,
        "worker_id": None,
        "worker_tenant": None,
        "lease_expires_at": None,
        "lease_ttl": None,
    }

    _UNBLOCKED: dict[str, Any] = {  # noqa: RUF012 - a constant
        "blocked_reason": None,
        "blocked_details": None,
        "not_before": None,
    }

    def _pending(self, uow: Batch, ev: EventRecord, **changes: Any) -> None:
        changes.setdefault("pending_since", ev.occurred_at)
        self._update(uow, ev, status="pending", activity="active", **self._NO_LEASE, **changes)

    @handles(LeaseExpired, load=aggregate_row(TASKS))
    def expired(self, uow: Batch, ev: EventRecord) -> None:
        self._pending(uow, ev)

    @handles(LeaseReleased, load=aggregate_row(TASKS))
    def released(self, uow: Batch, ev: EventRecord) -> None:
        self._pending(uow, ev)

    @handles(TaskBlocked, load=aggregate_row(TASKS))
    def blocked(self, uow: Batch, ev: EventRecord) -> None:
        d = ev.data
        self._update(uow, ev, blocked_reason=d["reason"], blocked_details=d.get("details") or {})

    @handles(RetryScheduled, load=aggregate_row(TASKS))
    def retry_scheduled(self, uow: Batch, ev: EventRecord) -> None:
        d = ev.data
        changes: dict[str, Any] = {}
        if d.get("usage"):
            changes["cpu_percent"] = d["usage"]["cpu_percent"]
            changes["memory_mb"] = d["usage"]["memory_mb"]
        self._pending(
            uow,
            ev,
            pending_since=d["not_before"],
            not_before=d["not_before"],
            blocked_reason="waiting_for_retry",
            blocked_details={"attempt": d["attempt"], "not_before": d["not_before"],
                             "delay": d["delay"], "error_type": d["error"]["type"]},
            error=d["error"],
            **changes,
        )  # fmt: skip

    @handles(TaskRedriven, load=aggregate_row(TASKS))
    def redriven(self, uow: Batch, ev: EventRecord) -> None:
        old = uow.get(TASKS, (ev.tenant, ev.aggregate_id))
        if old is None:
            return
        changes: dict[str, Any] = dict(self._UNBLOCKED)
        waiting = ev.data.get("waiting_for")
        if waiting:  # a redriven workflow's node that waits for its dependencies again
            changes["blocked_reason"] = "dependency_unmet"
            changes["blocked_details"] = {"depends_on": waiting}
        self._pending(uow, ev, finished_at=None, attempts_base=old["attempt"], **changes)

    def _finish(self, uow: Batch, ev: EventRecord, status: str, **changes: Any) -> None:
        if ev.data.get("started_at"):  # finished before its start was reported
            changes["started_at"] = ev.data["started_at"]
        usage = ev.data.get("usage")
        if usage:
            changes["cpu_percent"] = usage["cpu_percent"]
            changes["memory_mb"] = usage["memory_mb"]
        self._update(
            uow, ev, status=status, finished_at=ev.occurred_at,
            **self._NO_LEASE, **self._UNBLOCKED, **changes,
        )  # fmt: skip

    @handles(TaskCompleted, load=aggregate_row(TASKS))
    def completed(self, uow: Batch, ev: EventRecord) -> None:
        self._finish(uow, ev, "completed", result=ev.data.get("result"), progress=1.0)

    @handles(TaskFailed, load=aggregate_row(TASKS))
    def failed(self, uow: Batch, ev: EventRecord) -> None:
        self._finish(uow, ev, "failed", error=ev.data["error"])

    @handles(TaskTimedOut, load=aggregate_row(TASKS))
    def timed_out(self, uow: Batch, ev: EventRecord) -> None:
        d = ev.data
        kind = d.get("kind", "inactivity")
        messages = {
            "inactivity": f"no activity for {d['timeout']:g} s (last at {d['last_activity_at']})",
            "schedule_to_start": f"not started within {d['timeout']:g} s of becoming ready",
            "start_to_close": f"ran longer than {d['timeout']:g} s",
        }
        error = {
            "type": {
                "inactivity": "InactivityTimeout",
                "schedule_to_start": "ScheduleToStartTimeout",
                "start_to_close": "StartToCloseTimeout",
            }.get(kind, "Timeout"),
            "message": messages.get(kind, f"timed out after {d['timeout']:g} s"),
            "details": {"timeout": d["timeout"], "last_activity_at": d["last_activity_at"],
                        "kind": kind},
        }  # fmt: skip
        self._finish(uow, ev, "timed_out", error=error)

    @handles(TaskSkipped, load=aggregate_row(TASKS))
    def skipped(self, uow: Batch, ev: EventRecord) -> None:
        d = ev.data
        error = {"type": "DependencyNotCompleted", "message": d["reason"],
                 "details": {"dependency": d["dependency"]}}  # fmt: skip
        self._finish(uow, ev, "skipped", error=error)

    @handles(TaskCancelled, load=aggregate_row(TASKS))
    def cancelled(self, uow: Batch, ev: EventRecord) -> None:
        self._finish(uow, ev, "cancelled", cancel_reason=ev.data.get("reason"))

    @handles(TaskArchived, load=aggregate_row(TASKS))
    def archived(self, uow: Batch, ev: EventRecord) -> None:
        row = uow.get(TASKS, (ev.tenant, ev.aggregate_id))
        if row is not None and row["workflow_id"] is not None:
            uow.put(
                ARCHIVED_NODES,
                {
                    "tenant": ev.tenant,
                    "workflow_id": row["workflow_id"],
                    "task_id": ev.aggregate_id,
                    "status": ev.data["status"],
                    "attempt": row["attempt"],
                    "worker_id": row["worker_id"],
                    "started_at": row["started_at"],
                    "finished_at": row["finished_at"],
                    "archived_at": ev.occurred_at,
                    "last_seq": ev.seq,
                },
            )
        uow.delete(TASKS, (ev.tenant, ev.aggregate_id))
        uow.publish(ev.tenant, MODEL, ev.aggregate_id, None)
        uow.execute(
            "DELETE FROM messages WHERE tenant = ? AND recipient = ?", (ev.tenant, ev.aggregate_id)
        )

    @handles(MessageSent, load=lambda ev: [(TASKS, (ev.tenant, ev.aggregate_id)), *_sender_row(ev)])
    def message_sent(self, uow: Batch, ev: EventRecord) -> None:
        # The mailbox's id is the recipient's task id.
        recipient = uow.get(TASKS, (ev.tenant, ev.aggregate_id))
        if recipient is not None:
            self._touch(uow, recipient, ev, pending_messages=recipient["pending_messages"] + 1)
        for table, key in _sender_row(ev):
            sender = uow.get(table, key)
            if sender is not None:
                self._touch(uow, sender, ev)

    @handles(MessagesDelivered, load=aggregate_row(TASKS))
    def messages_delivered(self, uow: Batch, ev: EventRecord) -> None:
        recipient = uow.get(TASKS, (ev.tenant, ev.aggregate_id))
        if recipient is not None:
            left = max(0, recipient["pending_messages"] - len(ev.data["message_ids"]))
            self._touch(uow, recipient, ev, pending_messages=left)

    def _touch(self, uow: Batch, row: Row, ev: EventRecord, **changes: Any) -> None:
        """Message traffic: activity for a task that is still live."""
        if row["status"] in LIVE:
            changes["last_activity_at"] = ev.occurred_at
        row.update(changes)
        row["updated_at"] = ev.occurred_at
        row["last_seq"] = ev.seq
        row["version"] += 1
        self._put(uow, row)


# -- queries -------------------------------------------------------------------------------------


class _Query(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    min_seq: int | None = Field(
        None, ge=0, description="Wait until the read model has applied this stream sequence."
    )


class GetTask(_Query):
    task_id: TaskId


class ListTasks(_Query):
    status: list[TaskStatus] | None = None
    workflow_id: TaskId | None = Field(None, description="Only the tasks of this workflow.")
    kind: Literal["agent", "task"] | None = Field(
        None, description="agent: executor 'agent' only; task: every other executor."
    )
    name: Annotated[str, StringConstraints(max_length=200)] | None = Field(
        None, description="Exact task name."
    )
    labels: dict[str, str] = Field(default_factory=dict, description="Every label must match.")
    finished_before: datetime | None = None
    limit: int = Field(50, ge=1, le=1000)
    offset: int = Field(0, ge=0)
    order: Literal["newest", "oldest"] = "newest"


class Monitor(_Query):
    limit: int = Field(100, ge=1, le=1000)


def _parse(ts: str | None) -> datetime | None:
    return datetime.fromisoformat(ts) if ts else None


def with_derived(row: Row, now: datetime) -> Row:
    """Add what depends on the time of asking: duration and the activity class."""
    started = _parse(row.get("started_at"))
    finished = _parse(row.get("finished_at"))
    row["duration_s"] = round(((finished or now) - started).total_seconds(), 3) if started else None
    idle_for = (now - (_parse(row["last_activity_at"]) or now)).total_seconds()
    row["idle_s"] = round(idle_for, 3)
    row["activity_class"] = activity_class(row["status"], row["activity"], idle_for)
    return row


def activity_class(status: str, activity: str, idle_for: float) -> str | None:
    """active | waiting_for_input | idle for a live task; None once it has finished."""
    if status not in LIVE:
        return None
    if activity == "waiting_for_input":
        return "waiting_for_input"
    if status == "pending" or idle_for >= IDLE_AFTER_S:
        return "idle"
    return "active"


async def get_task(db: aiosqlite.Connection, tenant: str, query: GetTask) -> Row:
    cols = ", ".join(TASKS.columns)
    async with db.execute(
        f"SELECT {cols} FROM tasks WHERE tenant = ? AND id = ?", (tenant, query.task_id)
    ) as cur:
        found = await cur.fetchone()
    if found is None:
        raise NotFoundError(f"task {query.task_id} not found", details={"task_id": query.task_id})
    return with_derived(TASKS.from_db(found), datetime.now(UTC))


def _where(tenant: str, query: ListTasks, *, status: bool = True) -> tuple[str, list[Any]]:
    """The filter of ``query`` as SQL (``status=False``: leave the status filter out)."""
    where = ["tenant = ?"]
    params: list[Any] = [tenant]
    if query.status and status:
        where.append(f"status IN ({', '.join('?' for _ in query.status)})")
        params += [s.value for s in query.status]
    if query.kind == "agent":
        where.append(AGENT_CONDITION)
    elif query.kind == "task":
        where.append("executor_kind != 'agent'")
    if query.workflow_id is not None:
        where.append("workflow_id = ?")
        params.append(query.workflow_id)
    if query.name is not None:
        where.append("name = ?")
        params.append(query.name)
    for key, value in sorted(query.labels.items()):
        where.append("json_extract(labels, ?) = ?")
        params += [f'$."{key}"', value]
    if query.finished_before is not None:
        cutoff = query.finished_before.astimezone(UTC).isoformat().replace("+00:00", "Z")
        where.append("finished_at IS NOT NULL AND finished_at < ?")
        params.append(cutoff)
    return " AND ".join(where), params


async def list_tasks(db: aiosqlite.Connection, tenant: str, query: ListTasks) -> dict[str, Any]:
    cond, params = _where(tenant, query)
    order = "id DESC" if query.order == "newest" else "id ASC"
    # Agents through their partial index (tasks are the many; agents the few); finished
    # before a time through the finished rows' index (retention reads the oldest ones).
    source = (
        AGENT_ROWS
        if query.kind == "agent"
        else FINISHED_ROWS
        if query.finished_before is not None
        else None
    )
    result = await paged(
        db, TASKS, cond, params, order=order, limit=query.limit, offset=query.offset, source=source
    )
    now = datetime.now(UTC)
    result["items"] = [with_derived(row, now) for row in result["items"]]
    result["summary"] = await _activity_summary(db, tenant, query, now)
    return result


async def _activity_summary(
    db: aiosqlite.Connection, tenant: str, query: ListTasks, now: datetime
) -> dict[str, int]:
    """Live tasks matching the filter by activity: active, waiting_for_input, idle.

    Read through ``tasks_tenant_status`` with the live statuses written out (those the
    filter asks for), so it seeks the live rows instead of reading the tenant's history.
    """
    summary = {"active": 0, "waiting_for_input": 0, "idle": 0}
    asked = {s.value for s in query.status or ()}
    wanted = [s for s in LIVE if not asked or s in asked]
    if not wanted:
        return summary
    cond, params = _where(tenant, query, status=False)
    live = ", ".join(f"'{s}'" for s in wanted)
    async with db.execute(
        "SELECT status, activity, last_activity_at FROM tasks INDEXED BY tasks_tenant_status "
        f"WHERE {cond} AND status IN ({live})",
        params,
    ) as cur:
        for status, activity, last in await cur.fetchall():
            idle_for = (now - (_parse(last) or now)).total_seconds()
            cls = activity_class(status, activity, idle_for)
            if cls is not None:
                summary[cls] += 1
    return summary


async def monitor(db: aiosqlite.Connection, tenant: str, query: Monitor) -> dict[str, Any]:
    """Agents at a glance: totals by status, and each agent's task, status and times."""
    totals = {s.value: 0 for s in TaskStatus}
    async with db.execute(
        f"SELECT status, count(*) FROM {AGENT_ROWS} WHERE tenant = ? AND {AGENT_CONDITION} "
        "GROUP BY status",
        (tenant,),
    ) as cur:
        for status, count in await cur.fetchall():
            totals[status] = count
    cols = ", ".join(TASKS.columns)
    now = datetime.now(UTC)
    async with db.execute(
        f"SELECT {cols} FROM {AGENT_ROWS} WHERE tenant = ? AND {AGENT_CONDITION} "
        "ORDER BY id DESC LIMIT ?",
        (tenant, query.limit),
    ) as cur:
        rows = [with_derived(TASKS.from_db(r), now) for r in await cur.fetchall()]
    agents = [
        {
            "agent_id": r["id"],
            "task": r["executor"].get("prompt", r["name"])[:200],
            "name": r["name"],
            "status": r["status"],
            "activity": r["activity_class"],
            "started_at": r["started_at"],
            "last_activity_at": r["last_activity_at"],
            "duration_s": r["duration_s"],
            "progress": r["progress"],
            "progress_message": r["progress_message"],
            "pending_messages": r["pending_messages"],
            "worker_id": r["worker_id"],
            "cpu_percent": r["cpu_percent"],
            "memory_mb": r["memory_mb"],
        }
        for r in rows
    ]
    return {"totals": totals, "total": sum(totals.values()), "agents": agents}


QUERIES: Queries = {
    (MODEL, "get"): (GetTask, get_task),
    (MODEL, "list"): (ListTasks, list_tasks),
    (MODEL, "monitor"): (Monitor, monitor),
}
