"""``pantheon demo``: the foundation end to end, on an embedded nats-server.

Starts a node (embedded NATS, command service, projector, queries) in a
temporary directory, talks to it over NATS like any client, then rebuilds the
read models from the log and checks they equal the live ones. Workers and
scheduling arrive with the next capability, so tasks here stay ``pending``
unless cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console

from pantheon_es.cli import tasks_table
from pantheon_es.client import PantheonClient
from pantheon_es.errors import PantheonError
from pantheon_es.node import Node, NodeConfig
from projections.projector import dump_tables, rebuild


async def run_demo(console: Console, data_dir: Path | None = None) -> bool:
    """Run the tour; True if the rebuilt read models equal the live ones."""
    with contextlib.ExitStack() as stack:
        base = data_dir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="pantheon-"))
        )
        node = Node(NodeConfig(data_dir=base))
        with console.status("starting an embedded nats-server and the services..."):
            await node.start()
        runner = asyncio.create_task(node.run())
        try:
            return await _tour(console, node)
        finally:
            with console.status("stopping..."):
                node.request_stop()
                await runner
            console.print("[green]stopped[/green]: services shut down, nats-server terminated")


async def _tour(console: Console, node: Node) -> bool:
    assert node.nc is not None and node.store is not None
    console.print(f"[bold]node up[/bold]: NATS {node.nats_url}, data in {node.config.data_dir}")
    client = PantheonClient(node.nc, subjects=node.subjects, actor="demo")

    console.rule("commands over NATS: pantheon.cmd.<tenant>.task.<verb>")
    jobs: list[tuple[str, dict[str, Any], str | int, dict[str, str]]] = [
        ("lint", {"kind": "shell", "argv": ["ruff", "check", "."]}, "high", {"team": "core"}),
        ("train", {"kind": "python", "target": "ml.train:main"}, "low", {"team": "ml"}),
        ("review", {"kind": "agent", "prompt": "Review the diff", "files": ["a.py"]}, "urgent", {}),
        ("docs", {"kind": "shell", "argv": ["make", "docs"]}, 250, {"team": "core"}),
    ]
    ids: dict[str, str] = {}
    for name, executor, priority, labels in jobs:
        result = await client.submit_task(name, executor, priority=priority, labels=labels)
        ids[name] = result["task_id"]
        console.print(f"submitted {name:<7} -> {result['task_id']} (stream seq {result['seq']})")
    first = await client.submit_task(
        "nightly", {"kind": "shell", "argv": ["true"]}, idempotency_key="nightly-1"
    )
    again = await client.submit_task(
        "nightly", {"kind": "shell", "argv": ["true"]}, idempotency_key="nightly-1"
    )
    console.print(
        f"submitted nightly twice with one idempotency key -> {first['task_id']} both times: "
        f"{first == again}"
    )
    cancelled = await client.cancel_task(ids["train"], reason="dataset not ready")
    console.print(f"cancelled train -> {cancelled['status']}")

    console.rule("bad input: a typed error, nothing appended")
    before = await node.store.last_seq()
    for label, body in (("malformed JSON", b"{oops"), ("no executor", orjson.dumps({"name": "x"}))):
        reply = orjson.loads(
            (await node.nc.request(node.subjects.command("default", "task", "submit"), body)).data
        )
        console.print(f"{label:<15} -> {reply['error']['code']}: {reply['error']['message']}")
    try:
        await client.cancel_task("01J00000000000000000000000")
    except PantheonError as err:
        console.print(f"{'unknown task':<15} -> {err.code.value}: {err.message}")
    console.print(f"stream last sequence unchanged: {await node.store.last_seq() == before}")

    console.rule("read models (SQLite projection, queried over NATS)")
    page = await client.list_tasks(limit=10)
    console.print(tasks_table(page["items"]))
    console.print(
        f"{page['total']} tasks; tasks stay pending: workers and the scheduler "
        "arrive with the next capability (see README, 'Not finished yet')"
    )

    console.rule("the log is the truth")
    head = await node.store.last_seq()
    async with node.store.feed(from_seq=1) as feed:
        seen = 0
        while seen < head:
            for raw in await feed.next_batch(timeout=5):
                event: dict[str, Any] = orjson.loads(raw.data)
                console.print(
                    f"{raw.seq:>4}  {event['type']:<14} "
                    f"task/{event['aggregate_id']}  by {event['actor']}",
                    highlight=False,
                )
                seen = raw.seq
    assert node.projector is not None
    await node.projector.wait_for(head)
    rebuilt = node.config.data_dir / "rebuilt.db"
    applied = await rebuild(node.store, rebuilt)
    same = await dump_tables(node.projector.db_path) == await dump_tables(rebuilt)
    console.print(
        f"rebuilt every read model from sequence 1 to {applied} into {rebuilt.name}: "
        + ("[green]identical to the live tables[/green]" if same else "[red]DIFFERENT[/red]")
    )
    return same
