"""`--tenant` on the whole-log tools (replay, verify, whatif, snapshot), against a real
nats-server: every tenant by default, one tenant when named (or by PANTHEON_TENANT)."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pantheon_es.client import PantheonClient
from pantheon_es.embedded import EmbeddedNats
from pantheon_es.events import EventData, make_event
from pantheon_es.ids import new_id
from pantheon_es.store import EventStore
from pantheon_es.tasks import TaskCompleted
from projections.projector import default_models
from tests.conftest import Cluster, Stack, python
from tests.test_cli import ROOT, pantheon_argv
from tests.test_snapshot import activity
from tests.test_whatif import LOW, URGENT, quiet_log, record_mixed_workload
from tools.replay import replay
from tools.verify import NEEDS_EVERY_TENANT, read_tables, verify
from tools.whatif import Attempt, PolicyFile, TaskRecord, WorkerChange, Workload, compare

TABLES = [t for m in default_models() for t in m.tables]


def pantheon(
    command: str, *args: str, env_tenant: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``pantheon COMMAND ARGS`` in its own process, PANTHEON_TENANT set only if given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PANTHEON_")}
    if env_tenant is not None:
        env["PANTHEON_TENANT"] = env_tenant
    return subprocess.run(
        [*pantheon_argv(), command, *args],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=env,
    )  # fmt: skip


def of_tenant(rows: dict[str, list[tuple[Any, ...]]], tenant: str) -> dict[str, list[Any]]:
    """Every table's rows of one tenant (each read-model table has a ``tenant`` column)."""
    out = {}
    for table in TABLES:
        at = table.columns.index("tenant")
        out[table.name] = [r for r in rows[table.name] if r[at] == tenant]
    return out


def tenants_in(rows: dict[str, list[tuple[Any, ...]]]) -> set[str]:
    found = set()
    for table in TABLES:
        at = table.columns.index("tenant")
        found |= {r[at] for r in rows[table.name]}
    return found


def checkpoint_rows(path: Path) -> list[tuple[str, int]]:
    db = sqlite3.connect(path)
    try:
        return [tuple(r) for r in db.execute("SELECT name, last_seq FROM projector_checkpoint")]
    finally:
        db.close()


async def two_tenants(cluster: Cluster) -> tuple[PantheonClient, PantheonClient, dict[str, Any]]:
    """Tenants ``a`` and ``b`` on one worker registered in ``a`` that serves every tenant:
    tasks, an agent's messages, a workflow; tenant ``a`` has the log's last task."""
    nc = cluster.node.nc
    a = PantheonClient(nc, tenant="a", subjects=cluster.node.subjects, timeout=15)
    b = PantheonClient(nc, tenant="b", subjects=cluster.node.subjects, timeout=15)
    await cluster.add_worker(worker_id="wa", tenant="a", serve_tenants=["*"])
    made: dict[str, Any] = {"a": [], "b": []}
    for name, client in (("a", a), ("b", b)):
        for i in range(3):
            made[name].append((await client.submit_task(f"add-{i}", python("add", a=i, b=1)))
                              ["task_id"])  # fmt: skip
    agent = (await a.submit_task("listener", python("sleep", seconds=0.5)))["task_id"]
    for priority in ("low", "urgent"):
        await a.send_message(agent, f"{priority} news", priority=priority)
    assert [m["body"] for m in await a.receive_messages(agent, max=2)] == [
        "urgent news", "low news"
    ]  # fmt: skip
    wf = await b.create_workflow(
        "chain", [{"name": "x", "executor": python("noop")},
                  {"name": "y", "executor": python("noop"), "depends_on": ["x"]}],
    )  # fmt: skip
    assert (await b.wait_for_workflow(wf["workflow_id"], timeout=60))["status"] == "completed"
    for name, client in (("a", a), ("b", b)):
        for tid in made[name]:
            assert (await client.wait_for_task(tid, timeout=30))["status"] == "completed"
    await a.wait_for_task(agent, timeout=30)
    last = (await a.submit_task("last", python("noop")))["task_id"]  # b's events end earlier
    await a.wait_for_task(last, timeout=30)
    made["a"] += [agent, last]
    made["workflow"] = wf["workflow_id"]
    return a, b, made


async def forge(store: EventStore, tenant: str, task_id: str, data: EventData) -> tuple[int, str]:
    """Append ``data`` to a task's history behind the command service's back."""
    event = make_event(data, event_id=new_id(), tenant=tenant, aggregate_id=task_id,
                       occurred_at=datetime.now(UTC), actor="forger", correlation_id="forged",
                       causation_id=None)  # fmt: skip
    last = await store.subject_last_seq(store.subjects.aggregate(tenant, "task", task_id))
    result = await store.append([event], expected_seq=last)
    return result.last_seq, event.event_id


async def late_completion(store: EventStore, tenant: str, task_id: str) -> tuple[int, str]:
    """A second completion of a finished task under its old lease."""
    history = await store.read_aggregate(tenant, "task", task_id)
    lease = next(h.event.data.lease_id for h in history if h.event.type == "LeaseGranted")
    return await forge(store, tenant, task_id, TaskCompleted(lease_id=lease, result="forged"))


# -- replay ------------------------------------------------------------------------------------


async def test_replay_of_one_tenant_holds_exactly_its_rows_of_the_full_replay(
    cluster: Cluster, tmp_path: Path
) -> None:
    _a, _b, made = await two_tenants(cluster)
    store = cluster.node.store
    assert store is not None
    head = await store.last_seq()
    out = tmp_path / "replays"
    out.mkdir()

    full = await replay(store, out / "full.db", until_seq=head)
    _, everything = await asyncio.to_thread(read_tables, out / "full.db", TABLES)
    assert tenants_in(everything) == {"a", "b"}
    seen: list[tuple[int, int]] = []
    counted = 0
    for tenant in ("a", "b"):
        calls: list[tuple[int, int]] = [] if tenant == "b" else seen
        one = await replay(
            store, out / f"{tenant}.db", until_seq=head, tenant=tenant,
            progress=lambda done, total, c=calls: c.append((done, total)),
        )  # fmt: skip
        assert (one.tenant, one.last_seq) == (tenant, head)
        assert 0 < one.events < full.events
        counted += one.events
        _, rows = await asyncio.to_thread(read_tables, out / f"{tenant}.db", TABLES)
        assert rows == of_tenant(everything, tenant)
        # the file says what it holds, and a node would never go on from it
        assert checkpoint_rows(out / f"{tenant}.db") == [(f"tenant:{tenant}", head)]
    assert one.to_dict()["tenant"] == "b"
    assert counted == full.events  # every event is a's or b's: none missed, none twice
    a_rows = of_tenant(everything, "a")
    assert [r[0] for r in a_rows["workers"]] == ["wa"]  # the shared worker is a's
    assert of_tenant(everything, "b")["workers"] == []  # b's tasks ran on it all the same
    grants = [h.event.data for h in await store.read_aggregate("b", "task", made["b"][0])
              if h.event.type == "LeaseGranted"]  # fmt: skip
    assert [(g.worker_tenant, g.worker_id) for g in grants] == [("a", "wa")]

    # progress is in stream sequences, up to the target, ending there
    assert seen and seen[-1] == (head, head)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)

    # a state in the middle: the tenant's rows of the full state at that sequence
    middle = head // 2
    await replay(store, out / "full-mid.db", until_seq=middle)
    await replay(store, out / "a-mid.db", until_seq=middle, tenant="a")
    _, full_mid = await asyncio.to_thread(read_tables, out / "full-mid.db", TABLES)
    _, a_mid = await asyncio.to_thread(read_tables, out / "a-mid.db", TABLES)
    assert a_mid == of_tenant(full_mid, "a") != of_tenant(everything, "a")

    # a tenant without events: an empty state at once, not a wait for events that never come
    nobody = await replay(store, out / "nobody.db", tenant="nobody")
    assert nobody.events == 0 and nobody.last_seq >= head
    _, empty = await asyncio.to_thread(read_tables, out / "nobody.db", TABLES)
    assert all(rows == [] for rows in empty.values())

    # the command line: --tenant, PANTHEON_TENANT, and '*' over the environment
    where = ("--nats-url", cluster.url, "--namespace", cluster.root, "--data-dir",
             str(tmp_path / "d"), "--until-seq", str(head), "--json")  # fmt: skip
    by_option = await asyncio.to_thread(
        pantheon, "replay", *where, "--out", str(out / "cli-a.db"), "--tenant", "a"
    )
    assert by_option.returncode == 0, by_option.stderr
    summary = json.loads(by_option.stdout)
    assert summary["tenant"] == "a" and summary["last_seq"] == head
    assert (await asyncio.to_thread(read_tables, out / "cli-a.db", TABLES))[1] == a_rows
    by_env = await asyncio.to_thread(
        pantheon, "replay", *where, "--out", str(out / "cli-b.db"), env_tenant="b"
    )
    assert by_env.returncode == 0, by_env.stderr
    assert json.loads(by_env.stdout)["tenant"] == "b"
    assert "tenant b only (PANTHEON_TENANT)" in by_env.stderr
    _, b_rows = await asyncio.to_thread(read_tables, out / "cli-b.db", TABLES)
    assert b_rows == of_tenant(everything, "b")
    every = await asyncio.to_thread(
        pantheon, "replay", *where, "--out", str(out / "cli-all.db"), "--tenant", "*",
        env_tenant="b",
    )  # fmt: skip
    assert every.returncode == 0, every.stderr
    assert json.loads(every.stdout)["tenant"] is None
    assert (await asyncio.to_thread(read_tables, out / "cli-all.db", TABLES))[1] == everything
    bad = await asyncio.to_thread(
        pantheon, "replay", *where, "--out", str(out / "bad.db"), "--tenant", "a.b"
    )
    assert bad.returncode == 2 and "not subject-safe" in bad.stderr
    assert not (out / "bad.db").exists()


# -- verify ------------------------------------------------------------------------------------


async def test_verify_of_one_tenant_checks_its_rows_and_events_and_names_what_it_cannot(
    cluster: Cluster, tmp_path: Path
) -> None:
    _a, _b, made = await two_tenants(cluster)
    node = cluster.node
    store = node.store
    assert store is not None and node.projector is not None

    async def caught_up() -> None:
        assert await node.projector.wait_for(await store.last_seq(), timeout=15)

    await caught_up()
    clean = await verify(store, node.db_path, tenant="a")
    assert clean.ok, clean.to_dict()  # the whole report: a rare failure here was unexplained
    assert clean.tenant == "a" and clean.not_checked == NEEDS_EVERY_TENANT
    assert "worker_capacity" not in clean.counts and set(clean.counts.values()) == {0}
    rows = {t.table: (t.live_rows, t.rebuilt_rows) for t in clean.tables}
    assert rows["tasks"] == (5, 5) and rows["workers"] == (1, 1) and rows["messages"] == (2, 2)
    assert rows["workflows"] == (0, 0)  # b's workflow is no "missing" row of a's
    whole = await verify(store, node.db_path)
    assert whole.ok, whole.to_dict()
    assert whole.tenant is None and whole.not_checked == {}
    assert whole.events > clean.events and len(whole.counts) == 6

    # A forgery in tenant b, and a row of b's changed by hand in the live database.
    b_seq, b_id = await late_completion(store, "b", made["b"][0])
    await caught_up()

    def tamper() -> None:
        db = sqlite3.connect(node.db_path)
        try:
            db.execute("PRAGMA busy_timeout=5000")
            db.execute(
                "UPDATE tasks SET name = 'tampered' WHERE tenant = 'b' AND id = ?", (made["b"][1],)
            )
            db.commit()
        finally:
            db.close()

    # Off the event loop: the live projector writes on the loop's thread and yields inside
    # its write transaction, so a write made on that thread meanwhile would wait for a lock
    # whose holder cannot go on (5 s, then "database is locked").
    await asyncio.to_thread(tamper)
    only_a = await verify(store, node.db_path, tenant="a")
    assert only_a.ok, only_a.to_dict()  # none of a's business
    for tenant in (None, "b"):
        report = await verify(store, node.db_path, tenant=tenant)
        assert not report.ok
        assert {(v.invariant, v.seq, v.event_id) for v in report.violations} == {
            ("stale_report", b_seq, b_id),
            ("one_terminal_event", b_seq, b_id),
        }
        assert [t.table for t in report.tables if not t.equal] == ["tasks"]

    # A forgery in tenant a: named by verify --tenant a, through the command line.
    a_seq, a_id = await late_completion(store, "a", made["a"][0])
    await caught_up()
    cli = ("--nats-url", cluster.url, "--namespace", cluster.root, "--data-dir",
           str(tmp_path / "d"), "--db", str(node.db_path))  # fmt: skip
    failed = await asyncio.to_thread(pantheon, "verify", *cli, "--tenant", "a", "--json")
    # 1 is also the exit code of a command that crashed (or could not import a module):
    # its report on stdout tells the two apart, and its stderr says why if there is none.
    assert failed.returncode == 1 and failed.stdout.startswith("{"), failed.stderr
    doc = json.loads(failed.stdout)
    assert doc["ok"] is False and doc["tenant"] == "a"
    assert {(v["invariant"], v["seq"], v["event_id"], v["tenant"]) for v in doc["violations"]} == {
        ("stale_report", a_seq, a_id, "a"),
        ("one_terminal_event", a_seq, a_id, "a"),
    }
    assert all(t["equal"] for t in doc["tables"])  # b's tampered row is not a's
    capacity = next(i for i in doc["invariants"] if i["name"] == "worker_capacity")
    assert capacity["checked"] is False and capacity["violations"] is None
    assert "shared" in capacity["not_checked_because"]
    assert all(i["checked"] and i["violations"] is not None
               for i in doc["invariants"] if i["name"] != "worker_capacity")  # fmt: skip
    assert "verify FAILED (tenant a only)" in failed.stderr

    human = await asyncio.to_thread(pantheon, "verify", *cli, env_tenant="a")
    assert human.returncode == 1 and "verify FAILED (tenant a only)" in human.stderr, human.stderr
    assert "tenant a only (PANTHEON_TENANT)" in human.stderr
    assert f"seq {a_seq} TaskCompleted {a_id}" in human.stdout
    assert f"seq {b_seq} " not in human.stdout and b_id not in human.stdout
    assert "not checked" in human.stdout and "worker_capacity not checked" in human.stdout


# -- whatif ------------------------------------------------------------------------------------


def shared_workload() -> Workload:
    """One 1-slot worker of tenant a serving every tenant; at 0, a's task (medium) and b's
    (urgent), 10 s each: b's runs first. A worker of b's too small for either."""
    cpu1 = {"cpu": 1.0, "memory_mb": 0, "gpu": 0, "custom": {}}
    x = TaskRecord(("a", "x"), "x", 200, cpu1, False, 0.0,
                   attempts=[Attempt(10.0, 10.0, ("a", "w"))], outcome="completed",
                   ended=20.0)  # fmt: skip
    y = TaskRecord(("b", "y"), "y", 400, cpu1, False, 0.0,
                   attempts=[Attempt(0.0, 10.0, ("a", "w"))], outcome="completed",
                   ended=10.0)  # fmt: skip
    workers = [
        WorkerChange(0.0, "join", ("a", "w"), cpu1, 1, ("a", "*"), "i1"),
        WorkerChange(0.0, "join", ("b", "small"), {**cpu1, "cpu": 0.5}, 1, ("b",), "i1"),
    ]  # fmt: skip
    return Workload(None, 20.0, 8, 8, {x.key: x, y.key: y}, workers)


def test_whatif_for_one_tenant_simulates_every_tenant_and_reports_that_tenants_figures() -> None:
    workload = shared_workload()
    whole = compare(workload, PolicyFile())
    mine = compare(workload, PolicyFile(), "a")
    assert whole["tenant"] is None and mine["tenant"] == "a"
    for side in ("recorded", "simulated"):
        # a's task waited for b's urgent one: simulating a's arrivals alone would say 0 s
        assert mine[side]["wait"]["all"]["p50"] == 10.0
        assert list(mine[side]["wait"]["by_tenant"]) == ["a"]
        assert mine[side]["wait"]["by_tenant"]["a"] == whole[side]["wait"]["by_tenant"]["a"]
        assert (mine[side]["started"], mine[side]["not_started"]) == (1, 0)
        assert mine[side]["makespan"] == 20.0
        # a's 10 s of the 20 s of the one worker serving it (b's small worker left out)
        assert mine[side]["utilisation"]["cpu"] == 0.5
        assert whole[side]["utilisation"]["cpu"] == round(20 / 30, 6)
    assert mine["tasks"]["total"] == 1 and mine["tasks"]["workers"] == 1
    assert whole["tasks"]["total"] == 2 and whole["tasks"]["workers"] == 2
    assert mine["log"] == whole["log"]  # the same log read
    theirs = compare(workload, PolicyFile(), "b")
    assert theirs["simulated"]["wait"]["all"]["p50"] == 0.0
    assert theirs["simulated"]["makespan"] == 10.0


async def test_whatif_cli_with_a_tenant_narrows_the_report_not_the_simulation(
    cluster: Cluster, tmp_path: Path
) -> None:
    await record_mixed_workload(cluster)
    before = await quiet_log(cluster)
    policy = tmp_path / "fifo.yaml"
    policy.write_text("mode: fifo\n")
    where = ("--nats-url", cluster.url, "--namespace", cluster.root, "--data-dir",
             str(tmp_path / "d"), "--policy", str(policy), "--until-seq", str(before))  # fmt: skip
    full = await asyncio.to_thread(pantheon, "whatif", *where, "--json")
    other = await asyncio.to_thread(pantheon, "whatif", *where, "--json", "--tenant", "other")
    assert full.returncode == 0 and other.returncode == 0, (full.stderr, other.stderr)
    whole, mine = json.loads(full.stdout), json.loads(other.stdout)
    assert mine["tenant"] == "other" and whole["tenant"] is None
    assert mine["log"] == whole["log"]
    # "other" had every second task of each priority (record_mixed_workload)
    assert mine["tasks"]["total"] == LOW // 2 + URGENT // 2
    for side in ("recorded", "simulated"):
        assert list(mine[side]["wait"]["by_tenant"]) == ["other"]
        theirs = whole[side]["wait"]["by_tenant"]["other"]
        assert mine[side]["wait"]["by_tenant"] == {"other": theirs}
        assert mine[side]["wait"]["all"] == theirs
        assert mine[side]["started"] == mine["tasks"]["total"]
    table = await asyncio.to_thread(pantheon, "whatif", *where, env_tenant="other")
    assert table.returncode == 0, table.stderr
    assert "tenant other only (PANTHEON_TENANT)" in table.stderr
    assert "tenant other's figures" in table.stdout and "default" not in table.stdout


# -- snapshot ----------------------------------------------------------------------------------


async def test_snapshot_refuses_a_named_tenant_and_covers_every_tenant(
    stack: Stack, nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    await activity(stack, 3, "snap")
    head = await stack.store.last_seq()
    where = ("--nats-url", nats_server.url, "--namespace", stack.store.subjects.root,
             "--data-dir", str(tmp_path), "--json")  # fmt: skip

    named = await asyncio.to_thread(pantheon, "snapshot", *where, "--tenant", "default")
    assert named.returncode == 2 and named.stdout == ""
    assert "cannot be narrowed to tenant 'default'" in " ".join(named.stderr.split())
    from_env = await asyncio.to_thread(pantheon, "snapshot", *where, "--list", env_tenant="a")
    assert from_env.returncode == 0, from_env.stderr  # everyday PANTHEON_TENANT: ignored
    assert "PANTHEON_TENANT=a ignored" in from_env.stderr
    assert json.loads(from_env.stdout)["snapshots"] == []

    made = await asyncio.to_thread(pantheon, "snapshot", *where, "--tenant", "*", env_tenant="a")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["snapshot"]["last_seq"] == head
    assert await stack.store.last_seq() == head, "the tool never appends"
