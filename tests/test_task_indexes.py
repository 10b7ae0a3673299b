"""The task table's indexes: what the scheduler's start-up and the agent views read through."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from projections.projector import open_writer
from projections.tasks import AGENT_ROWS, LIVE, LIVE_ROWS_FROM, TASKS

STATUSES = ["pending", "leased", "running", "completed", "failed", "cancelled", "timed_out"]
JSON_DEFAULTS: dict[str, Any] = {"resources": {}, "labels": {}, "options": {}, "depends_on": []}


def row(tenant: str, task_id: str, status: str, kind: str) -> dict[str, Any]:
    values: dict[str, Any] = dict.fromkeys(TASKS.columns)
    values.update(JSON_DEFAULTS)
    values.update(
        id=task_id, tenant=tenant, name="t", status=status, priority=200,
        priority_name="medium", executor_kind=kind, executor={"kind": kind},
        submitted_at="2026-11-24T00:00:00Z", updated_at="2026-11-24T00:00:00Z",
        attempt=0, max_attempts=3, last_activity_at="2026-11-24T00:00:00Z",
        activity="active", pending_messages=0, actor="test", correlation_id="c",
        attempts_base=0, version=1, task_seq=1, last_seq=1,
    )  # fmt: skip
    return values


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
