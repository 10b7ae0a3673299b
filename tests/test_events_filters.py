"""`pantheon events` filters: aggregate and id on the server, type by the client, since TIME."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pantheon_es.errors import InvalidError
from tests.conftest import Cluster, python
from tests.test_cli import run
from tools.events import EventFilter, parse_time, seq_at


def test_times_are_iso_8601_or_a_span_ago() -> None:
    now = datetime(2026, 11, 24, 8, 0, tzinfo=UTC)
    assert parse_time("15m", now) == now - timedelta(minutes=15)
    assert parse_time("1.5h", now) == now - timedelta(minutes=90)
    assert parse_time("2026-11-24T07:00:00Z") == datetime(2026, 11, 24, 7, 0, tzinfo=UTC)
    assert parse_time("2026-11-24T07:00:00") == datetime(2026, 11, 24, 7, 0, tzinfo=UTC)
    with pytest.raises(InvalidError):
        parse_time("yesterday")
    with pytest.raises(InvalidError):
        EventFilter("default", aggregate="bogus")
    with pytest.raises(InvalidError, match="NoSuchEvent"):
        EventFilter("default", types=frozenset({"NoSuchEvent"}))


@pytest.mark.slow
async def test_events_filters_keep_only_what_was_asked(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster.client
    store = cluster.node.store
    worker = await cluster.add_worker(worker_id="w1")
    first = (await c.submit_task("first", python("noop")))["task_id"]
    await c.wait_for_task(first, timeout=30)
    first_last = await store.last_seq()
    await asyncio.sleep(0.2)
    middle = datetime.now(UTC)
    await asyncio.sleep(0.2)
    second = (await c.submit_task("second", python("sleep", seconds=0.5)))["task_id"]
    await c.send_message(second, "hi", sender="me")
    await c.wait_for_task(second, timeout=30)
    worker.request_stop()  # its heartbeats would keep appending
    await asyncio.wait_for(worker._runner, 30)
    last = await store.last_seq()
    args = ("--nats-url", cluster.url, "--namespace", cluster.root, "--json")

    async def events(*extra: str) -> list[dict[str, Any]]:
        done = await asyncio.to_thread(run, "events", *extra, *args, data_dir=tmp_path)
        docs: list[dict[str, Any]] = json.loads(done.stdout)
        assert all(d["seq"] <= last for d in docs)
        return docs

    everything = await events()
    assert len(everything) >= 8 and [d["seq"] for d in everything] == sorted(
        d["seq"] for d in everything
    )

    one = await events("--aggregate", "task", "--id", first)
    history = await store.read_aggregate("default", "task", first)
    assert [d["seq"] for d in one] == [h.seq for h in history]

    by_id = await events("--id", second)  # any aggregate with that id: the task and its mailbox
    assert {d["aggregate"] for d in by_id} == {"task", "mailbox"}
    assert {d["aggregate_id"] for d in by_id} == {second}

    mailboxes = await events("--aggregate", "mailbox")
    assert [d["type"] for d in mailboxes] == ["MessageSent"]

    leases = await events("--type", "LeaseGranted", "--type", "TaskCompleted")
    assert [(d["type"], d["aggregate_id"]) for d in leases] == [
        ("LeaseGranted", first), ("TaskCompleted", first),
        ("LeaseGranted", second), ("TaskCompleted", second),
    ]  # fmt: skip
    workers = await events("--aggregate", "worker", "--type", "WorkerRegistered")
    assert [d["aggregate_id"] for d in workers] == ["w1"]

    # Only tasks append between the two: the worker's heartbeats go on all along.
    after = await events("--aggregate", "task", "--since", middle.isoformat())
    tasks = [d for d in everything if d["aggregate"] == "task"]
    assert [d["seq"] for d in after] == [d["seq"] for d in tasks if d["seq"] > first_last]
    assert {d["aggregate_id"] for d in after} == {second}
    assert len(await events("--since", "1h")) == len(everything)
    assert await events("--since", (datetime.now(UTC) + timedelta(hours=1)).isoformat()) == []
    subject = cluster.node.subjects.events("default", "task")
    assert await seq_at(store, subject, middle) == after[0]["seq"]

    for bad in (["--type", "Nope"], ["--aggregate", "bogus"], ["--since", "yesterday"]):
        done = await asyncio.to_thread(run, "events", *bad, *args, data_dir=tmp_path, check=False)
        assert done.returncode == 2, (bad, done.stderr)
