"""`pantheon watch` and the state bucket: current values, then every change."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import nats.js.errors
import pytest

from pantheon_es.errors import InvalidError
from pantheon_es.subjects import Subjects
from pantheon_es.watch import StateChange, StateWatch, matches, parse_filters
from tests.conftest import Cluster, Stack, eventually, python
from tests.test_cli import run


def test_filters_match_text_of_one_of_the_values() -> None:
    f = parse_filters({"status": "pending,leased", "priority": "2"})
    assert matches({"status": "leased", "priority": 2}, f)
    assert not matches({"status": "running", "priority": 2}, f)
    assert not matches({"status": "pending"}, f)
    with pytest.raises(InvalidError):
        StateWatch(None, model="nope")  # type: ignore[arg-type]


def read_model_state(db_path: Path, models: list[Any], tenant: str) -> dict[str, dict[str, Any]]:
    """Every entity the read models hold, keyed as in the bucket."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        out = {}
        for model in models:
            for table, kv_model in model.kv_tables():
                cols = ", ".join(table.columns)
                for values in db.execute(f"SELECT {cols} FROM {table.name}"):
                    row = table.from_db(values)
                    if row["tenant"] == tenant:
                        out[Subjects.state_key(tenant, kv_model, row["id"])] = row
        return out
    finally:
        db.close()


@pytest.mark.slow
async def test_watch_started_mid_run_ends_with_exactly_the_read_models_state(
    cluster: Cluster, tmp_path: Path
) -> None:
    c = cluster.client
    node = cluster.node
    worker = await cluster.add_worker(worker_id="w1")
    early = [(await c.submit_task(f"early{i}", python("noop")))["task_id"] for i in range(4)]
    talker = (await c.submit_task("talker", python("sleep", seconds=60)))["task_id"]
    await c.send_message(talker, "before the watch", sender=early[0])
    for t in early:
        await c.wait_for_task(t, timeout=30)
    # The bucket trails the read models by up to a KV interval (writes are merged).
    projector = node.read.projector

    async def kv_at_head() -> bool:
        return bool(projector.kv_position >= await node.store.last_seq())

    await eventually(kv_at_head, timeout=20)

    # A subscriber starts mid-run: the current values first.
    watch = StateWatch(node.nc, tenant="default", subjects=node.subjects)
    await watch.start()
    initial = {ch.key: ch for ch in await watch.initial()}
    mailbox = f"default.mailbox.{talker}"
    assert {f"default.task.{t}" for t in early} <= set(initial)
    assert initial[mailbox].value is not None and initial[mailbox].value["pending"] == 1
    assert all(ch.initial and ch.op == "put" for ch in initial.values())
    seen: list[StateChange] = []

    async def collect() -> None:
        async for change in watch:
            seen.append(change)

    collector = asyncio.create_task(collect())
    try:
        # ... while more are submitted, leased, completed, cancelled, archived.
        late = [(await c.submit_task(f"late{i}", python("noop")))["task_id"] for i in range(4)]
        sleepers = [(await c.submit_task(f"sleep{i}", python("sleep", seconds=60)))["task_id"]
                    for i in range(2)]  # fmt: skip
        await c.send_message(talker, "during the watch", priority="urgent", sender=late[0])
        got = await c.receive_messages(talker, max=10, ack=True)
        assert [m["body"] for m in got] == ["during the watch", "before the watch"]
        for t in late:
            await c.wait_for_task(t, timeout=30)
        for t in [*sleepers, talker]:
            await c.wait_for_task(t, timeout=30, statuses=frozenset({"running"}))
            await c.cancel_task(t, "test")
            await c.wait_for_task(t, timeout=30)
        archived = [early[0], early[1], late[0], talker]
        for t in archived:
            await c.archive_task(t, "test")

        # The CLI sees the same current values (with a filter, and --once to exit).
        await eventually(kv_at_head, timeout=20)
        args = ("--nats-url", cluster.url, "--namespace", cluster.root)
        done = await asyncio.to_thread(
            run, "watch", "task", "--filter", "status=cancelled", "--once", "--json", *args,
            data_dir=tmp_path, timeout=60,
        )  # fmt: skip
        lines = [json.loads(line) for line in done.stdout.splitlines()]
        assert {(d["model"], d["id"], d["op"]) for d in lines} == {
            ("task", t, "put") for t in sleepers
        }
        assert all(d["value"]["status"] == "cancelled" and d["revision"] > 0 for d in lines)

        worker.request_stop()  # no more heartbeats: the state comes to rest
        await asyncio.wait_for(worker._runner, 30)
        store = node.store

        async def settled() -> bool:
            last = await store.last_seq()
            return projector.position == last and projector.kv_position >= last

        await eventually(settled, timeout=20)
        expected = read_model_state(projector.db_path, projector.models, "default")

        async def same() -> bool:
            assert watch.state == expected
            return True

        await eventually(same, timeout=20)
    finally:
        collector.cancel()
        await watch.stop()

    # Deletions included: archived entities were seen, then deleted, and are gone.
    deleted = {ch.key for ch in seen if ch.op == "delete"}
    assert {f"default.task.{t}" for t in archived} | {mailbox} == deleted
    assert f"default.task.{late[0]}" not in initial  # created and deleted during the watch
    assert any(ch.key == f"default.task.{late[0]}" and ch.op == "put" for ch in seen)
    assert {"default.worker.w1", f"default.task.{sleepers[0]}"} <= set(expected)
    assert expected["default.worker.w1"]["status"] == "stopped"
    # In order per entity: each key's revisions only grow.
    last: dict[str, int] = {k: ch.revision for k, ch in initial.items()}
    for ch in seen:
        assert ch.revision > last.get(ch.key, 0)
        last[ch.key] = ch.revision


async def test_mailbox_state_counts_pending_by_priority_and_unread(stack: Stack) -> None:
    c = stack.client
    agent = (await c.submit_task("agent", python("noop")))["task_id"]
    for priority in ("low", "urgent", "urgent"):
        await c.send_message(agent, f"m-{priority}", priority=priority, sender="someone")
    got = await c.receive_messages(agent, max=2, ack=False)
    assert [m["priority"] for m in got] == ["urgent", "urgent"]
    await c.ack_messages(agent, [got[0]["message_id"]])
    kv = await stack.nc.jetstream().key_value(stack.store.subjects.state_bucket)

    async def state() -> dict[str, Any]:
        try:
            entry = await kv.get(f"default.mailbox.{agent}")
        except nats.js.errors.KeyNotFoundError:
            raise AssertionError("not in the bucket yet") from None
        box: dict[str, Any] = json.loads(entry.value)
        assert box["unread"] == 1
        return box

    box = await eventually(state)
    assert box["pending"] == 1 and box["total"] == 3
    assert box["pending_by_priority"] == {"low": 1, "medium": 0, "high": 0, "urgent": 0}
    assert (
        box["last_message"]["priority"] == "urgent" and box["last_message"]["sender"] == "someone"
    )
    assert box["last_read_at"] is not None and box["last_delivered_at"] is not None
