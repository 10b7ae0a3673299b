"""Automatic cleanup: a node with a retention archives finished tasks once they are due."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path

from pantheon_es.client import PantheonClient
from pantheon_es.embedded import EmbeddedNats
from pantheon_es.errors import NotFoundError
from pantheon_es.node import Node, NodeConfig
from tests.conftest import eventually, python


async def test_retention_archives_finished_tasks_once_due_and_keeps_live_ones(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    node = Node(
        NodeConfig(
            data_dir=tmp_path / "node",
            nats_url=nats_server.url,
            root=f"r{secrets.token_hex(4)}",
            workers=0,  # nothing runs: tasks stay pending until cancelled
            retention=2.0,
            leader_ttl=0,
        )
    )
    await node.start()
    runner = asyncio.create_task(node.run())
    try:
        assert node.nc is not None and node.store is not None
        client = PantheonClient(node.nc, subjects=node.subjects, timeout=10)
        first = (await client.submit_task("a", python("noop")))["task_id"]
        kept = (await client.submit_task("b", python("noop")))["task_id"]
        await client.cancel_task(first, reason="done with it")

        def gone(task_id: str) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                try:
                    await client.get_task(task_id)
                except NotFoundError:
                    return True
                return False

            return check

        # The first task to finish on a node with none finished arms the janitor.
        assert await eventually(gone(first), timeout=15)
        history = [h.event.type for h in await node.store.read_aggregate("default", "task", first)]
        assert history[-1] == "TaskArchived"  # the log keeps the task, archived
        assert (await client.get_task(kept))["status"] == "pending"  # live: never archived

        later = (await client.submit_task("c", python("noop")))["task_id"]
        await client.cancel_task(later)
        await asyncio.sleep(0.3)
        assert (await client.get_task(later))["status"] == "cancelled"  # not before its time
        assert await eventually(gone(later), timeout=15)
        assert (await client.get_task(kept))["status"] == "pending"
    finally:
        node.request_stop()
        await asyncio.wait_for(runner, 30)
