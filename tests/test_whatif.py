"""`pantheon whatif` against a real cluster: a recorded mixed workload under FIFO and under
priority with aging, read from the log without appending anything."""

from __future__ import annotations

import asyncio
import json
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Any

from pantheon_es.client import PantheonClient
from pantheon_es.placement import Policy
from tests.conftest import Cluster, history, python
from tests.test_cli import ROOT, pantheon_argv
from tools.whatif import read_workload, recorded, simulate

LOW, URGENT = 10, 3


def whatif(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    """``pantheon whatif`` in its own process, as a user runs it."""
    return subprocess.run(
        [*pantheon_argv(), "whatif", "--nats-url", cluster.url, "--namespace", cluster.root,
         "--data-dir", str(cluster.data_dir), *args],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip


def report(cluster: Cluster, policy: Path, *args: str) -> dict[str, Any]:
    result = whatif(cluster, "--policy", str(policy), "--json", *args)
    assert result.returncode == 0, result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)  # one JSON document and nothing else
    return doc


async def record_mixed_workload(cluster: Cluster) -> list[str]:
    """Two tenants on one shared 2-slot worker: many low-priority tasks, then a few urgent."""
    await cluster.add_worker(
        worker_id="shared",
        slots=2,
        capacity={"cpu": 2.0, "memory_mb": 2048, "gpu": 0, "custom": {}},
        serve_tenants=["*"],
    )
    other = PantheonClient(cluster.node.nc, tenant="other", subjects=cluster.node.subjects)
    clients = [cluster.client, other]
    ids: list[tuple[PantheonClient, str]] = []
    for priority, count in (("low", LOW), ("urgent", URGENT)):
        for i in range(count):
            c = clients[i % 2]
            r = await c.submit_task(
                f"{priority}{i}",
                python("sleep", seconds=0.25),
                priority=priority,
                resources={"cpu": 1, "memory_mb": 256},
            )
            ids.append((c, r["task_id"]))
    for c, task_id in ids:
        assert (await c.wait_for_task(task_id, timeout=60))["status"] == "completed"
    return [task_id for _c, task_id in ids]


async def quiet_log(cluster: Cluster) -> int:
    """Stop the workers (their renewals move the log on); the log's last sequence then."""
    for worker in cluster.workers:
        worker.request_stop()
        await asyncio.wait_for(worker._runner, 15)
    cluster.workers.clear()
    assert cluster.node.store is not None
    return int(await cluster.node.store.last_seq())


async def test_whatif_fifo_versus_priority_aging_shows_urgent_waits_and_appends_nothing(
    cluster: Cluster, tmp_path: Path
) -> None:
    await record_mixed_workload(cluster)
    store = cluster.node.store
    assert store is not None
    before = await quiet_log(cluster)

    fifo_file = tmp_path / "fifo.yaml"
    fifo_file.write_text("mode: fifo\n")
    aging_file = ROOT / "examples" / "whatif-aging.yaml"
    until = ["--until-seq", str(before)]
    fifo = await asyncio.to_thread(report, cluster, fifo_file, *until)
    aging = await asyncio.to_thread(report, cluster, aging_file, *until)

    # what really happened is the same in both reports, and complete
    assert fifo["recorded"] == aging["recorded"]
    assert fifo["log"]["last_seq"] == before
    rec = fifo["recorded"]
    assert rec["wait"]["by_priority"]["low"]["count"] == LOW
    assert rec["wait"]["by_priority"]["urgent"]["count"] == URGENT
    assert set(rec["wait"]["by_tenant"]) == {"default", "other"}
    assert fifo["tasks"]["total"] == LOW + URGENT and fifo["tasks"]["estimated_duration"] == 0
    assert 0 < rec["utilisation"]["cpu"] <= 1 and rec["makespan"] > 0

    # every task runs in both simulations
    for doc in (fifo, aging):
        assert doc["simulated"]["started"] == LOW + URGENT
        assert doc["simulated"]["not_started"] == 0
        assert 0 < doc["simulated"]["utilisation"]["cpu"] <= 1
    # FIFO keeps the urgent tasks behind every low one; priority runs them first
    f_urgent = fifo["simulated"]["wait"]["by_priority"]["urgent"]
    a_urgent = aging["simulated"]["wait"]["by_priority"]["urgent"]
    assert f_urgent["count"] == a_urgent["count"] == URGENT
    assert a_urgent["p50"] < f_urgent["p50"] and a_urgent["max"] < f_urgent["max"]
    assert a_urgent["p90"] < f_urgent["p90"]
    # ... which the low tasks pay for, a little
    assert (
        aging["simulated"]["wait"]["by_priority"]["low"]["max"]
        >= (fifo["simulated"]["wait"]["by_priority"]["low"]["max"])
    )

    # the table form names both sides
    table = await asyncio.to_thread(whatif, cluster, "--policy", str(aging_file), *until)
    assert table.returncode == 0, table.stderr
    assert "priority+aging" in table.stdout and "recorded" in table.stdout
    assert "urgent" in table.stdout and "makespan" in table.stdout

    # nothing was appended to the live log
    assert await store.last_seq() == before


async def test_whatif_with_a_bad_policy_file_exits_2_naming_the_field(
    cluster: Cluster, tmp_path: Path
) -> None:
    store = cluster.node.store
    assert store is not None
    before = await store.last_seq()
    bad = tmp_path / "bad.yaml"
    for text, field in (
        ("mode: lifo\n", "mode"),
        ("aging_per_s: 1\nagingg: 2\n", "agingg"),
        ("tenant_weights: {a: 0}\n", "tenant_weights.a"),
    ):
        bad.write_text(text)
        result = await asyncio.to_thread(whatif, cluster, "--policy", str(bad))
        assert result.returncode == 2, result.stderr
        assert field in result.stderr and result.stdout == ""
    result = await asyncio.to_thread(
        whatif, cluster, "--policy", str(tmp_path / "missing.yaml"), "--json"
    )
    assert result.returncode == 2 and "missing.yaml" in result.stderr
    assert await store.last_seq() == before


async def test_recorded_dependencies_and_retries_come_back_from_the_log_and_shape_the_simulation(
    cluster: Cluster,
) -> None:
    await cluster.add_worker(worker_id="w1", slots=4)
    created = await cluster.client.create_workflow(
        "pair",
        [
            {"name": "first", "executor": python("sleep", seconds=0.3)},
            {"name": "second", "executor": python("noop"), "depends_on": ["first"]},
        ],
    )
    done = await cluster.client.wait_for_workflow(created["workflow_id"], timeout=30)
    assert done["status"] == "completed"
    flaky = await cluster.client.submit_task(
        "flaky",
        python("fail"),
        options={"retry": {"max_attempts": 2, "initial_interval": 0.5, "jitter": 0}},
    )
    failed = await cluster.client.wait_for_task(flaky["task_id"], timeout=30)
    assert failed["status"] == "failed"
    store = cluster.node.store
    assert store is not None
    before = await quiet_log(cluster)

    workload = await read_workload(store, until_seq=before)
    flaky_submit = (await history(cluster, flaky["task_id"]))[0].occurred_at
    earlier = await read_workload(store, until=flaky_submit - timedelta(microseconds=1))
    assert set(earlier.tasks) == set(workload.tasks) - {("default", flaky["task_id"])}
    assert earlier.last_seq < workload.last_seq
    first, second = (("default", created["tasks"][n]) for n in ("first", "second"))
    retried = workload.tasks[("default", flaky["task_id"])]
    assert workload.tasks[second].depends_on == (first[1],)
    assert len(retried.attempts) == 2 and retried.outcome == "failed"
    assert 0.45 <= retried.attempts[0].gap <= 0.6  # RetryScheduled's not_before, as recorded
    assert workload.tasks[first].attempts[0].duration >= 0.3
    # what happened: the dependent was ready when its dependency ended, not at its submit
    real = recorded(workload)
    assert real.ready[second] == workload.tasks[first].ended
    assert real.ready[second] > workload.tasks[second].submitted

    sim = simulate(workload, Policy(fifo=True))
    first_run = next(r for r in sim.runs if r.key == first)
    assert sim.ready[second] == first_run.end and sim.first_start[second] >= first_run.end
    tries = sorted((r for r in sim.runs if r.key == retried.key), key=lambda r: r.start)
    assert [r.attempt for r in tries] == [0, 1]
    assert tries[1].start >= tries[0].end + retried.attempts[0].gap - 1e-9
    assert await store.last_seq() == before
