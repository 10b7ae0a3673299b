"""Submissions in bulk (``task.submit_many``) and the client that sends them, against a
real node: each item is decided as its own ``task.submit`` would be."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from pantheon_es.client import PantheonClient
from pantheon_es.errors import InvalidError, OverloadedError, PantheonError
from pantheon_es.reports import SubmitTasks
from tests.conftest import Cluster, eventually, history, last_seq, python, quota


class CommandSpy:
    """Counts the command requests by verb on the node's connection."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.verbs: Counter[str] = Counter()
        self.sub: Any = None

    async def __aenter__(self) -> CommandSpy:
        async def on_command(msg: Any) -> None:
            self.verbs[msg.subject.rsplit(".", 1)[1]] += 1

        self.sub = await self.cluster.node.nc.subscribe(
            f"{self.cluster.root}.cmd.default.task.*", cb=on_command
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.sub.unsubscribe()

    async def saw(self, total: int) -> bool:
        async def check() -> bool:
            return sum(self.verbs.values()) >= total

        return bool(await eventually(check, timeout=5))


async def test_bulk_submits_are_decided_one_by_one_and_answered_in_order(
    cluster: Cluster,
) -> None:
    before = await last_seq(cluster)
    ok = {"name": "a", "executor": python("noop")}
    bad = {"name": "b", "executor": {"kind": "python", "target": "no colon here"}}
    keyed = {"name": "c", "executor": python("noop"), "idempotency_key": "bulk-key-1"}

    reply = await cluster.client.command(
        "task", "submit_many", {"submits": [ok, bad, keyed, {"name": "d"}]}
    )
    replies = reply["replies"]
    assert [r["ok"] for r in replies] == [True, False, True, False]
    assert replies[1]["error"]["code"] == "invalid"
    assert replies[3]["error"]["code"] == "invalid" and "executor" in replies[3]["error"]["message"]
    assert replies[0]["result"]["task_id"] != replies[2]["result"]["task_id"]
    # The key used again (in another request) returns the first reply: no second task.
    again = await cluster.client.command("task", "submit_many", {"submits": [keyed, ok]})
    assert again["replies"][0]["result"] == replies[2]["result"]
    assert again["replies"][1]["result"]["task_id"] != replies[0]["result"]["task_id"]
    assert await last_seq(cluster) == before + 3  # three TaskSubmitted, nothing else
    for r in (replies[0], replies[2]):
        assert [e.type for e in await history(cluster, r["result"]["task_id"])] == ["TaskSubmitted"]


@pytest.mark.parametrize(
    "body",
    [
        {"submits": []},
        {"submits": [{"name": "x", "executor": python("noop")}] * 257},
        {"submits": ["not an object"]},
        {"submits": [{"name": "x", "executor": python("noop")}], "extra": 1},
    ],
    ids=["empty", "too-many", "not-an-object", "unknown-field"],
)
async def test_a_malformed_bulk_submit_is_refused_whole_and_appends_nothing(
    cluster: Cluster, body: dict[str, Any]
) -> None:
    before = await last_seq(cluster)
    with pytest.raises(InvalidError):
        await cluster.client.command("task", "submit_many", body)
    assert await last_seq(cluster) == before


async def test_the_client_sends_one_turns_submits_as_one_request(cluster: Cluster) -> None:
    client = cluster.client
    async with CommandSpy(cluster) as spy:
        results = await asyncio.gather(
            *(client.submit_task(f"t{i}", python("noop")) for i in range(4)),
            client.submit_task("bad", {"kind": "python", "target": "no colon"}),
            return_exceptions=True,
        )
        assert isinstance(results[4], InvalidError)  # its own typed error, the others go on
        task_ids = [r["task_id"] for r in results[:4]]  # type: ignore[index]
        assert len(set(task_ids)) == 4
        # Awaited one after another, each goes alone as the ordinary command.
        alone = await client.submit_task("alone", python("noop"))
        assert await spy.saw(2)
    assert spy.verbs == {"submit_many": 1, "submit": 1}

    await cluster.add_worker(worker_id="w1")
    for task_id in [*task_ids, alone["task_id"]]:
        done = await client.wait_for_task(task_id, timeout=20)
        assert done["status"] == "completed"
    # Submitted in the order of the calls.
    seqs = [(await history(cluster, t))[0] for t in task_ids]
    assert [e.data.name for e in seqs] == ["t0", "t1", "t2", "t3"]


async def test_a_client_can_send_every_submit_alone(cluster: Cluster) -> None:
    client = PantheonClient(
        cluster.node.nc, subjects=cluster.node.subjects, timeout=15, batch_submits=False
    )
    async with CommandSpy(cluster) as spy:
        results = await asyncio.gather(
            *(client.submit_task(f"t{i}", python("noop")) for i in range(3))
        )
        assert await spy.saw(3)
    assert spy.verbs == {"submit": 3}
    assert len({r["task_id"] for r in results}) == 3


@pytest.mark.policy(default_quota=quota(max_pending=2))
async def test_a_refused_item_is_retried_alone_with_its_idempotency_key(
    cluster: Cluster,
) -> None:
    retried: list[PantheonError] = []
    client = PantheonClient(
        cluster.node.nc,
        subjects=cluster.node.subjects,
        timeout=15,
        retry_for=30,
        on_retry=retried.append,
    )
    first = [(await client.submit_task(f"p{i}", python("noop")))["task_id"] for i in range(2)]

    async def both_pending() -> bool:
        scheduler = cluster.node.scheduler
        return len(scheduler._pending.get("default", ())) == 2

    assert await eventually(both_pending, timeout=5)

    async with CommandSpy(cluster) as spy:
        later = asyncio.gather(*(client.submit_task(f"q{i}", python("noop")) for i in range(2)))

        async def refused() -> bool:
            return len(retried) >= 2

        assert await eventually(refused, timeout=10)  # both refused and being retried
        assert all(isinstance(e, OverloadedError) for e in retried)
        await cluster.add_worker(worker_id="w1")  # drains the pending ones: room again
        results = await asyncio.wait_for(later, 30)
    assert spy.verbs["submit_many"] == 1 and spy.verbs["submit"] >= 2
    for task_id in [*first, *(r["task_id"] for r in results)]:
        assert (await client.wait_for_task(task_id, timeout=20))["status"] == "completed"
    # Each retried submit was appended once.
    for r in results:
        assert [e.type for e in await history(cluster, r["task_id"])].count("TaskSubmitted") == 1


async def test_fresh_submits_are_appended_together_and_chosen_ids_alone(cluster: Cluster) -> None:
    taken = (await cluster.client.submit_task("first", python("noop")))["task_id"]
    chosen = "01KAZZZZZZZZZZZZZZZZZZZZZZ"
    before = await last_seq(cluster)
    reply = await cluster.client.command(
        "task",
        "submit_many",
        {
            "submits": [
                {"name": "f1", "executor": python("noop")},
                {"name": "again", "executor": python("noop"), "task_id": taken},
                {"name": "f2", "executor": python("noop")},
                {"name": "mine", "executor": python("noop"), "task_id": chosen},
            ]
        },
    )
    replies = reply["replies"]
    assert [r["ok"] for r in replies] == [True, False, True, True]
    assert replies[1]["error"]["code"] == "conflict"
    assert replies[3]["result"]["task_id"] == chosen
    f1, f2 = replies[0]["result"], replies[2]["result"]
    assert f2["seq"] == f1["seq"] + 1  # one atomic batch, in the order of the items
    assert await last_seq(cluster) == before + 3


class _BuggyService:
    """A command service whose every path fails with a bug (not a typed error)."""

    async def execute(self, tenant: str, command: Any) -> dict[str, Any]:
        raise RuntimeError("a bug in execute")

    async def create_each(self, tenant: str, commands: Any) -> list[Any]:
        raise RuntimeError("a bug in create_each")


async def test_a_bug_costs_each_item_an_internal_error_not_the_request() -> None:
    submits = [
        {"name": "fresh", "executor": {"kind": "shell", "argv": ["true"]}},
        {"name": "keyed", "executor": {"kind": "shell", "argv": ["true"]}, "idempotency_key": "k"},
        {"name": "bad"},  # no executor: invalid, whatever the service does
    ]
    replies = (await SubmitTasks(submits=submits).run(_BuggyService(), "default"))["replies"]
    codes = [r["error"]["code"] for r in replies]
    assert [r["ok"] for r in replies] == [False, False, False]
    assert codes == ["internal", "internal", "invalid"]
    assert replies[0]["error"]["message"] == "internal error: RuntimeError"
