"""A redrive of a whole workflow: decide (pure), end to end, after a restart, by the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pantheon_es.client import PantheonClient
from pantheon_es.domain import DecideContext
from pantheon_es.errors import ConflictError, NotFoundError
from pantheon_es.events import Event, EventData, decode_record, make_event
from pantheon_es.node import Node
from pantheon_es.specs import Resources
from pantheon_es.tasks import (
    RedriveWorkflowTask,
    TaskRedriven,
    TaskState,
    TaskStatus,
)
from pantheon_es.tasks import decide as decide_task
from pantheon_es.tasks import evolve as evolve_task
from pantheon_es.workflows import (
    CreateWorkflow,
    FinishWorkflow,
    RedriveWorkflow,
    WorkflowCancelRequested,
    WorkflowFinished,
    WorkflowRedriven,
    WorkflowStarted,
    WorkflowState,
    decide,
    evolve,
)
from projections.projector import Projector, dump_tables
from tests.conftest import Cluster, FailingReads, eventually, history, last_seq, python
from tests.test_cli import ROOT, pantheon_argv
from tools.audit import Auditor
from tools.invariants import InvariantChecker

WF = "01J0000000000000000000000W"
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _ctx(aggregate_id: str = WF) -> DecideContext:
    counter = iter(range(100))
    return DecideContext(
        "t", aggregate_id, NOW, new_id=lambda: f"01J00000000000000000000{next(counter):03d}"
    )


def _event(data: EventData, aggregate_id: str = WF) -> Event[Any]:
    return make_event(
        data,
        event_id="01J0000000000000000000000E",
        tenant="t",
        aggregate_id=aggregate_id,
        occurred_at=NOW,
        actor="test",
        correlation_id="c",
        causation_id=None,
    )


def _apply(state: WorkflowState | None, decision_events: Any) -> WorkflowState:
    for data in decision_events:
        state = evolve(state, _event(data))
    assert state is not None
    return state


def _created() -> tuple[WorkflowState, dict[str, str]]:
    """a -> b -> c, started."""
    command = CreateWorkflow.model_validate(
        {
            "name": "chain",
            "tasks": [
                {"name": "a", "executor": python("noop")},
                {"name": "b", "executor": python("noop"), "depends_on": ["a"]},
                {"name": "c", "executor": python("noop"), "depends_on": ["b"]},
            ],
        }
    )
    created = decide(None, command, _ctx())
    state = _apply(None, [*created.events, WorkflowStarted(tasks=3)])
    return state, created.result["tasks"]


def _finished(state: WorkflowState, tasks: dict[str, str], **outcome: str) -> WorkflowState:
    counts: dict[str, int] = {}
    for status in outcome.values():
        counts[status] = counts.get(status, 0) + 1
    not_completed = [tasks[n] for n, s in outcome.items() if s != "completed"]
    command = FinishWorkflow(workflow_id=WF, counts=counts, not_completed=not_completed)
    return _apply(state, decide(state, command, _ctx()).events)


# -- decide, pure -------------------------------------------------------------------------------


def test_a_failed_workflow_is_redriven_with_the_tasks_that_did_not_complete() -> None:
    state, tasks = _created()
    failed = _finished(state, tasks, a="completed", b="failed", c="skipped")
    assert failed.status == "failed" and failed.not_completed == (tasks["b"], tasks["c"])

    decision = decide(failed, RedriveWorkflow(workflow_id=WF, reason="fixed b"), _ctx())
    (event,) = decision.events
    assert isinstance(event, WorkflowRedriven)
    assert (event.redrive, event.previous_status, event.reason) == (1, "failed", "fixed b")
    assert event.tasks == [tasks["b"], tasks["c"]]
    assert decision.result == {
        "workflow_id": WF,
        "status": "running",
        "redrive": 1,
        "tasks": {"b": tasks["b"], "c": tasks["c"]},
    }
    running = _apply(failed, decision.events)
    assert (running.status, running.finished_at, running.redrives) == ("running", None, 1)
    assert not running.finished and running.not_completed is None

    # It fails again: the second redrive is number 2 and names what did not complete then.
    again = _finished(running, tasks, a="completed", b="completed", c="failed")
    second = decide(again, RedriveWorkflow(workflow_id=WF), _ctx())
    assert [(e.redrive, e.tasks) for e in second.events] == [(2, [tasks["c"]])]  # type: ignore[attr-defined]


def test_a_cancelled_workflow_is_redriven_and_is_no_longer_cancelling() -> None:
    state, tasks = _created()
    cancelling = _apply(state, [WorkflowCancelRequested(reason="oops")])
    cancelled = _finished(cancelling, tasks, a="completed", b="cancelled", c="cancelled")
    assert cancelled.status == "cancelled"
    decision = decide(cancelled, RedriveWorkflow(workflow_id=WF), _ctx())
    running = _apply(cancelled, decision.events)
    assert running.status == "running" and not running.cancel_requested


@pytest.mark.parametrize("when", ["running", "cancelling", "completed", "legacy", "all-done"])
def test_redrive_is_refused_with_conflict_unless_failed_or_cancelled(when: str) -> None:
    state, tasks = _created()
    if when == "cancelling":
        state = _apply(state, [WorkflowCancelRequested()])
    elif when == "completed":
        state = _finished(state, tasks, a="completed", b="completed", c="completed")
    elif when == "legacy":  # finished before WorkflowFinished named the tasks
        state = _apply(state, [WorkflowFinished(status="failed", counts={"failed": 3})])
    elif when == "all-done":  # cancelled after every task had completed
        state = _apply(state, [WorkflowCancelRequested()])
        state = _finished(state, tasks, a="completed", b="completed", c="completed")
        assert state.status == "cancelled"
    with pytest.raises(ConflictError) as refused:
        decide(state, RedriveWorkflow(workflow_id=WF), _ctx())
    assert refused.value.details["workflow_id"] == WF


def test_redrive_of_an_unknown_workflow_is_not_found() -> None:
    with pytest.raises(NotFoundError):
        decide(None, RedriveWorkflow(workflow_id=WF), _ctx())


def _node(status: TaskStatus, **extra: Any) -> TaskState:
    return TaskState(task_id="01J0000000000000000000000A", status=status, name="b", priority=200,
                     resources=Resources(), executor_kind="python", submitted_at=NOW,
                     last_activity_at=NOW, workflow_id=WF, attempt=1, **extra)  # fmt: skip


@pytest.mark.parametrize(
    "status", [TaskStatus.FAILED, TaskStatus.TIMED_OUT, TaskStatus.CANCELLED, TaskStatus.SKIPPED]
)
def test_a_node_is_brought_back_once_per_redrive(status: TaskStatus) -> None:
    state = _node(status)
    command = RedriveWorkflowTask(
        task_id=state.task_id, workflow_id=WF, redrive=1, waiting_for=["01J0000000000000000000000B"]
    )
    decision = decide_task(state, command, _ctx(state.task_id))
    (event,) = decision.events
    assert isinstance(event, TaskRedriven)
    assert (event.previous_status, event.workflow_redrive) == (status.value, 1)
    assert event.waiting_for == ["01J0000000000000000000000B"]
    back = evolve_task(state, _event(event, state.task_id))
    assert (back.status, back.workflow_redrive, back.attempts_base) == (TaskStatus.PENDING, 1, 1)

    # The same redrive again (a restart mid-redrive), even after it ended again: nothing.
    for again in (back, replace(back, status=TaskStatus.FAILED)):
        assert decide_task(again, command, _ctx(state.task_id)).events == []
    # The next redrive brings it back again.
    nxt = command.model_copy(update={"redrive": 2})
    assert len(decide_task(replace(back, status=status), nxt, _ctx(state.task_id)).events) == 1


def test_a_completed_archived_or_foreign_node_is_not_brought_back() -> None:
    command = RedriveWorkflowTask(
        task_id=_node(TaskStatus.FAILED).task_id, workflow_id=WF, redrive=1
    )
    ctx = _ctx(command.task_id)
    assert decide_task(_node(TaskStatus.COMPLETED), command, ctx).events == []
    assert decide_task(_node(TaskStatus.RUNNING), command, ctx).events == []
    archived = decide_task(_node(TaskStatus.FAILED, archived=True), command, ctx)
    assert archived.events == [] and archived.result["archived"] is True
    with pytest.raises(ConflictError):
        decide_task(replace(_node(TaskStatus.FAILED), workflow_id="01J0000000000000000000000X"),
                    command, ctx)  # fmt: skip


# -- end to end ---------------------------------------------------------------------------------


def chain(calls: Path) -> list[dict[str, Any]]:
    """a -> b -> c: b fails on its first call (no retry policy: for good), c adds its inputs."""
    return [
        {"name": "a", "executor": python("emit", value=1)},
        {"name": "b", "executor": python("flaky", path=str(calls), failures=1),
         "depends_on": ["a"]},
        {"name": "c", "executor": python("total"), "depends_on": ["b"]},
    ]  # fmt: skip


async def _failed_chain(cluster: Cluster, tmp_path: Path) -> dict[str, Any]:
    created = await cluster.client.create_workflow("chain", chain(tmp_path / "calls"))
    failed = await cluster.client.wait_for_workflow(created["workflow_id"], timeout=30)
    assert failed["status"] == "failed"
    assert {n["name"]: n["status"] for n in failed["nodes"]} == {
        "a": "completed",
        "b": "failed",
        "c": "skipped",
    }
    return created


async def _workflow(cluster: Cluster, workflow_id: str, min_seq: int = 0) -> dict[str, Any]:
    return await cluster.client.query(
        "workflow", "get", {"workflow_id": workflow_id, "min_seq": min_seq}
    )


async def _ended_again(cluster: Cluster, workflow_id: str, status: str) -> dict[str, Any]:
    async def check() -> dict[str, Any]:
        wf = await _workflow(cluster, workflow_id)
        return wf if wf["redrives"] >= 1 and wf["status"] == status else {}

    return await eventually(check, timeout=30)


async def _log(cluster: Cluster) -> list[Any]:
    assert cluster.node.store is not None
    out: list[Any] = []
    last = await cluster.node.store.last_seq()
    async with cluster.node.store.feed(from_seq=1) as feed:
        while not out or out[-1].seq < last:
            out += [decode_record(r.data, r.seq) for r in await feed.next_batch(1000, timeout=10)]
    return out


async def test_a_redriven_chain_reruns_what_failed_and_keeps_what_completed(
    cluster: Cluster, tmp_path: Path
) -> None:
    await cluster.add_worker(worker_id="w1")
    created = await _failed_chain(cluster, tmp_path)
    wf_id, tasks = created["workflow_id"], created["tasks"]

    reply = await cluster.client.redrive_workflow(wf_id, reason="fixed b")
    assert reply["status"] == "running" and reply["redrive"] == 1
    assert reply["tasks"] == {"b": tasks["b"], "c": tasks["c"]}

    done = await _ended_again(cluster, wf_id, "completed")
    by_name = {n["name"]: n for n in done["nodes"]}
    assert {n: by_name[n]["status"] for n in "abc"} == dict.fromkeys("abc", "completed")
    assert (by_name["a"]["attempt"], by_name["b"]["attempt"], by_name["c"]["attempt"]) == (1, 2, 1)
    assert by_name["b"]["result"] == 2 and by_name["c"]["result"] == 2  # c got b's new result
    assert done["counts"] == {"completed": 3}
    assert done["last_redrive"]["tasks"] == [tasks["b"], tasks["c"]]
    assert done["last_redrive"]["previous_status"] == "failed"
    assert done["last_redrive"]["previous_counts"] == {"completed": 1, "failed": 1, "skipped": 1}

    # a ran once and was not brought back; b and c were, b first.
    assert "TaskRedriven" not in [e.type for e in await history(cluster, tasks["a"])]
    assert [e.type for e in await history(cluster, tasks["c"])] == [
        "TaskSubmitted", "TaskSkipped", "TaskRedriven", "LeaseGranted", "TaskCompleted",
    ]  # fmt: skip
    log = await _log(cluster)
    seq = {(r.aggregate_id, r.type): r.seq for r in log}  # the last of each
    assert seq[(tasks["b"], "TaskRedriven")] < seq[(tasks["c"], "TaskRedriven")]
    assert seq[(tasks["b"], "TaskCompleted")] < seq[(tasks["c"], "LeaseGranted")]
    workflow_types = [r.type for r in log if r.aggregate_id == wf_id]
    assert workflow_types == ["WorkflowCreated", "WorkflowStarted", "WorkflowFinished",
                              "WorkflowRedriven", "WorkflowFinished"]  # fmt: skip

    # The history keeps every invariant (a redrive between terminal events is allowed).
    checker = InvariantChecker()
    checker.feed(log)
    assert checker.violations == []
    # The audit reads it: b's two attempts, and the redrive in the workflow's timeline.
    report = await Auditor(cluster.client).audit(wf_id)
    b = report.tasks[tasks["b"]]
    assert [a.outcome for a in b.attempts] == ["failed", "completed"] and b.error is None
    assert "WorkflowRedriven" in [r["type"] for r in report.event_rows()]

    # A rebuild from the log, one event per batch or all in one, gives the live read models.
    store, projector = cluster.node.store, cluster.node.projector
    assert store is not None and projector is not None
    head = await store.last_seq()
    assert await projector.wait_for(head)
    live = await dump_tables(cluster.node.db_path)
    for size in (1, 10_000):
        rebuilt = Projector(store, tmp_path / f"b{size}.db", kv=False, batch_size=size)
        await rebuilt.open()
        assert await rebuilt.catch_up(head) == head
        await rebuilt.shutdown()
        dump = await dump_tables(tmp_path / f"b{size}.db")
        assert (dump["workflows"], dump["tasks"]) == (live["workflows"], live["tasks"])


async def test_a_cancelled_workflow_redriven_runs_what_was_cancelled_to_completion(
    cluster: Cluster,
) -> None:
    await cluster.add_worker(worker_id="w1")
    created = await cluster.client.create_workflow(
        "cancel me",
        [
            {"name": "a", "executor": python("emit", value=1)},
            {"name": "b", "executor": python("sleep", seconds=1.5), "depends_on": ["a"]},
            {"name": "c", "executor": python("total"), "depends_on": ["b"]},
        ],
    )
    wf_id, tasks = created["workflow_id"], created["tasks"]
    await eventually(lambda: _status_is(cluster, wf_id, "running"))  # its tasks exist
    await cluster.client.wait_for_task(tasks["b"], timeout=10, statuses=frozenset({"running"}))
    await cluster.client.cancel_workflow(wf_id, reason="not now")
    cancelled = await cluster.client.wait_for_workflow(wf_id, timeout=30)
    assert cancelled["status"] == "cancelled"
    assert [n["status"] for n in cancelled["nodes"]] == ["completed", "cancelled", "cancelled"]

    reply = await cluster.client.redrive_workflow(wf_id, reason="now")
    assert reply["tasks"] == {"b": tasks["b"], "c": tasks["c"]}
    done = await _ended_again(cluster, wf_id, "completed")
    assert done["cancel_requested_at"] is None and done["last_redrive"]["previous_status"] == (
        "cancelled"
    )
    by_name = {n["name"]: n for n in done["nodes"]}
    assert by_name["c"]["result"] == 1.5 and by_name["a"]["attempt"] == 1


async def test_redrive_of_a_completed_running_or_unknown_workflow_appends_nothing(
    cluster: Cluster,
) -> None:
    # No worker: the first workflow stays running.
    running = await cluster.client.create_workflow(
        "waits", [{"name": "a", "executor": python("noop")}]
    )
    await eventually(lambda: _status_is(cluster, running["workflow_id"], "running"))
    before = await last_seq(cluster)
    with pytest.raises(ConflictError) as refused:
        await cluster.client.redrive_workflow(running["workflow_id"])
    assert refused.value.details["status"] == "running"
    with pytest.raises(NotFoundError):
        await cluster.client.redrive_workflow("01J99999999999999999999999")
    assert await last_seq(cluster) == before

    await cluster.add_worker(worker_id="w1")
    done = await cluster.client.wait_for_workflow(running["workflow_id"], timeout=30)
    assert done["status"] == "completed"
    before = await last_seq(cluster)
    with pytest.raises(ConflictError) as refused:
        await cluster.client.redrive_workflow(running["workflow_id"], reason="again?")
    assert refused.value.details["status"] == "completed"
    assert await last_seq(cluster) == before


async def _status_is(cluster: Cluster, workflow_id: str, status: str) -> bool:
    return bool((await _workflow(cluster, workflow_id))["status"] == status)


async def test_a_scheduler_restarted_mid_redrive_finishes_it_and_twice_changes_nothing(
    cluster: Cluster, tmp_path: Path
) -> None:
    from pantheon_es.scheduler import Scheduler

    node = cluster.node
    assert node.projector is not None and node.store is not None and node.service is not None
    first = await cluster.add_worker(worker_id="w1")
    created = await _failed_chain(cluster, tmp_path)
    wf_id, tasks = created["workflow_id"], created["tasks"]
    first.request_stop()
    await asyncio.wait_for(first._runner, 15)  # no worker until the restart

    # The node's scheduler stands by (as a crashed one would do nothing): the redrive is
    # recorded and only b is brought back, as if it crashed after that one decision.
    original = node.scheduler.leadership
    node.scheduler.leadership = SimpleNamespace(is_leader=False, epoch=None)
    fresh: Scheduler | None = None
    runner: asyncio.Task[None] | None = None
    try:
        reply = await cluster.client.redrive_workflow(wf_id)
        b_back = RedriveWorkflowTask(task_id=tasks["b"], workflow_id=wf_id, redrive=1)
        assert (await node.service.execute("default", b_back))["changed"] is True
        await node.projector.wait_for(await node.store.last_seq())
        mid = await _workflow(cluster, wf_id, reply["seq"])
        nodes = {n["name"]: n["status"] for n in mid["nodes"]}
        assert mid["status"] == "running" and nodes == {"a": "completed", "b": "pending",
                                                        "c": "skipped"}  # fmt: skip

        # A fresh scheduler starts from the read models: b is live, c still to bring back.
        fresh = Scheduler(node.nc, node.service, node.subjects, node.scheduler.config)
        fresh.bootstrap(node.projector.db, node.projector.position, node.projector.position)
        live = fresh.workflows[("default", wf_id)]
        assert live.redriving == {tasks["c"]} and set(live.outcome) == {tasks["a"]}
        assert ("default", tasks["b"]) in fresh.tasks
        node.projector.sinks.append(fresh.feed)
        runner = asyncio.create_task(fresh.run())

        async def c_waits() -> bool:
            c = await cluster.client.get_task(tasks["c"])
            return bool(c["status"] == "pending" and c["blocked_reason"] == "dependency_unmet")

        await eventually(c_waits)
        # Deciding the redrive of a node again changes nothing.
        before = await last_seq(cluster)
        again = await node.service.execute("default", b_back)
        assert again["changed"] is False and await last_seq(cluster) == before

        await cluster.add_worker(worker_id="w2")
        done = await _ended_again(cluster, wf_id, "completed")
        assert {n["name"]: n["attempt"] for n in done["nodes"]} == {"a": 1, "b": 2, "c": 1}
        for task_id in tasks.values():
            redriven = [e for e in await history(cluster, task_id) if e.type == "TaskRedriven"]
            assert len(redriven) == (0 if task_id == tasks["a"] else 1)
    finally:
        if fresh is not None:
            node.projector.sinks.remove(fresh.feed)
            await fresh.shutdown()
        if runner is not None:
            await asyncio.wait_for(runner, 10)
        node.scheduler.leadership = original


async def test_a_standby_that_failed_to_read_a_redrive_back_finishes_it_when_it_leads(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The standby's read-back of a redriven workflow fails (a standby tries once); the
    leader brings the nodes back but stops before they run. The standby, now leader,
    reads the workflow back and finishes the redrive, dependencies first (it used to hold
    no such workflow until a restart, and let c run without waiting for b)."""
    worker = await cluster.add_worker(worker_id="w1")
    created = await _failed_chain(cluster, tmp_path)
    wf_id, tasks = created["workflow_id"], created["tasks"]
    worker.request_stop()  # nothing runs until the standby leads
    await asyncio.wait_for(worker._runner, 15)

    leader = cluster.node
    standby = Node(replace(leader.config, data_dir=tmp_path / "standby"))
    await standby.start()
    standby_run = asyncio.create_task(standby.run())
    try:
        assert standby.scheduler is not None and standby.nc is not None
        assert leader.scheduler is not None and leader.scheduler.active
        assert not standby.scheduler.active
        shim = FailingReads.install(standby.scheduler, {("workflow", wf_id): -1})
        await cluster.client.redrive_workflow(wf_id, reason="fixed b")

        async def brought_back() -> bool:
            return [len(await _redriven(cluster, tasks[n])) for n in "bc"] == [1, 1]

        await eventually(brought_back)
        assert ("workflow", wf_id, True) in shim.reads
        key = ("default", wf_id)
        assert await eventually(lambda: _true(key in standby.scheduler._unread_workflows))
        shim.fail.clear()  # the log reads well again

        leader.request_stop()  # resigns: the standby takes over at once
        cluster.node = standby

        async def leading() -> bool:
            return bool(standby.scheduler and standby.scheduler.active)

        await eventually(leading, timeout=15)
        cluster.client = PantheonClient(standby.nc, subjects=standby.subjects, timeout=15)
        await cluster.add_worker(worker_id="w2")
        done = await _ended_again(cluster, wf_id, "completed")
        assert {n["name"]: n["attempt"] for n in done["nodes"]} == {"a": 1, "b": 2, "c": 1}
        for name in "abc":
            assert len(await _redriven(cluster, tasks[name])) == (name != "a")
        log = await _log(cluster)
        seq = {(r.aggregate_id, r.type): r.seq for r in log}  # the last of each
        assert seq[(tasks["b"], "TaskCompleted")] < seq[(tasks["c"], "LeaseGranted")]
        workflow_types = [r.type for r in log if r.aggregate_id == wf_id]
        assert workflow_types[-2:] == ["WorkflowRedriven", "WorkflowFinished"]
    finally:
        cluster.node = leader  # the fixture stops it (stopped already)
        standby.request_stop()
        await asyncio.wait_for(standby_run, 30)


async def _redriven(cluster: Cluster, task_id: str) -> list[Any]:
    return [e for e in await history(cluster, task_id) if e.type == "TaskRedriven"]


async def _true(value: bool) -> bool:
    return value


def workflow_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``pantheon workflow ARGS...`` in a fresh process, without PANTHEON_* env."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PANTHEON_")}
    return subprocess.run(
        [*pantheon_argv(), "workflow", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
    )


async def test_pantheon_workflow_redrive_runs_it_again_and_a_second_one_is_refused(
    cluster: Cluster, tmp_path: Path
) -> None:
    await cluster.add_worker(worker_id="w1")
    created = await _failed_chain(cluster, tmp_path)
    wf_id = created["workflow_id"]
    where = ("--nats-url", cluster.url, "--namespace", cluster.root)

    done = await asyncio.to_thread(
        workflow_cli, "redrive", wf_id, "--reason", "fixed b", "--json", *where
    )
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply["status"] == "running" and sorted(reply["tasks"]) == ["b", "c"]
    final = await _ended_again(cluster, wf_id, "completed")
    assert final["last_redrive"]["reason"] == "fixed b"

    refused = await asyncio.to_thread(workflow_cli, "redrive", wf_id, *where)
    assert refused.returncode == 1 and "conflict" in refused.stderr and refused.stdout == ""
    shown = await asyncio.to_thread(workflow_cli, "show", wf_id, *where)
    assert shown.returncode == 0 and "completed" in shown.stdout and "redriven 1x" in shown.stdout
    usage = await asyncio.to_thread(workflow_cli, "redrive", *where)
    assert usage.returncode == 2
