"""Read model ``workers``: registered worker processes, capacity, liveness and use.

KV ``<tenant>.worker.<id>``. Query ``worker.list``. The scheduler rebuilds its
view of the workers from this table at start.
"""

from __future__ import annotations

from typing import Any, Literal

import aiosqlite
from pydantic import BaseModel, ConfigDict, Field

from pantheon_es.events import EventRecord
from pantheon_es.workers import (
    WorkerDraining,
    WorkerLost,
    WorkerRegistered,
    WorkerRenewed,
    WorkerStopped,
)
from projections.base import (
    Batch,
    Queries,
    ReadModel,
    Row,
    Table,
    aggregate_row,
    handles,
    paged,
)

MODEL = "worker"

WORKERS = Table(
    name="workers",
    columns=(
        "id",
        "tenant",
        "incarnation",
        "status",
        "capacity",
        "slots",
        "labels",
        "hostname",
        "pid",
        "version",
        "ttl",
        "tenants",
        "offer_batches",
        "registered_at",
        "expires_at",
        "last_heartbeat_at",
        "running",
        "cpu_percent",
        "memory_mb",
        "last_seq",
    ),
    key=("tenant", "id"),
    json_columns=frozenset({"capacity", "labels", "tenants", "offer_batches"}),
    ddl="""
    CREATE TABLE IF NOT EXISTS workers (
        id TEXT NOT NULL,
        tenant TEXT NOT NULL,
        incarnation TEXT NOT NULL,
        status TEXT NOT NULL,
        capacity TEXT NOT NULL,
        slots INTEGER NOT NULL,
        labels TEXT NOT NULL,
        hostname TEXT NOT NULL,
        pid INTEGER NOT NULL,
        version TEXT NOT NULL,
        ttl REAL NOT NULL,
        tenants TEXT NOT NULL,
        offer_batches TEXT NOT NULL,
        registered_at TEXT NOT NULL,
        expires_at TEXT NOT NULL,
        last_heartbeat_at TEXT NOT NULL,
        running INTEGER NOT NULL,
        cpu_percent REAL,
        memory_mb REAL,
        last_seq INTEGER NOT NULL,
        PRIMARY KEY (tenant, id)
    ) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS workers_status ON workers (tenant, status);
    """,
)


class WorkersModel(ReadModel):
    name = "workers"
    tables = (WORKERS,)
    kv_models = ((WORKERS, MODEL),)

    def _put(self, uow: Batch, row: Row) -> None:
        uow.put(WORKERS, row)
        uow.publish(row["tenant"], MODEL, row["id"], row)

    def _update(self, uow: Batch, ev: EventRecord, **changes: Any) -> None:
        old = uow.get(WORKERS, (ev.tenant, ev.aggregate_id))
        if old is not None and old["incarnation"] == ev.data["incarnation"]:
            self._put(uow, {**old, **changes, "last_seq": ev.seq})

    @handles(WorkerRegistered)
    def registered(self, uow: Batch, ev: EventRecord) -> None:
        d = ev.data
        self._put(
            uow,
            {
                "id": ev.aggregate_id,
                "tenant": ev.tenant,
                "incarnation": d["incarnation"],
                "status": "active",
                "capacity": d["capacity"],
                "slots": d["slots"],
                "labels": d["labels"],
                "hostname": d["hostname"],
                "pid": d["pid"],
                "version": d["version"],
                "ttl": d["ttl"],
                "tenants": d.get("tenants") or [],
                "offer_batches": bool(d.get("offer_batches")),
                "registered_at": ev.occurred_at,
                "expires_at": d["expires_at"],
                "last_heartbeat_at": ev.occurred_at,
                "running": 0,
                "cpu_percent": None,
                "memory_mb": None,
                "last_seq": ev.seq,
            },
        )

    @handles(WorkerRenewed, load=aggregate_row(WORKERS))
    def renewed(self, uow: Batch, ev: EventRecord) -> None:
        d = ev.data
        usage = d.get("usage") or {}
        self._update(
            uow,
            ev,
            expires_at=d["expires_at"],
            last_heartbeat_at=ev.occurred_at,
            running=d.get("running", 0),
            cpu_percent=usage.get("cpu_percent"),
            memory_mb=usage.get("memory_mb"),
        )

    @handles(WorkerDraining, load=aggregate_row(WORKERS))
    def draining(self, uow: Batch, ev: EventRecord) -> None:
        self._update(uow, ev, status="draining")

    @handles(WorkerStopped, load=aggregate_row(WORKERS))
    def stopped(self, uow: Batch, ev: EventRecord) -> None:
        self._update(uow, ev, status="stopped", running=0)

    @handles(WorkerLost, load=aggregate_row(WORKERS))
    def lost(self, uow: Batch, ev: EventRecord) -> None:
        self._update(uow, ev, status="lost", running=0)


class ListWorkers(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    status: list[Literal["active", "draining", "stopped", "lost"]] | None = None
    limit: int = Field(100, ge=1, le=1000)
    offset: int = Field(0, ge=0)
    min_seq: int | None = Field(None, ge=0)


async def list_workers(db: aiosqlite.Connection, tenant: str, query: ListWorkers) -> dict[str, Any]:
    where, params = ["tenant = ?"], [tenant]
    if query.status:
        where.append(f"status IN ({', '.join('?' for _ in query.status)})")
        params += list(query.status)
    return await paged(
        db,
        WORKERS,
        " AND ".join(where),
        params,
        order="id",
        limit=query.limit,
        offset=query.offset,
    )


QUERIES: Queries = {(MODEL, "list"): (ListWorkers, list_workers)}
