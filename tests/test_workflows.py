"""Workflows: validation (pure) and DAGs run end to end on the real stack."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from pantheon_es import ids
from pantheon_es import scheduler as scheduler_module
from pantheon_es.client import PantheonClient
from pantheon_es.embedded import EmbeddedNats
from pantheon_es.errors import InvalidError, NotFoundError
from pantheon_es.node import Node, NodeConfig
from pantheon_es.scheduler import growing_chunks, in_dependency_order
from pantheon_es.service import CommandService
from pantheon_es.store import EventStore
from pantheon_es.subjects import Subjects
from pantheon_es.workflows import (
    CreateWorkflow,
    NodeSpec,
    WorkflowNode,
    find_cycle,
    validate_graph,
)
from projections.projector import Projector, dump_tables
from tests.conftest import Cluster, FailingReads, eventually, python


def node(name: str, *deps: str, **extra: Any) -> dict[str, Any]:
    spec = extra.pop("executor", python("noop"))
    return {"name": name, "executor": spec, "depends_on": list(deps), **extra}


# -- validation, pure ---------------------------------------------------------------------------


def test_find_cycle_names_the_cycle_and_accepts_a_dag() -> None:
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"], "d": []}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": [], "b": ["a"], "c": ["a", "b"]}) is None
    deep = {f"n{i}": [f"n{i + 1}"] for i in range(20_000)}  # no recursion limit
    assert find_cycle(deep) is None
    deep["n20000"] = ["n0"]
    cycle = find_cycle(deep)
    assert cycle is not None and cycle[0] == cycle[-1] and len(cycle) == 20_002


@pytest.mark.parametrize(
    ("nodes", "message", "details"),
    [
        (
            [node("a", "c"), node("b", "a"), node("c", "b")],
            "cycle: a -> c -> b -> a",
            {"cycle": ["a", "c", "b", "a"]},
        ),
        ([node("a", "ghost")], "depends on 'ghost'", {"task": "a", "unknown_dependency": "ghost"}),
        ([node("a"), node("a")], "used twice", {"duplicate": "a"}),
        ([node("a", "a")], "depends on itself", {"cycle": ["a", "a"]}),
    ],
)
def test_invalid_graphs_are_refused_naming_the_culprit(
    nodes: list[dict[str, Any]], message: str, details: dict[str, Any]
) -> None:
    with pytest.raises(InvalidError) as refused:
        validate_graph([WorkflowNode.model_validate(n) for n in nodes])
    assert message in refused.value.message
    assert refused.value.details == details


# -- end to end ---------------------------------------------------------------------------------


async def started(cluster: Cluster, workflow_id: str) -> None:
    """Every task of the workflow exists (they are created just after the reply)."""

    async def check() -> bool:
        wf = await cluster.client.get_workflow(workflow_id, nodes=False)
        return wf["status"] != "created"

    await eventually(check, timeout=10)


async def test_cycle_is_refused_by_the_service_and_nothing_is_appended(cluster: Cluster) -> None:
    assert cluster.node.store is not None
    before = await cluster.node.store.last_seq()
    with pytest.raises(InvalidError) as refused:
        await cluster.client.create_workflow("loop", [node("a", "b"), node("b", "a")])
    assert "a -> b -> a" in refused.value.message
    assert await cluster.node.store.last_seq() == before


async def test_diamond_passes_results_to_dependents_in_python_and_shell(cluster: Cluster) -> None:
    await cluster.add_worker(worker_id="w1")
    shell = {"kind": "shell", "argv": ["sh", "-c", 'printf "%s|" "$PANTHEON_INPUT_LEFT"; '
                                                  'cat "$PANTHEON_INPUTS_FILE"']}  # fmt: skip
    created = await cluster.client.create_workflow(
        "diamond",
        [
            node("top", executor=python("emit", value=1)),
            node("left", "top", executor=python("emit", value=10)),
            node("right", "top", executor=python("emit", value=100)),
            node("join", "left", "right", executor=python("total")),
            node("show", "left", "right", executor=shell),
        ],
    )
    done = await cluster.client.wait_for_workflow(created["workflow_id"], timeout=30)
    assert done["status"] == "completed" and done["counts"] == {"completed": 5}
    by_name = {n["name"]: n for n in done["nodes"]}
    assert by_name["join"]["result"] == 110
    stdout = by_name["show"]["result"]["stdout_tail"]
    assert stdout.startswith("10|") and '"right":100' in stdout and '"left":10' in stdout


@pytest.mark.slow
async def test_thousand_node_layered_dag_completes_with_every_dependency_respected(
    cluster: Cluster,
) -> None:
    for i in range(2):
        await cluster.add_worker(worker_id=f"w{i}", slots=32)
    layers, width = 10, 100
    nodes = []
    for layer in range(layers):
        for i in range(width):
            deps = [] if layer == 0 else [f"L{layer - 1}-{i}", f"L{layer - 1}-{(i + 1) % width}"]
            nodes.append(
                node(f"L{layer}-{i}", *deps, executor=python("noop"), resources={"cpu": 0})
            )
    created = await cluster.client.create_workflow("layers", nodes)
    done = await cluster.client.wait_for_workflow(created["workflow_id"], timeout=120)
    assert done["status"] == "completed" and done["counts"] == {"completed": 1000}

    # From the log: every task's lease was granted after each dependency's completion.
    assert cluster.node.store is not None
    granted: dict[str, int] = {}
    completed: dict[str, int] = {}
    async with cluster.node.store.feed(from_seq=1) as feed:
        last = await cluster.node.store.last_seq()
        seen = 0
        while seen < last:
            for raw in await feed.next_batch(2000, timeout=10):
                seen = raw.seq
                from pantheon_es.events import decode_record

                record = decode_record(raw.data, raw.seq)
                if record.type == "LeaseGranted":
                    granted.setdefault(record.aggregate_id, record.seq)
                elif record.type == "TaskCompleted":
                    completed[record.aggregate_id] = record.seq
    tasks = created["tasks"]
    for n in nodes:
        for dep in n["depends_on"]:
            assert completed[tasks[dep]] < granted[tasks[n["name"]]], (dep, n["name"])


async def test_fail_fast_skips_dependents_and_cancels_the_rest(cluster: Cluster) -> None:
    await cluster.add_worker(worker_id="w1")
    created = await cluster.client.create_workflow(
        "ff",
        [
            node("slow", executor=python("sleep", seconds=30), resources={"cpu": 0.1}),
            node("bad", executor=python("fail", message="broken"), resources={"cpu": 0.1}),
            node("after-bad", "bad"),
            node("after-slow", "slow"),
        ],
        failure_policy="fail_fast",
    )
    done = await cluster.client.wait_for_workflow(created["workflow_id"], timeout=30)
    status = {n["name"]: n["status"] for n in done["nodes"]}
    assert status == {
        "slow": "cancelled",
        "bad": "failed",
        "after-bad": "skipped",
        "after-slow": "cancelled",
    }
    assert done["status"] == "failed"
    assert done["counts"] == {"cancelled": 2, "failed": 1, "skipped": 1}


async def test_continue_runs_what_does_not_depend_on_the_failure(cluster: Cluster) -> None:
    await cluster.add_worker(worker_id="w1")
    created = await cluster.client.create_workflow(
        "cont",
        [
            node("bad", executor=python("fail")),
            node("child", "bad"),
            node("grandchild", "child"),
            node("other"),
            node("after-other", "other"),
        ],
        failure_policy="continue",
    )
    done = await cluster.client.wait_for_workflow(created["workflow_id"], timeout=30)
    status = {n["name"]: n["status"] for n in done["nodes"]}
    assert status == {
        "bad": "failed",
        "child": "skipped",
        "grandchild": "skipped",
        "other": "completed",
        "after-other": "completed",
    }
    assert done["status"] == "failed"
    by_name = {n["name"]: n for n in done["nodes"]}
    assert "child ended skipped" in by_name["grandchild"]["error"]["message"]


async def test_a_node_whose_task_was_archived_shows_how_it_ended_also_after_a_rebuild(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Cleanup drops a task's row; its workflow still shows the node as it ended (it
    showed ``not_created``), counts it so, and a rebuild from the log agrees."""
    await cluster.add_worker(worker_id="w1")
    created = await cluster.client.create_workflow(
        "archived",
        [node("bad", executor=python("fail")), node("child", "bad"), node("other")],
        failure_policy="continue",
    )
    wf_id, tasks = created["workflow_id"], created["tasks"]
    done = await cluster.client.wait_for_workflow(wf_id, timeout=30)
    before = {n["name"]: n for n in done["nodes"]}
    for name in ("bad", "other"):  # child stays
        await cluster.client.archive_task(tasks[name], reason="cleanup")
    assert cluster.node.store is not None and cluster.node.projector is not None
    head = await cluster.node.store.last_seq()
    wf = await cluster.client.query("workflow", "get", {"workflow_id": wf_id, "min_seq": head})

    nodes = {n["name"]: n for n in wf["nodes"]}
    assert {k: n["status"] for k, n in nodes.items()} == {
        "bad": "failed", "child": "skipped", "other": "completed",
    }  # fmt: skip
    for name in ("bad", "other"):
        assert nodes[name]["archived_at"] is not None
        for field in ("attempt", "worker_id", "started_at", "finished_at"):
            assert nodes[name][field] == before[name][field], (name, field)
        assert nodes[name]["result"] is None and nodes[name]["error"] is None  # in the log only
    assert "archived_at" not in nodes["child"]
    assert wf["task_counts"] == {"failed": 1, "skipped": 1, "completed": 1}
    assert (wf["tasks_created"], wf["tasks_archived"]) == (3, 2)
    with pytest.raises(NotFoundError):  # the task itself is gone from the read models
        await cluster.client.get_task(tasks["bad"])

    # The read models rebuilt from the log are the live ones.
    assert await cluster.node.projector.wait_for(head)
    live = await dump_tables(cluster.node.db_path)
    assert len(live["archived_nodes"]) == 2
    rebuilt = Projector(cluster.node.store, tmp_path / "rebuilt.db", kv=False, batch_size=1)
    await rebuilt.open()
    assert await rebuilt.catch_up(head) == head
    await rebuilt.shutdown()
    assert await dump_tables(tmp_path / "rebuilt.db") == live


async def test_a_created_workflow_read_back_at_start_is_retried_when_the_read_fails(
    nats_server: EmbeddedNats,
    subjects: Subjects,
    store: EventStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A workflow created while no scheduler ran: the one that starts reads its nodes
    from the log, and a read that fails is tried again (as a redrive's reads are)
    instead of leaving the workflow ``created`` until the next start."""
    monkeypatch.setattr(scheduler_module, "_RETRY_DELAYS", (0.05, 0.1, 0.2))
    service = CommandService(store.nc, store)
    await service.start()
    try:
        command = CreateWorkflow.model_validate(
            {"name": "later", "tasks": [node("a"), node("b", "a")]}
        )
        wf_id = (await service.execute("default", command))["workflow_id"]
    finally:
        await service.shutdown()

    pnode = Node(NodeConfig(data_dir=tmp_path / "node", nats_url=nats_server.url,
                            root=subjects.root, workers=0, leader_ttl=0))  # fmt: skip
    await pnode.start()
    assert pnode.scheduler is not None and pnode.nc is not None
    shim = FailingReads.install(pnode.scheduler, {("workflow", wf_id): 2})
    runner = asyncio.create_task(pnode.run())
    try:
        client = PantheonClient(pnode.nc, subjects=subjects, timeout=10)

        async def running() -> dict[str, Any] | None:
            wf = await client.get_workflow(wf_id)
            return wf if wf["status"] == "running" else None

        wf = await eventually(running)
        assert wf["tasks_created"] == 2
        assert [failed for _, i, failed in shim.reads if i == wf_id] == [True, True, False]
    finally:
        pnode.request_stop()
        await asyncio.wait_for(runner, 30)


async def test_cancel_mid_run_leaves_nothing_running_and_no_lease_live(cluster: Cluster) -> None:
    worker = await cluster.add_worker(worker_id="w1")
    created = await cluster.client.create_workflow(
        "to cancel",
        [
            *(node(f"run{i}", executor=python("sleep", seconds=60), resources={"cpu": 0.1})
              for i in range(3)),
            node("later", "run0", "run1"),
        ],
    )  # fmt: skip
    tasks = created["tasks"]
    await started(cluster, created["workflow_id"])
    for i in range(3):
        await cluster.client.wait_for_task(
            tasks[f"run{i}"], timeout=10, statuses=frozenset({"running"})
        )
    await cluster.client.cancel_workflow(created["workflow_id"], reason="changed my mind")
    done = await cluster.client.wait_for_workflow(created["workflow_id"], timeout=30)
    assert done["status"] == "cancelled" and done["finished_at"] is not None
    assert done["cancel_requested_at"] <= done["finished_at"]
    assert {n["status"] for n in done["nodes"]} == {"cancelled"}
    for n in done["nodes"]:
        state = await cluster.client.get_task(n["task_id"])
        assert state["lease_id"] is None
    await eventually(lambda: _nothing_runs(worker), timeout=10)


async def _nothing_runs(worker: Any) -> bool:
    return not worker.running


def test_a_workflow_task_is_not_redriven_on_its_own() -> None:
    from dataclasses import replace
    from datetime import UTC, datetime

    from pantheon_es.domain import DecideContext
    from pantheon_es.errors import ConflictError
    from pantheon_es.specs import Resources
    from pantheon_es.tasks import RedriveTask, TaskState, TaskStatus, decide

    now = datetime.now(UTC)
    task_id = "01J0000000000000000000000A"
    state = TaskState(task_id=task_id, status=TaskStatus.FAILED, name="n", priority=200,
                      resources=Resources(), executor_kind="python", submitted_at=now,
                      last_activity_at=now, workflow_id="01J0000000000000000000000W")  # fmt: skip
    ctx = DecideContext("t", task_id, now)
    with pytest.raises(ConflictError) as refused:
        decide(state, RedriveTask(task_id=task_id), ctx)
    assert refused.value.details["workflow_id"] == "01J0000000000000000000000W"
    alone = decide(replace(state, workflow_id=None), RedriveTask(task_id=task_id), ctx)
    assert [type(e).__name__ for e in alone.events] == ["TaskRedriven"]


async def test_a_workflows_tasks_are_created_in_one_batch_and_again_harmlessly(
    cluster: Cluster,
) -> None:
    """Its tasks go in one atomic batch; creating them again (a restart before the
    workflow started) falls back to one by one, where existing tasks are no-ops."""
    store = cluster.node.store
    assert store is not None
    created = await cluster.client.create_workflow("again", [node("a"), node("b", "a")])
    workflow_id = created["workflow_id"]
    await started(cluster, workflow_id)  # no worker: both stay pending
    records = [await store.read_aggregate("default", "task", t) for t in created["tasks"].values()]
    first = [r[0].seq for r in records]
    assert max(first) - min(first) == 1  # neighbours in the log: one batch

    before = await store.last_seq()
    await cluster.node.scheduler._materialize("default", workflow_id)
    assert await store.last_seq() == before  # nothing submitted twice, started already

    # Some tasks exist and some do not (as after a crash between two batches): the
    # batch is refused whole, and one by one creates exactly the missing one.
    event = (await store.read_aggregate("default", "workflow", workflow_id))[0].event
    nodes = list(event.data.nodes)
    nodes[1] = nodes[1].model_copy(update={"task_id": ids.new_id()})
    partly = event.model_copy(update={"data": event.data.model_copy(update={"nodes": nodes})})
    await cluster.node.scheduler._materialize("default", workflow_id, partly)
    assert await store.last_seq() == before + 1
    missing = await store.read_aggregate("default", "task", nodes[1].task_id)
    assert [h.event.type for h in missing] == ["TaskSubmitted"]


def _node(task_id: str, *deps: str) -> NodeSpec:
    return NodeSpec(name=task_id.lower(), task_id=task_id, depends_on=list(deps), spec={})


def test_tasks_are_created_dependencies_first() -> None:
    # Listed in an order where dependents come before what they depend on.
    nodes = [_node("D", "B", "C"), _node("C", "A"), _node("B", "A"), _node("A"), _node("E")]
    order = [n.task_id for n in in_dependency_order(nodes)]
    assert order == ["A", "E", "C", "B", "D"]  # by depth, file order within a depth
    for i, task_id in enumerate(order):
        node = next(n for n in nodes if n.task_id == task_id)
        assert all(order.index(d) < i for d in node.depends_on)


def test_a_long_chain_is_ordered_without_recursion() -> None:
    chain = [_node("T0")] + [_node(f"T{i}", f"T{i - 1}") for i in range(1, 5000)]
    ordered = in_dependency_order(list(reversed(chain)))
    assert [n.task_id for n in ordered] == [n.task_id for n in chain]


def test_growing_chunks_cover_every_item_once() -> None:
    items = list(range(1000))
    chunks = list(growing_chunks(items, 50))
    assert [len(c) for c in chunks] == [50, 100, 200, 400, 250]
    assert [x for c in chunks for x in c] == items
    assert list(growing_chunks([], 50)) == []
    assert list(growing_chunks([1, 2, 3], 0)) == [[1], [2, 3]]
