"""Scheduler, leases and workers end to end on a real nats-server."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import pytest

from pantheon_es.errors import StaleLeaseError
from tests.conftest import Cluster, eventually, history, python


async def test_submitted_task_is_leased_run_and_completed_with_its_result(cluster: Cluster) -> None:
    await cluster.add_worker(worker_id="w1")
    submitted = await cluster.client.submit_task("add", python("add", a=2, b=3))

    done = await cluster.client.wait_for_task(submitted["task_id"], timeout=20)

    assert done["status"] == "completed" and done["result"] == 5
    assert done["attempt"] == 1 and done["started_at"] and done["finished_at"]
    assert done["started_at"] <= done["finished_at"]
    types = [e.type for e in await history(cluster, submitted["task_id"])]
    # A task this quick finishes before its worker reports the start: the start
    # travels in TaskCompleted (one append, not a 2-event batch).
    assert types == ["TaskSubmitted", "LeaseGranted", "TaskCompleted"]


async def test_longer_task_reports_its_start_as_its_own_event(cluster: Cluster) -> None:
    await cluster.add_worker(worker_id="w1")
    task_id = (await cluster.client.submit_task("s", python("sleep", seconds=0.3)))["task_id"]
    await cluster.client.wait_for_task(task_id, timeout=20)
    types = [e.type for e in await history(cluster, task_id)]
    assert types == ["TaskSubmitted", "LeaseGranted", "TaskStarted", "TaskCompleted"]


async def test_failing_task_records_the_error_type_and_message(cluster: Cluster) -> None:
    await cluster.add_worker(worker_id="w1")
    task_id = (await cluster.client.submit_task("fail", python("fail", message="nope")))["task_id"]
    done = await cluster.client.wait_for_task(task_id, timeout=20)
    assert done["status"] == "failed"
    assert (done["error"]["type"], done["error"]["message"]) == ("RuntimeError", "nope")


async def test_late_reports_with_a_stale_lease_are_refused_and_append_nothing(
    cluster: Cluster,
) -> None:
    await cluster.add_worker(worker_id="w1")
    task_id = (await cluster.client.submit_task("add", python("add", a=1, b=1)))["task_id"]
    await cluster.client.wait_for_task(task_id, timeout=20)
    granted = next(e for e in await history(cluster, task_id) if e.type == "LeaseGranted")
    assert cluster.node.store is not None
    before = await cluster.node.store.last_seq()
    lease = {"task_id": task_id, "lease_id": granted.data.lease_id, "fencing_token": 1}

    for verb, extra in (
        ("complete", {"result": 99}),
        ("heartbeat", {}),
        ("fail", {"error": {"type": "X"}}),
        ("start", {}),
    ):
        with pytest.raises(StaleLeaseError):
            await cluster.client.command("task", verb, {**lease, **extra})

    assert await cluster.node.store.last_seq() == before
    assert (await cluster.client.get_task(task_id))["result"] == 2


async def test_worker_slots_bound_concurrency_and_tasks_start_first_come_first_served(
    cluster: Cluster,
) -> None:
    await cluster.add_worker(worker_id="w1", slots=2)
    ids = [
        (await cluster.client.submit_task(f"s{i}", python("sleep", seconds=0.3)))["task_id"]
        for i in range(6)
    ]

    for task_id in ids:
        assert (await cluster.client.wait_for_task(task_id, timeout=30))["status"] == "completed"

    # Replay the log: never more than two leases live at once; granted in submission order.
    assert cluster.node.store is not None
    live, peak, grants = 0, 0, []
    async with cluster.node.store.feed(from_seq=1) as feed:
        end = await cluster.node.store.last_seq()
        seen = 0
        while seen < end:
            for raw in await feed.next_batch(timeout=5):
                seen = raw.seq
                kind = raw.data.split(b'"type":"', 1)[1].split(b'"', 1)[0].decode()
                if kind == "LeaseGranted":
                    live += 1
                    grants.append(raw.subject.rsplit(".", 1)[1])
                elif kind == "TaskCompleted":
                    live -= 1
                peak = max(peak, live)
    assert peak == 2
    assert grants == ids


async def test_inactivity_timeout_fires_at_its_deadline_and_stops_the_task(
    cluster: Cluster,
) -> None:
    worker = await cluster.add_worker(worker_id="w1")
    task_id = (
        await cluster.client.submit_task(
            "idle", python("sleep", seconds=60), inactivity_timeout=1.0
        )
    )["task_id"]

    done = await cluster.client.wait_for_task(task_id, timeout=20)

    assert done["status"] == "timed_out"
    timed_out = next(e for e in await history(cluster, task_id) if e.type == "TaskTimedOut")
    idle = (timed_out.occurred_at - timed_out.data.last_activity_at).total_seconds()
    assert 1.0 <= idle < 2.5, idle  # at the deadline, not on a poll interval
    await eventually(lambda: _not_running(worker, task_id))


async def _not_running(worker: Any, task_id: str) -> bool:
    return task_id not in worker.running


async def test_cancelling_a_running_task_stops_it_on_its_worker(cluster: Cluster) -> None:
    worker = await cluster.add_worker(worker_id="w1")
    task_id = (await cluster.client.submit_task("long", python("sleep", seconds=60)))["task_id"]
    await cluster.client.wait_for_task(task_id, timeout=20, statuses=frozenset({"running"}))

    await cluster.client.cancel_task(task_id, reason="enough")

    await eventually(lambda: _not_running(worker, task_id))
    state = await cluster.client.get_task(task_id)
    assert state["status"] == "cancelled" and state["lease_id"] is None


async def test_graceful_worker_shutdown_hands_the_lease_back_and_another_worker_finishes(
    cluster: Cluster,
) -> None:
    first = await cluster.add_worker(worker_id="w1", shutdown_timeout=0.2)
    task_id = (await cluster.client.submit_task("long", python("sleep", seconds=1.5)))["task_id"]
    await cluster.client.wait_for_task(task_id, timeout=20, statuses=frozenset({"running"}))

    first.request_stop()
    await asyncio.wait_for(first._runner, 15)
    await cluster.add_worker(worker_id="w2")
    done = await cluster.client.wait_for_task(task_id, timeout=20)

    assert done["status"] == "completed" and done["attempt"] == 2
    types = [e.type for e in await history(cluster, task_id)]
    assert "LeaseReleased" in types and types.count("TaskCompleted") == 1
    workers = {w["id"]: w["status"] for w in (await cluster.client.list_workers())["items"]}
    assert workers["w1"] == "stopped"


@pytest.mark.slow
async def test_worker_killed_mid_task_lease_expires_and_another_worker_completes_it_once(
    cluster: Cluster,
) -> None:
    procs = {wid: cluster.spawn_worker(wid) for wid in ("pw1", "pw2")}
    await eventually(lambda: _workers_active(cluster, 2), timeout=20)
    task_id = (await cluster.client.submit_task("slow", python("sleep", seconds=3)))["task_id"]
    running = await cluster.client.wait_for_task(
        task_id, timeout=20, statuses=frozenset({"running"})
    )
    victim = running["worker_id"]
    dead_lease = {
        "task_id": task_id,
        "lease_id": running["lease_id"],
        "fencing_token": running["fencing_token"],
    }

    os.kill(procs[victim].pid, signal.SIGKILL)  # kill -9 while the task runs

    done = await cluster.client.wait_for_task(task_id, timeout=30)
    assert done["status"] == "completed" and done["worker_id"] is None
    events = await history(cluster, task_id)
    types = [e.type for e in events]
    assert types.count("TaskCompleted") == 1
    assert "LeaseExpired" in types
    survivor_lease = [e for e in events if e.type == "LeaseGranted"][-1]
    assert survivor_lease.data.worker_id != victim and survivor_lease.data.fencing_token == 2
    # The dead worker's late report, replayed: refused, nothing appended.
    assert cluster.node.store is not None
    before = await cluster.node.store.last_seq()
    with pytest.raises(StaleLeaseError):
        await cluster.client.command("task", "complete", {**dead_lease, "result": "late"})
    assert await cluster.node.store.last_seq() == before
    # ... and the dead worker itself is declared lost by its timer.
    await eventually(lambda: _worker_status(cluster, victim, "lost"), timeout=15)


async def _workers_active(cluster: Cluster, n: int) -> bool:
    page = await cluster.client.list_workers(status=["active"])
    return int(page["total"]) >= n


async def _worker_status(cluster: Cluster, worker_id: str, status: str) -> bool:
    page = await cluster.client.list_workers()
    return any(w["id"] == worker_id and w["status"] == status for w in page["items"])


async def test_python_task_context_reports_progress_and_exchanges_messages(
    cluster: Cluster,
) -> None:
    await cluster.add_worker(worker_id="w1")
    listener = (await cluster.client.submit_task("listener", python("chat", expect=1)))["task_id"]
    talker = (await cluster.client.submit_task("talker", python("chat", to=listener)))["task_id"]

    listened = await cluster.client.wait_for_task(listener, timeout=20)
    talked = await cluster.client.wait_for_task(talker, timeout=20)

    assert listened["result"]["received"] == ["hello from python"]
    assert talked["status"] == "completed" and talked["progress"] == 1.0
    progressed = [e for e in await history(cluster, talker) if e.type == "TaskProgressed"]
    assert progressed and progressed[0].data.message == "half way"
    messages = (await cluster.client.list_messages(recipient=listener))["items"]
    assert [(m["sender"], m["priority"], m["status"]) for m in messages] == [
        (talker, "high", "read")
    ]
    assert messages[0]["delivered_at"] and messages[0]["read_at"]


async def test_scheduler_restart_rebuilds_the_live_set_from_read_models(cluster: Cluster) -> None:
    """No worker yet: tasks stay pending; a fresh scheduler finds them in the read models."""
    ids = [(await cluster.client.submit_task(f"p{i}", python("noop")))["task_id"] for i in range(3)]
    node = cluster.node
    # A worker registration (not a live worker: its tasks would not stay pending).
    for worker_id, batches in (("batching", True), ("plain", False)):
        await cluster.client.command(
            "worker",
            "register",
            {"worker_id": worker_id, "incarnation": "i1", "capacity": {"cpu": 0, "memory_mb": 0},
             "offer_batches": batches},
        )  # fmt: skip
    assert node.projector is not None and node.store is not None
    await node.projector.wait_for(await node.store.last_seq())
    from pantheon_es.scheduler import Scheduler

    fresh = Scheduler(node.nc, node.service, node.subjects)
    fresh.bootstrap(node.projector.db, node.projector.position, node.projector.position)
    assert {task_id for (_t, task_id) in fresh.tasks} >= set(ids)
    # What each worker takes comes back with it (offers in batches or alone).
    assert {k[1]: w.state.offer_batches for k, w in fresh.workers.items()} == {
        "batching": True,
        "plain": False,
    }
    queued = sorted(fresh.placement.jobs.values(), key=lambda job: job.rank)
    assert [job.key[1] for job in queued] == ids  # same priority: in submission order
