"""``pantheon demo``: agents and tasks end to end, on an embedded nats-server.

Starts a node (embedded NATS, command service, scheduler, read side) with two
local worker processes in a temporary directory, and as a client over NATS:
spawns three built-in offline agents that coordinate by message, runs a shell
task and cancels a running one, sends bad input, shows the monitor and the
message audit trail, then rebuilds the read models from the log and checks
they equal the live ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

from pantheon_es import ids
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
        node = Node(NodeConfig(data_dir=base, workers=2))
        with console.status("starting nats-server, services and two worker processes..."):
            await node.start()
        runner = asyncio.create_task(node.run())
        try:
            return await _tour(console, node)
        finally:
            with console.status("stopping (workers hand back what they run)..."):
                node.request_stop()
                await runner
            console.print("[green]stopped[/green]: workers, services and nats-server are down")


async def _wait_for_workers(client: PantheonClient, n: int) -> None:
    for _ in range(300):
        if int((await client.list_workers(status=["active"]))["total"]) >= n:
            return
        await asyncio.sleep(0.1)
    raise RuntimeError("workers did not register")


async def _tour(console: Console, node: Node) -> bool:
    assert node.nc is not None and node.store is not None and node.projector is not None
    console.print(f"[bold]node up[/bold]: NATS {node.nats_url}, data in {node.config.data_dir}")
    client = PantheonClient(node.nc, subjects=node.subjects, actor="demo", timeout=30)
    with console.status("waiting for the workers to register..."):
        await _wait_for_workers(client, 2)

    console.rule("three agents coordinate by message (built-in offline agent)")
    lead, helper_a, helper_b = ids.new_id(), ids.new_id(), ids.new_id()
    await client.spawn_agent(
        "\n".join(
            [
                "Plan the review and split it between two helpers.",
                f"/send {helper_a} high instruction review the scheduler",
                f"/send {helper_b} urgent instruction review the projector",
                "/progress 50 waiting for the helpers",
                "/recv 2 60",
                '/result {"plan": "done", "reviews": 2}',
            ]
        ),
        agent_id=lead,
        name="lead",
    )
    for me, part in ((helper_a, "scheduler"), (helper_b, "projector")):
        await client.spawn_agent(
            f"/recv 1 60\n/send {lead} medium update the {part} looks fine",
            agent_id=me,
            name=f"helper-{part}",
        )
    reviewer = (
        await client.spawn_agent("Summarise the notes", files=[str(_readme())], name="reader")
    )["agent_id"]
    for agent in (lead, helper_a, helper_b, reviewer):
        done = await client.wait_for_task(agent, timeout=90)
        console.print(
            f"{done['name']:<17} {done['status']:<10} {done['duration_s']:.2f}s  "
            f"result {orjson.dumps(done['result']).decode()[:90]}",
            highlight=False,
        )

    console.rule("a shell task, its result and what it used")
    busy = "import time; t=time.time()\nwhile time.time()-t < 1.2: pass\nprint('busy for 1.2 s')"
    shell = (
        await client.submit_task("busy", {"kind": "shell", "argv": [sys.executable, "-c", busy]})
    )["task_id"]
    done = await client.wait_for_task(shell, timeout=60)
    console.print(
        f"busy {done['status']} exit {done['result']['exit_code']}: "
        f"{done['result']['stdout_tail'].strip()!r}; measured CPU {done['cpu_percent']}%, "
        f"memory {done['memory_mb']} MiB (psutil, by its worker)",
        highlight=False,
    )

    console.rule("a running task, cancelled: its worker stops it")
    sleeper = (
        await client.submit_task(
            "sleeper",
            {"kind": "shell", "argv": [sys.executable, "-c", "import time; time.sleep(60)"]},
        )
    )["task_id"]
    running = await client.wait_for_task(sleeper, timeout=60, statuses=frozenset({"running"}))
    await client.cancel_task(sleeper, reason="demo: changed my mind")
    cancelled = await client.wait_for_task(sleeper, timeout=30)
    console.print(
        f"sleeper was {running['status']} on {running['worker_id']}, now {cancelled['status']}",
        highlight=False,
    )

    console.rule("bad input: a typed error, nothing appended")
    before = await node.store.last_seq()
    subject = node.subjects.command("default", "task", "submit")
    for label, body in (("malformed JSON", b"{oops"), ("no executor", orjson.dumps({"name": "x"}))):
        reply = orjson.loads((await node.nc.request(subject, body)).data)
        console.print(f"{label:<16} -> {reply['error']['code']}: {reply['error']['message']}")
    for label, attempt in (
        ("unknown agent", client.send_message(ids.new_id(), "hello?")),
        ("finished agent", client.send_message(reviewer, "too late")),
        ("stale lease", client.heartbeat(shell, "old-lease", 1)),
    ):
        try:
            await attempt
        except PantheonError as err:
            console.print(f"{label:<16} -> {err.code.value}: {err.message}", highlight=False)
    console.print(f"stream last sequence unchanged: {await node.store.last_seq() == before}")

    console.rule("monitor (read model, queried over NATS)")
    view = await client.monitor()
    console.print(", ".join(f"{n} {s}" for s, n in view["totals"].items() if n))
    table = Table("AGENT", "NAME", "STATUS", "STARTED", "DURATION", "TASK")
    for a in view["agents"]:
        table.add_row(
            a["agent_id"][-8:],
            a["name"],
            a["status"],
            (a["started_at"] or "-")[11:19],
            f"{a['duration_s']:.2f}s" if a["duration_s"] is not None else "-",
            a["task"].splitlines()[0][:50],
        )
    console.print(table)

    console.rule("the message audit trail")
    names = {lead: "lead", helper_a: "helper-scheduler", helper_b: "helper-projector"}
    for m in (await client.list_messages())["items"]:
        console.print(
            f"{names.get(m['sender'], m['sender']):>16} -> {names.get(m['recipient'], '?'):<16} "
            f"{m['priority']:<6} {m['type']:<11} sent {m['sent_at'][11:23]} "
            f"read {m['read_at'][11:23]}  {m['body']!r}",
            highlight=False,
        )

    console.rule("the log is the truth")
    head = await node.store.last_seq()
    kinds: Counter[str] = Counter()
    async with node.store.feed(from_seq=1) as feed:
        seen = 0
        while seen < head:
            for raw in await feed.next_batch(timeout=5):
                event: dict[str, Any] = orjson.loads(raw.data)
                kinds[event["type"]] += 1
                seen = raw.seq
    console.print(f"{head} events: " + ", ".join(f"{n} {t}" for t, n in kinds.most_common()))
    await node.projector.wait_for(head)
    rebuilt = node.config.data_dir / "rebuilt.db"
    applied = await rebuild(node.store, rebuilt)
    same = await dump_tables(node.projector.db_path) == await dump_tables(rebuilt)
    console.print(
        f"rebuilt every read model from sequence 1 to {applied}: "
        + ("[green]identical to the live tables[/green]" if same else "[red]DIFFERENT[/red]")
    )
    return same


def _readme() -> Path:
    here = Path(__file__).resolve().parents[1] / "README.md"
    return here if here.exists() else Path(__file__)
