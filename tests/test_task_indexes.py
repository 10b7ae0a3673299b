"""The task table's indexes: what the scheduler's start-up and the agent views read through."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from pantheon_es.events import decode_record, encode
from projections.base import Batch
from projections.projector import open_writer
from projections.tasks import AGENT_ROWS, LIVE, LIVE_ROWS_FROM, TASKS, TasksModel
from tools.bench import submitted

STATUSES = ["pending", "leased", "running", "completed", "failed", "cancelled", "timed_out"]


def row(tenant: str, task_id: str, status: str, kind: str) -> dict[str, Any]:
    """A task row as the read model writes it for a submit, then given a status and kind."""
    event = submitted(tenant).model_copy(update={"aggregate_id": task_id})
    uow = Batch(track_changes=False)
    TasksModel().submitted(uow, decode_record(encode(event), 1))
    values = uow.get(TASKS, (tenant, task_id))
    assert values is not None
    return {**values, "status": status, "executor_kind": kind}


def database(path: Path, rows: list[dict[str, Any]]) -> sqlite3.Connection:
    db = open_writer(path)
    db.executescript(TASKS.ddl)
    db.executemany(TASKS.upsert_sql, [TASKS.to_params(r) for r in rows])
    return db


def plan(db: sqlite3.Connection, sql: str, params: tuple[Any, ...] = ()) -> str:
    return " | ".join(str(r[-1]) for r in db.execute(f"EXPLAIN QUERY PLAN {sql}", params))


tasks = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "default", "z-9"]),
        st.sampled_from(STATUSES),
        st.sampled_from(["python", "agent"]),
    ),
    max_size=60,
)


@settings(max_examples=40, deadline=None)
@given(tasks=tasks)
def test_live_rows_of_every_tenant_are_read_in_id_order(tmp_path_factory: Any, tasks: Any) -> None:
    rows = [row(t, f"t{i:04d}", s, k) for i, (t, s, k) in enumerate(tasks)]
    db = database(tmp_path_factory.mktemp("idx") / "r.db", rows)
    try:
        got = db.execute(f"SELECT tenant, id FROM {LIVE_ROWS_FROM} ORDER BY id").fetchall()
        want = sorted(
            ((r["tenant"], r["id"]) for r in rows if r["status"] in LIVE), key=lambda x: x[1]
        )
        assert got == want
    finally:
        db.close()


def test_live_rows_and_agent_views_never_scan_the_table(tmp_path: Path) -> None:
    db = database(tmp_path / "r.db", [row("a", "t1", "completed", "python")])
    try:
        live = plan(db, f"SELECT id FROM {LIVE_ROWS_FROM} ORDER BY id")
        assert "tasks_tenant_status" in live and "SCAN tasks" not in live, live
        agents = plan(
            db,
            f"SELECT status, count(*) FROM {AGENT_ROWS} WHERE tenant = ? "
            "AND executor_kind = 'agent' GROUP BY status",
            ("a",),
        )
        assert "tasks_agents" in agents and "SCAN tasks" not in agents, agents
    finally:
        db.close()
