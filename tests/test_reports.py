"""Lease reports in bulk (``task.report``) and offers in batches, against a real node.

A hand-made worker (a registration and a core subscription on its work subject)
holds real leases, so each test controls exactly which reports are sent.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest

from pantheon_es import ids
from pantheon_es.errors import InvalidError, StaleLeaseError
from pantheon_es.reports import report_batcher
from pantheon_es.schema import WorkOffer, WorkOffers
from tests.conftest import Cluster, eventually, history, python


def holds(condition: Callable[[], Any]) -> Callable[[], Awaitable[Any]]:
    """``condition`` as the async check ``eventually`` wants."""

    async def check() -> Any:
        return condition()

    return check


class FakeWorker:
    """Registered with the node; collects what arrives on its work subject."""

    def __init__(self, cluster: Cluster, worker_id: str) -> None:
        self.cluster = cluster
        self.worker_id = worker_id
        self.messages: list[dict[str, Any]] = []

    @property
    def offers(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for m in self.messages:
            out += m["offers"] if m["type"] == "offers" else [m] if m["type"] == "offer" else []
        return out

    async def start(self, **register: Any) -> FakeWorker:
        async def on_msg(msg: Any) -> None:
            self.messages.append(orjson.loads(msg.data))

        nc = self.cluster.node.nc
        await nc.subscribe(self.cluster.node.subjects.work("default", self.worker_id), cb=on_msg)
        await self.cluster.client.command(
            "worker",
            "register",
            {
                "worker_id": self.worker_id,
                "incarnation": ids.new_id(),
                "capacity": {"cpu": 64, "memory_mb": 65536},
                "slots": 64,
                "ttl": 60,
                **register,
            },
        )
        return self

    async def leases(self, n: int) -> list[dict[str, Any]]:
        """Submit ``n`` tasks and wait for their offers: the lease fields of each."""
        for _ in range(n):
            await self.cluster.client.submit_task("held", python("add", a=1, b=2))
        assert await eventually(holds(lambda: len(self.offers) >= n), timeout=15)
        return [
            {k: o[k] for k in ("task_id", "lease_id", "fencing_token")} for o in self.offers[:n]
        ]


async def _types(cluster: Cluster, task_id: str) -> list[str]:
    return [e.type for e in await history(cluster, task_id)]


async def test_bulk_reports_are_decided_one_by_one_and_answered_in_order(
    cluster: Cluster,
) -> None:
    worker = await FakeWorker(cluster, "fake1").start()
    one, two, three = await worker.leases(3)
    assert cluster.node.store is not None
    before = await cluster.node.store.last_seq()

    reply = await cluster.client.command(
        "task",
        "report",
        {
            "reports": [
                {"verb": "complete", "body": {**one, "result": {"n": 1}}},
                {"verb": "fail", "body": {**two, "fencing_token": 7, "error": {"type": "X"}}},
                {"verb": "complete", "body": {"task_id": three["task_id"]}},  # no lease named
                {"verb": "heartbeat", "body": {**three, "activity": True}},
            ]
        },
    )

    replies = reply["replies"]
    assert [r["ok"] for r in replies] == [True, False, False, True]
    assert replies[0]["result"]["seq"] > before
    assert replies[1]["error"]["code"] == "stale_lease"
    assert replies[2]["error"]["code"] == "invalid" and "lease_id" in replies[2]["error"]["message"]
    # Exactly the two accepted reports were appended: a completion and a renewal.
    assert await cluster.node.store.last_seq() == before + 2
    assert (await _types(cluster, one["task_id"]))[-1] == "TaskCompleted"
    assert (await _types(cluster, two["task_id"]))[-1] == "LeaseGranted"
    assert (await _types(cluster, three["task_id"]))[-1] == "LeaseRenewed"
    # A worker that did not ask for batches got every offer alone.
    assert {m["type"] for m in worker.messages} == {"offer"}
    assert all(WorkOffer.model_validate(m) for m in worker.messages)


@pytest.mark.parametrize(
    "body",
    [
        {"reports": []},
        {"reports": [{"verb": "cancel", "body": {}}]},
        {"reports": [{"verb": "complete", "body": {}}] * 257},
    ],
    ids=["empty", "not-a-report", "too-many"],
)
async def test_a_malformed_bulk_report_is_refused_whole_and_appends_nothing(
    cluster: Cluster, body: dict[str, Any]
) -> None:
    assert cluster.node.store is not None
    before = await cluster.node.store.last_seq()
    with pytest.raises(InvalidError):
        await cluster.client.command("task", "report", body)
    assert await cluster.node.store.last_seq() == before


async def test_the_batcher_sends_one_turns_reports_as_one_request(cluster: Cluster) -> None:
    worker = await FakeWorker(cluster, "fake2").start()
    leases = await worker.leases(4)
    subjects: Counter[str] = Counter()

    async def on_command(msg: Any) -> None:
        subjects[msg.subject.rsplit(".", 1)[1]] += 1

    nc = cluster.node.nc
    spy = await nc.subscribe(f"{cluster.root}.cmd.default.task.*", cb=on_command)
    batcher = report_batcher()
    client = cluster.client

    # Three in one turn: one request; the stale one raises its own typed error.
    stale = {**leases[2], "fencing_token": leases[2]["fencing_token"] + 5}
    results = await asyncio.gather(
        batcher.send(client, "complete", {**leases[0], "result": 1}),
        batcher.send(client, "complete", {**leases[1], "result": 2}),
        batcher.send(client, "complete", {**stale, "result": 3}),
        return_exceptions=True,
    )
    assert isinstance(results[2], StaleLeaseError)
    assert results[0]["seq"] != results[1]["seq"]  # each its own completion
    # A lone report goes as its ordinary command.
    alone = await batcher.send(client, "complete", {**leases[3], "result": 4})
    assert alone["seq"] > 0
    assert await eventually(holds(lambda: sum(subjects.values()) >= 2), timeout=5)
    await spy.unsubscribe()
    assert subjects == {"report": 1, "complete": 1}
    for lease, result in ((leases[0], 1), (leases[1], 2), (leases[3], 4)):
        assert (await client.wait_for_task(lease["task_id"], timeout=10))["result"] == result
    assert (await _types(cluster, leases[2]["task_id"]))[-1] == "LeaseGranted"


async def test_offers_decided_in_one_turn_leave_as_one_message_per_worker(
    cluster: Cluster,
) -> None:
    scheduler = cluster.node.scheduler
    work = cluster.node.subjects.work
    got: dict[str, list[dict[str, Any]]] = {"a": [], "b": []}

    async def collect(msg: Any) -> None:
        got[msg.subject.rsplit(".", 1)[1]].append(orjson.loads(msg.data))

    nc = cluster.node.nc
    for name in got:
        await nc.subscribe(work("default", name), cb=collect)
    offers = [
        {
            "type": "offer",
            "tenant": "default",
            "task_id": ids.new_id(),
            "lease_id": ids.new_id(),
            "fencing_token": 1,
            "attempt": 1,
            "ttl": 30.0,
            "name": f"t{i}",
            "executor": python("add", a=i, b=0),
            "labels": {},
        }
        for i in range(3)
    ]
    scheduler._offer(work("default", "a"), offers[0])
    scheduler._offer(work("default", "a"), offers[1])
    scheduler._offer(work("default", "b"), offers[2])
    assert await eventually(holds(lambda: got["a"] and got["b"]), timeout=5)
    await nc.flush()
    assert got["a"] == [{"type": "offers", "offers": offers[:2]}]
    assert got["b"] == [offers[2]]  # alone: the plain offer
    WorkOffers.model_validate(got["a"][0])


async def test_workers_that_take_batches_run_every_task_once(cluster: Cluster) -> None:
    await cluster.add_worker(worker_id="w1", slots=64)
    workers = await cluster.client.list_workers()
    assert [w["offer_batches"] for w in workers["items"]] == [True]
    submitted = await asyncio.gather(
        *(cluster.client.submit_task(f"t{i}", python("add", a=i, b=1)) for i in range(40))
    )
    done = await asyncio.gather(
        *(cluster.client.wait_for_task(s["task_id"], timeout=30) for s in submitted)
    )
    assert [d["result"] for d in done] == [i + 1 for i in range(40)]
    for s in submitted:
        types = await _types(cluster, s["task_id"])
        assert types.count("LeaseGranted") == 1 and types.count("TaskCompleted") == 1
