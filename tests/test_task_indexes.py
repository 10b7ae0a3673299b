"""The task table's indexes: what the scheduler's start-up and the agent views read through."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import aiosqlite
from hypothesis import given, settings
from hypothesis import strategies as st

from pantheon_es.events import decode_record, encode
from projections.base import Batch
from projections.projector import open_writer
from projections.tasks import (
    AGENT_ROWS,
    FINISHED_ROWS,
    LIVE,
    LIVE_ROWS_FROM,
    TASKS,
    ListTasks,
    TasksModel,
    _where,
    list_tasks,
)
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


def test_retention_reads_the_finished_rows_by_time_not_the_history(tmp_path: Path) -> None:
    """The janitor's queries and ``list --finished-before`` go through ``tasks_finished``."""
    rows = [
        {**row("a", f"t{i}", "completed", "python"), "finished_at": f"2026-01-0{i + 1}T00:00:00Z"}
        for i in range(5)
    ] + [row("a", "t9", "pending", "python")]
    db = database(tmp_path / "r.db", rows)
    try:
        due = f"SELECT min(finished_at) FROM {FINISHED_ROWS} WHERE finished_at IS NOT NULL"
        assert db.execute(due).fetchone() == ("2026-01-01T00:00:00Z",)
        tenants = (
            f"SELECT DISTINCT tenant FROM {FINISHED_ROWS} "
            "WHERE finished_at IS NOT NULL AND finished_at < ?"
        )
        assert db.execute(tenants, ("2026-01-03",)).fetchall() == [("a",)]
        cond, params = _where("a", ListTasks(finished_before="2026-01-03T00:00:00Z"))
        listed = f"SELECT id FROM {FINISHED_ROWS} WHERE {cond} ORDER BY id"
        assert db.execute(listed, params).fetchall() == [("t0",), ("t1",)]
        for sql, args in ((due, ()), (tenants, ("2026-01-03",)), (listed, tuple(params))):
            shown = plan(db, sql, args)
            assert "tasks_finished" in shown and "SCAN tasks" not in shown, shown
    finally:
        db.close()


@settings(max_examples=25, deadline=None)
@given(
    tasks=tasks,
    wanted=st.lists(st.sampled_from(STATUSES), max_size=3, unique=True),
    kind=st.sampled_from([None, "agent", "task"]),
)
async def test_list_summaries_count_the_live_rows_without_reading_the_history(
    tmp_path_factory: Any, tasks: Any, wanted: list[str], kind: str | None
) -> None:
    """A listing's summary counts the matching live rows, seeking them by status."""
    rows = [row(t, f"t{i:04d}", s, k) for i, (t, s, k) in enumerate(tasks)]
    path = tmp_path_factory.mktemp("sum") / "r.db"
    database(path, rows).close()
    statements: list[str] = []
    async with aiosqlite.connect(path) as db:
        await db.set_trace_callback(statements.append)
        query = ListTasks(status=wanted or None, kind=kind)
        summary = (await list_tasks(db, "a", query))["summary"]
        await db.set_trace_callback(None)
    expected = [
        r
        for r in rows
        if r["tenant"] == "a"
        and r["status"] in LIVE
        and (not wanted or r["status"] in wanted)
        and (kind is None or (r["executor_kind"] == "agent") == (kind == "agent"))
    ]
    assert sum(summary.values()) == len(expected)
    plain = sqlite3.connect(path)
    try:
        selects = [sql for sql in statements if sql.lstrip().upper().startswith("SELECT")]
        for sql in selects:
            assert "SCAN tasks" not in plan(plain, sql), (sql, plan(plain, sql))
        summaries = [sql for sql in selects if "last_activity_at FROM" in sql]
        assert len(summaries) == (1 if set(wanted or LIVE) & set(LIVE) else 0)
        for sql in summaries:  # the live rows by status, not the tenant's whole history
            assert "tasks_tenant_status (tenant=? AND status=?)" in plan(plain, sql)
    finally:
        plain.close()
