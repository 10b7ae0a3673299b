"""The Python code of docs/subscribing.md, run as written against a real server."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.conftest import Cluster, eventually, python

DOC = Path(__file__).resolve().parents[1] / "docs" / "subscribing.md"


def doc_functions() -> dict[str, Any]:
    namespace: dict[str, Any] = {}
    for block in re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S):
        exec(compile(block, str(DOC), "exec"), namespace)
    return namespace


async def test_the_subscribing_page_examples_work(cluster: Cluster) -> None:
    docs = doc_functions()
    c, root, store = cluster.client, cluster.root, cluster.node.store
    await cluster.add_worker(worker_id="w1")
    done = [(await c.submit_task(f"t{i}", python("noop")))["task_id"] for i in range(3)]
    for t in done:
        await c.wait_for_task(t, timeout=30)
    middle = datetime.now(UTC)
    await asyncio.sleep(0.1)
    sleeper = (await c.submit_task("sleeper", python("sleep", seconds=30)))["task_id"]
    await c.wait_for_task(sleeper, timeout=30, statuses=frozenset({"running"}))

    async def running() -> dict[str, Any]:
        found: dict[str, Any] = await docs["running_tasks"](cluster.node.nc, root=root)
        assert set(found) == {f"default.task.{sleeper}"}
        return found

    assert (await eventually(running))[f"default.task.{sleeper}"]["name"] == "sleeper"

    async def current() -> dict[str, Any]:
        tasks: dict[str, Any] = await docs["current_tasks"](cluster.url, root=root)
        assert {v["status"] for k, v in tasks.items() if k != f"default.task.{sleeper}"} == {
            "completed"
        }
        return tasks

    tasks = await eventually(current)
    assert set(tasks) == {f"default.task.{t}" for t in [*done, sleeper]}

    subject = f"{root}.ev.default.task.*"
    leases = await docs["read_events"](
        cluster.url, subject, types=["LeaseGranted"], stream=store.stream
    )
    assert [e["aggregate_id"] for e in leases] == [*done, sleeper]
    assert all(e["type"] == "LeaseGranted" for e in leases)
    everything = await docs["read_events"](cluster.url, subject, stream=store.stream)
    assert [e["seq"] for e in everything] == sorted(e["seq"] for e in everything)
    assert {e["aggregate_id"] for e in everything} == {*done, sleeper}
    later = await docs["read_events"](cluster.url, subject, since=middle, stream=store.stream)
    assert {e["aggregate_id"] for e in later} == {sleeper}
    one = await docs["read_events"](
        cluster.url, f"{root}.ev.default.task.{done[0]}", from_seq=1, stream=store.stream
    )
    history = await store.read_aggregate("default", "task", done[0])
    assert [e["seq"] for e in one] == [h.seq for h in history]
    await c.cancel_task(sleeper, "done")
