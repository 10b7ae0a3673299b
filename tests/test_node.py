"""The node's life: start, run, and a shutdown that may be asked for more than once."""

from __future__ import annotations

import asyncio
from pathlib import Path

from pantheon_es.embedded import EmbeddedNats
from pantheon_es.node import Node, NodeConfig
from pantheon_es.subjects import Subjects


async def test_shutdown_called_while_run_shuts_down_finishes_once_for_both(
    nats_server: EmbeddedNats, subjects: Subjects, tmp_path: Path
) -> None:
    """``run()`` shuts the node down when asked to stop; a ``shutdown()`` called at the
    same time waits for that one (it used to hang closing the query service's database)."""
    node = Node(NodeConfig(data_dir=tmp_path / "node", nats_url=nats_server.url,
                           root=subjects.root, workers=0))  # fmt: skip
    await node.start()
    runner = asyncio.create_task(node.run())
    await asyncio.sleep(0.2)  # every part running
    node.request_stop()
    await asyncio.wait_for(asyncio.gather(runner, node.shutdown(), node.shutdown()), 10)
    assert node.nc is not None and node.nc.is_closed
    assert not node.discovery_path.exists()
    await asyncio.wait_for(node.shutdown(), 5)  # once more, after the end: nothing to do
