"""`pantheon verify` against a real nats-server: clean runs pass, forgeries and tampering fail."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pantheon_es import ids
from pantheon_es.embedded import EmbeddedNats
from pantheon_es.events import EventData, make_event
from pantheon_es.store import EventStore
from pantheon_es.tasks import LeaseExpired, LeaseGranted, TaskCompleted
from tests.conftest import Cluster, Stack, python
from tests.test_cli import run
from tools.verify import verify


async def forge(store: EventStore, task_id: str, data: EventData) -> tuple[int, str]:
    """Append ``data`` to the task's history directly, bypassing the command service."""
    event = make_event(data, event_id=ids.new_id(), tenant="default", aggregate_id=task_id,
                       occurred_at=datetime.now(UTC), actor="forger", correlation_id="forged",
                       causation_id=None)  # fmt: skip
    last = await store.subject_last_seq(store.subjects.aggregate("default", "task", task_id))
    result = await store.append([event], expected_seq=last)
    return result.last_seq, event.event_id


def grant(lease_id: str, token: int, ttl: float = 30.0) -> LeaseGranted:
    return LeaseGranted(lease_id=lease_id, worker_id="w-forged", attempt=token,
                        fencing_token=token, ttl=ttl,
                        expires_at=datetime.now(UTC) + timedelta(seconds=ttl))  # fmt: skip


def found(report: Any) -> list[tuple[str, int, str, str]]:
    return [(v.invariant, v.seq, v.event_id, v.type) for v in report.violations]


async def caught_up(store: EventStore, projector: Any) -> None:
    assert await projector.wait_for(await store.last_seq(), timeout=15)


async def test_clean_run_verifies_and_a_late_completion_or_a_tampered_row_is_named(
    cluster: Cluster,
) -> None:
    client, node = cluster.client, cluster.node
    store = node.store
    assert store is not None and node.projector is not None
    await cluster.add_worker(worker_id="w1")
    tasks = [(await client.submit_task(f"add-{i}", python("add", a=i, b=2)))["task_id"]
             for i in range(5)]  # fmt: skip
    failing = (await client.submit_task("boom", python("fail"), max_attempts=1))["task_id"]
    agent = (await client.submit_task("listener", python("sleep", seconds=1.0)))["task_id"]
    for priority in ("low", "high", "urgent", "high"):
        await client.send_message(agent, f"{priority} news", priority=priority)
    first = await client.receive_messages(agent, max=2)
    assert [m["body"] for m in first] == ["urgent news", "high news"]
    wf = await client.create_workflow(
        "diamond", [{"name": "a", "executor": python("emit", value=1)},
                    {"name": "b", "executor": python("emit", value=2), "depends_on": ["a"]},
                    {"name": "c", "executor": python("emit", value=3), "depends_on": ["a"]},
                    {"name": "d", "executor": python("total"), "depends_on": ["b", "c"]}],
    )  # fmt: skip
    assert (await client.wait_for_workflow(wf["workflow_id"], timeout=60))["status"] == "completed"
    for tid in [*tasks, failing, agent]:
        await client.wait_for_task(tid, timeout=30)
    await caught_up(store, node.projector)

    clean = await verify(store, node.db_path)
    assert clean.ok, (found(clean), [t.to_dict() for t in clean.tables if not t.equal])
    assert clean.events >= clean.checkpoint > 40
    assert set(clean.counts.values()) == {0} and len(clean.counts) == 6
    rows = {t.table: t.live_rows for t in clean.tables}
    assert rows["tasks"] == 11 and rows["messages"] == 4 and rows["workflows"] == 1
    assert all(t.live_checksum == t.rebuilt_checksum for t in clean.tables)

    # A completion of a finished task under its old lease, appended behind the service's back.
    done = await client.get_task(tasks[0])
    history = await store.read_aggregate("default", "task", tasks[0])
    lease_id = next(h.event.data.lease_id for h in history if h.event.type == "LeaseGranted")
    seq, event_id = await forge(store, tasks[0], TaskCompleted(lease_id=lease_id, result=99))
    await caught_up(store, node.projector)
    # ...and a row of the live database changed by hand.
    db = sqlite3.connect(node.db_path)
    db.execute("PRAGMA busy_timeout=5000")
    db.execute("UPDATE tasks SET name = 'tampered' WHERE id = ?", (tasks[1],))
    db.commit()
    db.close()

    report = await verify(store, node.db_path)
    assert not report.ok
    assert ("stale_report", seq, event_id, "TaskCompleted") in found(report)
    assert ("one_terminal_event", seq, event_id, "TaskCompleted") in found(report)
    assert {v.invariant for v in report.violations} == {"stale_report", "one_terminal_event"}
    differing = {t.table: t for t in report.tables if not t.equal}
    assert list(differing) == ["tasks"]
    assert differing["tasks"].changed == [
        {"key": ["default", tasks[1]], "columns": {"name": ["tampered", "add-1"]}}
    ]
    assert differing["tasks"].missing == differing["tasks"].extra == []
    assert done["status"] == "completed"


async def test_forged_second_lease_and_completion_after_expiry_are_named(
    stack: Stack, nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    store = stack.store
    task_id = (await stack.client.submit_task("t", python("noop")))["task_id"]
    await forge(store, task_id, grant("L1", 1))
    await caught_up(store, stack.projector)
    cli = ("verify", "--nats-url", nats_server.url, "--namespace", store.subjects.root,
           "--db", str(stack.db_path), "--json")  # fmt: skip
    passed = await asyncio.to_thread(run, *cli, data_dir=tmp_path / "d", check=False)
    assert passed.returncode == 0, passed.stderr
    assert json.loads(passed.stdout)["ok"] is True

    second = await forge(store, task_id, grant("L2", 2))
    await forge(store, task_id, LeaseExpired(lease_id="L2", attempt=2, reason="not renewed"))
    late = await forge(store, task_id, TaskCompleted(lease_id="L2", result="late"))
    await caught_up(store, stack.projector)

    report = await verify(store, stack.db_path)
    assert found(report) == [
        ("single_live_lease", *second, "LeaseGranted"),
        ("stale_report", *late, "TaskCompleted"),
    ]
    assert all(t.equal for t in report.tables)  # the projector folded the forgeries faithfully

    failed = await asyncio.to_thread(run, *cli, data_dir=tmp_path / "d", check=False)
    assert failed.returncode == 1
    doc = json.loads(failed.stdout)
    assert doc["ok"] is False
    assert [(v["invariant"], v["seq"], v["event_id"]) for v in doc["violations"]] == [
        ("single_live_lease", *second),
        ("stale_report", *late),
    ]
    assert "verify FAILED" in failed.stderr and "2 invariant violation(s)" in failed.stderr
    human = await asyncio.to_thread(run, *cli[:-1], data_dir=tmp_path / "d", check=False)
    assert human.returncode == 1
    assert f"seq {late[0]} TaskCompleted {late[1]}" in human.stdout


def test_verify_cli_without_a_database_is_a_typed_error(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    result = run("verify", "--nats-url", nats_server.url, "--db", str(tmp_path / "none.db"),
                 data_dir=tmp_path / "d", check=False)  # fmt: skip
    assert result.returncode == 1
    assert "not_found" in result.stderr and "no read-model database" in result.stderr
    assert not (tmp_path / "none.db").exists()


def test_compare_table_names_missing_extra_and_changed_rows_by_key() -> None:
    from projections.base import Table
    from tools.verify import compare_table

    table = Table("t", ("tenant", "id", "name", "n"), ("tenant", "id"), "")
    rebuilt = [("a", "1", "x", 1), ("a", "2", "y", 2), ("b", "1", "z", 3)]
    live = [("a", "1", "x", 1), ("a", "2", "y", 20), ("c", "9", "q", 0)]
    diff = compare_table(table, live, rebuilt)
    assert not diff.equal and (diff.live_rows, diff.rebuilt_rows) == (3, 3)
    assert diff.missing == [["b", "1"]] and diff.extra == [["c", "9"]]
    assert diff.changed == [{"key": ["a", "2"], "columns": {"n": [20, 2]}}]
    same = compare_table(table, rebuilt, list(rebuilt))
    assert same.equal and same.missing == same.extra == same.changed == []
