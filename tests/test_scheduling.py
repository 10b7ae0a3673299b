"""The scheduler's policy on the real stack: limits, backpressure, retries, timeouts, why."""

from __future__ import annotations

import asyncio
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from pantheon_es.errors import OverloadedError, UnschedulableError
from tests.conftest import (
    Cluster,
    eventually,
    history,
    last_seq,
    python,
    pythonpath_env,
    quota,
)

ROOT = Path(__file__).resolve().parents[1]


def at(event: Any) -> datetime:
    return event.occurred_at  # type: ignore[no-any-return]


async def test_concurrency_key_with_limit_two_runs_ten_tasks_never_more_than_two_at_once(
    cluster: Cluster,
) -> None:
    await cluster.add_worker(worker_id="w1", slots=16)
    ids = [
        (
            await cluster.client.submit_task(
                f"t{i}",
                python("sleep", seconds=0.2),
                resources={"cpu": 0.1},
                options={"concurrency_key": "db", "concurrency_limit": 2},
            )
        )["task_id"]
        for i in range(10)
    ]
    for task_id in ids:
        assert (await cluster.client.wait_for_task(task_id, timeout=30))["status"] == "completed"

    # From the log: a lease is live from LeaseGranted to the task's finish.
    assert cluster.node.store is not None
    changes: list[tuple[int, int]] = []
    blocked = 0
    for task_id in ids:
        for h in await cluster.node.store.read_aggregate("default", "task", task_id):
            if h.event.type == "LeaseGranted":
                changes.append((h.seq, +1))
            elif h.event.type == "TaskCompleted":
                changes.append((h.seq, -1))
            elif h.event.type == "TaskBlocked":
                assert h.event.data.reason == "concurrency_key_full"
                blocked += 1
    live = peak = 0
    for _seq, delta in sorted(changes):
        live += delta
        peak = max(peak, live)
    assert peak == 2
    assert blocked >= 1  # the waiting ones said why, once each at most
    assert blocked <= 8


@pytest.mark.policy(default_quota=quota(max_pending=3))
async def test_backpressure_refuses_past_the_bound_with_retry_after_and_recovers(
    cluster: Cluster,
) -> None:
    ids = [(await cluster.client.submit_task(f"p{i}", python("noop")))["task_id"] for i in range(3)]
    before = await last_seq(cluster)
    with pytest.raises(OverloadedError) as refused:
        await cluster.client.submit_task("one too many", python("noop"))
    assert refused.value.retry_after is not None and refused.value.retry_after > 0
    assert refused.value.details["max_pending"] == 3
    assert await last_seq(cluster) == before  # nothing appended

    await cluster.add_worker(worker_id="w1")
    for task_id in ids:
        await cluster.client.wait_for_task(task_id, timeout=20)
    later = await cluster.client.submit_task("after draining", python("noop"))
    done = await cluster.client.wait_for_task(later["task_id"], timeout=20)
    assert done["status"] == "completed"


async def test_retry_backoff_follows_the_policy_and_the_third_attempt_succeeds(
    cluster: Cluster, tmp_path: Path
) -> None:
    await cluster.add_worker(worker_id="w1")
    retry = {"max_attempts": 5, "initial_interval": 0.3, "backoff_coefficient": 2.0, "jitter": 0}
    task_id = (
        await cluster.client.submit_task(
            "flaky",
            python("flaky", path=str(tmp_path / "calls"), failures=2),
            options={"retry": retry},
        )
    )["task_id"]
    done = await cluster.client.wait_for_task(task_id, timeout=30)
    assert done["status"] == "completed" and done["result"] == 3 and done["attempt"] == 3

    events = await history(cluster, task_id)
    types = [e.type for e in events]
    assert types.count("RetryScheduled") == 2 and types.count("LeaseGranted") == 3
    retries = [e for e in events if e.type == "RetryScheduled"]
    assert [r.data.delay for r in retries] == [0.3, 0.6]
    assert [r.data.error.type for r in retries] == ["RuntimeError", "RuntimeError"]
    grants = [e for e in events if e.type == "LeaseGranted"]
    for retry_event, next_grant in zip(retries, grants[1:], strict=True):
        not_before = retry_event.data.not_before
        assert (not_before - at(retry_event)).total_seconds() == pytest.approx(
            retry_event.data.delay, abs=1e-3
        )
        assert at(next_grant) >= not_before  # never early


async def test_non_retryable_error_fails_at_once_and_a_redrive_runs_it_again(
    cluster: Cluster, tmp_path: Path
) -> None:
    await cluster.add_worker(worker_id="w1")
    retry = {"max_attempts": 5, "initial_interval": 0.1, "non_retryable": ["RuntimeError"]}
    task_id = (
        await cluster.client.submit_task(
            "flaky",
            python("flaky", path=str(tmp_path / "calls"), failures=1),
            options={"retry": retry},
        )
    )["task_id"]
    failed = await cluster.client.wait_for_task(task_id, timeout=20)
    assert failed["status"] == "failed" and failed["attempt"] == 1
    assert "RetryScheduled" not in [e.type for e in await history(cluster, task_id)]

    await cluster.client.redrive_task(task_id, reason="fixed the input")
    done = await cluster.client.wait_for_task(task_id, timeout=20)
    assert done["status"] == "completed" and done["result"] == 2 and done["attempt"] == 2
    assert [e.type for e in await history(cluster, task_id)][-3:] == [
        "TaskRedriven",
        "LeaseGranted",
        "TaskCompleted",
    ]


async def test_attempts_exhausted_dead_letters_the_task(cluster: Cluster, tmp_path: Path) -> None:
    await cluster.add_worker(worker_id="w1")
    task_id = (
        await cluster.client.submit_task(
            "always fails",
            python("fail", message="no"),
            options={"retry": {"max_attempts": 2, "initial_interval": 0.05}},
        )
    )["task_id"]
    failed = await cluster.client.wait_for_task(task_id, timeout=20)
    assert failed["status"] == "failed" and failed["attempt"] == 2
    types = [e.type for e in await history(cluster, task_id)]
    assert types.count("RetryScheduled") == 1 and types[-1] == "TaskFailed"


async def test_schedule_to_start_timeout_fires_when_nothing_can_run_it(cluster: Cluster) -> None:
    task_id = (
        await cluster.client.submit_task(
            "never starts", python("noop"), options={"schedule_to_start_timeout": 0.5}
        )
    )["task_id"]
    done = await cluster.client.wait_for_task(task_id, timeout=10)
    assert done["status"] == "timed_out"
    assert done["error"]["type"] == "ScheduleToStartTimeout"
    waited = datetime.fromisoformat(done["finished_at"]) - datetime.fromisoformat(
        done["submitted_at"]
    )
    assert 0.5 <= waited.total_seconds() < 3


async def test_start_to_close_timeout_stops_an_attempt_that_runs_too_long(
    cluster: Cluster,
) -> None:
    await cluster.add_worker(worker_id="w1")
    task_id = (
        await cluster.client.submit_task(
            "too slow", python("sleep", seconds=30), options={"start_to_close_timeout": 1.0}
        )
    )["task_id"]
    done = await cluster.client.wait_for_task(task_id, timeout=15)
    assert done["status"] == "timed_out" and done["error"]["type"] == "StartToCloseTimeout"
    worker = cluster.workers[0]
    await eventually(lambda: _idle(worker), timeout=10)  # told to stop: nothing runs there


async def _idle(worker: Any) -> bool:
    return not worker.running


async def test_urgent_task_overtakes_earlier_low_ones_for_the_single_slot(
    cluster: Cluster,
) -> None:
    await cluster.add_worker(worker_id="w1", slots=1)
    first = (await cluster.client.submit_task("busy", python("sleep", seconds=0.5)))["task_id"]
    await cluster.client.wait_for_task(first, timeout=10, statuses=frozenset({"running"}))
    low = [
        (await cluster.client.submit_task(f"low{i}", python("noop"), priority="low"))["task_id"]
        for i in range(3)
    ]
    urgent = (await cluster.client.submit_task("urgent", python("noop"), priority="urgent"))[
        "task_id"
    ]
    for task_id in [*low, urgent]:
        await cluster.client.wait_for_task(task_id, timeout=20)
    started = {}
    for task_id in [*low, urgent]:
        grant = next(e for e in await history(cluster, task_id) if e.type == "LeaseGranted")
        started[task_id] = at(grant)
    assert started[urgent] < min(started[t] for t in low)
    assert sorted(low, key=started.__getitem__) == low  # equal priority: first come


@pytest.mark.policy(unschedulable="block")
async def test_request_no_worker_fits_is_blocked_then_runs_when_a_big_worker_joins(
    cluster: Cluster,
) -> None:
    await cluster.add_worker(worker_id="small")  # 4 cpu
    task_id = (await cluster.client.submit_task("big", python("noop"), resources={"cpu": 8}))[
        "task_id"
    ]

    async def blocked() -> dict[str, Any]:
        why = await cluster.client.why(task_id)
        assert why["blocked_reason"] == "no_worker_fits", why
        return why

    why = await eventually(blocked, timeout=10)
    assert why["scheduler"]["state"] == "parked"
    await cluster.add_worker(
        worker_id="big", capacity={"cpu": 16.0, "memory_mb": 4096, "gpu": 0, "custom": {}}
    )
    done = await cluster.client.wait_for_task(task_id, timeout=20)
    assert done["status"] == "completed"
    grant = next(e for e in await history(cluster, task_id) if e.type == "LeaseGranted")
    assert grant.data.worker_id == "big"


async def cli(cluster: Cluster, *args: str) -> str:
    """``pantheon ARGS`` in a process of its own against the cluster (the loop keeps serving)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pantheon_es.cli", *args,
        "--nats-url", cluster.url, "--namespace", cluster.root,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
        env=pythonpath_env(),
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, stderr.decode()
    return stdout.decode()


async def test_pantheon_why_prints_the_reason_a_task_waits(cluster: Cluster) -> None:
    await cluster.add_worker(worker_id="w1")
    opts = {"concurrency_key": "gpu-box", "concurrency_limit": 1}
    first = (
        await cluster.client.submit_task(
            "holder", python("sleep", seconds=5), resources={"cpu": 0.1}, options=opts
        )
    )["task_id"]
    await cluster.client.wait_for_task(first, timeout=10, statuses=frozenset({"running"}))
    second = (await cluster.client.submit_task("waiter", python("noop"), options=opts))["task_id"]

    async def recorded() -> bool:
        return (await cluster.client.get_task(second))["blocked_reason"] == "concurrency_key_full"

    await eventually(recorded, timeout=10)
    shown = await cli(cluster, "why", second)
    assert "concurrency_key_full" in shown and "gpu-box" in shown
    info = orjson.loads(await cli(cluster, "why", second, "--json"))
    assert info["status"] == "pending" and info["scheduler"]["state"] == "parked"
    assert info["blocked_details"] == {"concurrency_key": "gpu-box", "limit": 1}
    await cluster.client.cancel_task(first)
    done = await cluster.client.wait_for_task(second, timeout=20)
    assert done["status"] == "completed" and done["blocked_reason"] is None


async def test_request_no_registered_worker_could_hold_is_refused_unschedulable(
    cluster: Cluster,
) -> None:
    await cluster.add_worker(worker_id="small")  # 4 cpu, 4096 MiB
    before = await last_seq(cluster)
    with pytest.raises(UnschedulableError) as refused:
        await cluster.client.submit_task("huge", python("noop"), resources={"memory_mb": 10**6})
    assert refused.value.details["largest_worker"]["memory_mb"] == 4096
    with pytest.raises(UnschedulableError):
        await cluster.client.create_workflow(
            "wf", [{"name": "ok", "executor": python("noop")},
                   {"name": "big", "executor": python("noop"), "resources": {"gpu": 1}}],
        )  # fmt: skip
    assert await last_seq(cluster) == before  # nothing appended
    fits = await cluster.client.submit_task("fits", python("noop"), resources={"cpu": 4})
    assert (await cluster.client.wait_for_task(fits["task_id"], timeout=20))[
        "status"
    ] == "completed"


@pytest.mark.policy(tenant_weights={"a": 3.0, "b": 1.0}, aging_per_s=0.0001)
async def test_a_worker_shared_by_two_tenants_serves_them_by_fair_share_weight(
    cluster: Cluster,
) -> None:
    from pantheon_es.client import PantheonClient

    await cluster.add_worker(worker_id="shared", tenant="a", serve_tenants=["b"], slots=1)
    clients = {
        t: PantheonClient(cluster.node.nc, tenant=t, subjects=cluster.node.subjects, timeout=15)
        for t in ("a", "b")
    }
    blocker = await clients["a"].submit_task("blocker", python("sleep", seconds=1.0))
    await clients["a"].wait_for_task(blocker["task_id"], statuses=frozenset({"running"}))
    submitted = {
        t: [(await clients[t].submit_task(f"{t}{i}", python("noop")))["task_id"] for i in range(12)]
        for t in ("a", "b")
    }  # all queued behind the blocker: the order they run in is the policy's
    grants = []
    assert cluster.node.store is not None
    for t, task_ids in submitted.items():
        for task_id in task_ids:
            done = await clients[t].wait_for_task(task_id, timeout=30)
            assert done["status"] == "completed"
            history = await cluster.node.store.read_aggregate(t, "task", task_id)
            grant = next(h for h in history if h.event.type == "LeaseGranted")
            assert grant.event.data.worker_id == "shared"
            assert grant.event.data.worker_tenant == ("a" if t == "b" else None)
            grants.append((grant.seq, t))
    first = [t for _seq, t in sorted(grants)[:16]]
    assert 11 <= first.count("a") <= 13, first  # 3 of every 4 while both wait
