"""Replay and restart benchmark: a log of --events events, read, replayed and restarted from.

    python -m tools.bench_replay [--events 1000000] [--keep DIR] [--json]

In one run, against an embedded nats-server:

1. generates the log: realistic task lives (submitted, leased, started,
   completed; a message sent and delivered to every other task; ~1% left
   pending) from a few workers, as valid encoded events built from templates of
   the real event models, published pipelined;
2. raw read: an ordered push consumer counting every event (events/s);
3. replay: the projector (``kv=False``) folding the whole log into a fresh
   SQLite file (events/s, and the ratio to the raw read; target >= 0.30);
   this is also the read side's restart without a snapshot;
4. node without a snapshot: ``pantheon up --nats-url ... --workers 0`` on an
   empty data directory: seconds to serving (discovery file written, queries
   answered) and to its read models at the log's head;
5. ``pantheon snapshot`` of that node's read models while it runs; then a tail
   of 1% more events is appended;
6. read side with the snapshot: the projector on an empty file restores the
   snapshot and applies the tail (seconds, restore apart);
7. node with the snapshot: ``pantheon up`` on another empty data directory.

Figures are printed, never asserted. --keep DIR keeps the server's store and
the databases in DIR (which must not exist yet) instead of a temporary one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from nats.aio.client import Client as NATS
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from pantheon_es import connection, ids, logs
from pantheon_es.embedded import EmbeddedNats
from pantheon_es.events import EventData, encode, make_event
from pantheon_es.gc_tuning import tune_gc
from pantheon_es.mailbox import MessagesDelivered, MessageSent
from pantheon_es.node import DB_NAME
from pantheon_es.specs import PythonSpec, Resources
from pantheon_es.store import EventStore, StoreConfig
from pantheon_es.subjects import Subjects
from pantheon_es.tasks import LeaseGranted, TaskCompleted, TaskStarted, TaskSubmitted
from pantheon_es.workers import Capacity, WorkerRegistered
from projections.projector import Projector
from projections.snapshots import read_checkpoint
from tools.bench import raw_read
from tools.bench_tasks import Node

ROOT = "pantheon"
TENANT = "default"
NOOP = "tools.bench_targets:noop"
WORKERS = 4
err = Console(stderr=True)

# Placeholders: as long as a real id (26 characters), replaced in the encoded bytes.
EID, TID, LID, WID, MID, SID = (f"{c}" * 26 for c in "EGLWMS")
_NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _template(data: EventData, aggregate_id: str) -> bytes:
    event = make_event(
        data,
        event_id=EID,
        tenant=TENANT,
        aggregate_id=aggregate_id,
        occurred_at=_NOW,
        actor="bench-replay",
        correlation_id=TID,
        causation_id=None,
    )
    return encode(event)


def templates() -> dict[str, bytes]:
    """One encoded event per kind, ids as placeholders (the real models validate the data)."""
    expires = _NOW + timedelta(seconds=30)
    return {
        "worker": _template(
            WorkerRegistered(incarnation=EID, capacity=Capacity(cpu=64, memory_mb=65536), slots=256,
                             labels={}, hostname="bench", pid=1, version="bench", ttl=15,
                             expires_at=expires),
            WID,
        ),
        "submitted": _template(
            TaskSubmitted(name="replay-bench", executor=PythonSpec(target=NOOP), priority=200,
                          resources=Resources(), labels={"bench": "replay"}),
            TID,
        ),
        "granted": _template(
            LeaseGranted(lease_id=LID, worker_id=WID, attempt=1, fencing_token=1,
                         expires_at=expires, ttl=30),
            TID,
        ),
        "started": _template(TaskStarted(lease_id=LID, started_at=_NOW, pid=4242), TID),
        "completed": _template(TaskCompleted(lease_id=LID, result={"ok": True, "n": 42}), TID),
        "sent": _template(
            MessageSent(message_id=MID, sender=SID, priority="medium", type="update",
                        body="progress: step 3 of 5 done"),
            TID,
        ),
        "delivered": _template(MessagesDelivered(message_ids=[MID], read=True), TID),
    }  # fmt: skip


def events(
    n: int, subjects: Subjects, first_task: int = 0, *, messages: bool = True
) -> Iterator[tuple[str, bytes]]:
    """(subject, payload) of ``n`` events: workers first, then task lives (every
    100th task left pending; with ``messages``, every other one sends a message)."""
    t = templates()
    workers = [ids.new_id() for _ in range(WORKERS)]
    made = 0
    if first_task == 0:
        for w in workers:
            yield (
                subjects.aggregate(TENANT, "worker", w),
                t["worker"]
                .replace(WID.encode(), w.encode())
                .replace(EID.encode(), ids.new_id().encode()),
            )
            made += 1
    previous = ids.new_id()
    i = first_task
    while made < n:
        task = ids.new_id().encode()
        lease = ids.new_id().encode()
        worker = workers[i % WORKERS].encode()
        subject = subjects.aggregate(TENANT, "task", task.decode())
        mailbox = subjects.aggregate(TENANT, "mailbox", task.decode())
        life = _life(i, messages)
        message = ids.new_id().encode()
        for kind in life:
            if made >= n:
                return
            payload = (
                t[kind]
                .replace(TID.encode(), task)
                .replace(EID.encode(), ids.new_id().encode())
                .replace(LID.encode(), lease)
                .replace(WID.encode(), worker)
                .replace(MID.encode(), message)
                .replace(SID.encode(), previous.encode())
            )
            yield (mailbox if kind in ("sent", "delivered") else subject), payload
            made += 1
        previous = task.decode()
        i += 1


async def publish(nc: NATS, store: EventStore, items: Iterator[tuple[str, bytes]], n: int) -> float:
    """Publish pipelined: plain publishes, every WINDOW-th one waits for its ack.

    The server stores one connection's messages in order, so that ack covers the
    window before it; the count is checked at the end.
    """
    window = 1000
    js = store.js
    before = await store.last_seq()
    start = time.perf_counter()
    with _progress() as bar:
        job = bar.add_task("generating the log", total=n)
        for k, (subject, payload) in enumerate(items, 1):
            if k % window == 0 or k == n:
                await js.publish(subject, payload)
                bar.update(job, completed=k)
            else:
                await nc.publish(subject, payload)
    elapsed = time.perf_counter() - start
    stored = await store.last_seq() - before
    if stored != n:
        raise SystemExit(f"published {n} events but the stream stored {stored}")
    return elapsed


def _life(i: int, messages: bool) -> list[str]:
    """The events of the ``i``-th task's life, by template name."""
    life = ["submitted"] if i % 100 == 99 else ["submitted", "granted", "started", "completed"]
    if messages and i % 2 == 0:
        life[1:1] = ["sent", "delivered"]
    return life


def lives_events(tasks: int, *, messages: bool = False) -> int:
    """How many events :func:`events` makes for ``tasks`` task lives."""
    return WORKERS + sum(len(_life(i, messages)) for i in range(tasks))


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )


async def replay(store: EventStore, db: Path, head: int, *, snapshots: bool) -> dict[str, Any]:
    """The read side from an empty file to ``head``: seconds (restore apart) and events/s."""
    projector = Projector(store, db, kv=False, snapshots=snapshots)
    start = time.perf_counter()
    await projector.open()
    opened = time.perf_counter()
    from_seq = projector.position
    with _progress() as bar:
        job = bar.add_task("replaying", total=head - from_seq)
        await projector.catch_up(
            head, progress=lambda pos, _t: bar.update(job, completed=pos - from_seq)
        )
    end = time.perf_counter()
    await projector.shutdown()
    applied = head - from_seq
    return {
        "seconds": round(end - start, 3),
        "open_seconds": round(opened - start, 3),
        "events_applied": applied,
        "events_per_s": round(applied / (end - opened)) if applied else None,
        "restored": projector.restored.as_dict() if projector.restored else None,
    }


def _checkpoint(db: Path) -> int:
    if not db.exists():
        return 0
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None)
    try:
        return read_checkpoint(con, "main")[0]
    except sqlite3.DatabaseError:
        return 0
    finally:
        con.close()


def node_start(data_dir: Path, url: str, head: int, *, snapshot: bool) -> dict[str, Any]:
    """`pantheon up` on an empty data dir: seconds to serving and to read models at ``head``."""
    data_dir.mkdir(parents=True)
    start = time.perf_counter()
    with Node(data_dir, "--nats-url", url, "--workers", "0") as node:
        serving = time.perf_counter() - start
        db = data_dir / DB_NAME
        while _checkpoint(db) < head:
            if node.proc is not None and node.proc.poll() is not None:
                raise SystemExit(f"pantheon up died: {(data_dir / 'up.log').read_text()}")
            time.sleep(0.05)
        caught_up = time.perf_counter() - start
        rss = node.rss_mb()
        snap = None
        if snapshot:
            snap = pantheon_snapshot(data_dir, url)
    return {
        "serving_seconds": round(serving, 3),
        "caught_up_seconds": round(caught_up, 3),
        "node_rss_mb": rss,
        "snapshot": snap,
    }


def pantheon_snapshot(data_dir: Path, url: str) -> dict[str, Any]:
    """`pantheon snapshot --json` of a running node's read models, timed."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pantheon_es.cli", "snapshot", "--data-dir", str(data_dir),
         "--nats-url", url, "--json"],
        capture_output=True, cwd=Path(__file__).resolve().parents[1], check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"pantheon snapshot failed: {done.stderr.decode()}")
    made: dict[str, Any] = orjson.loads(done.stdout)["snapshot"]
    made["seconds"] = round(time.perf_counter() - start, 3)
    return made


async def bench(n: int, url: str, work: Path) -> dict[str, Any]:
    nc = await connection.connect(url, pending_size=512 * 1024 * 1024)
    subjects = Subjects(ROOT)
    store = EventStore(nc, subjects, StoreConfig())
    await store.provision()
    tune_gc()
    result: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "nats_server": str(nc.connected_server_version).split(" v")[-1].rstrip(">"),
        },
        "events": n,
    }
    try:
        gen = await publish(nc, store, events(n, subjects), n)
        head = await store.last_seq()
        info = await store.js.stream_info(store.stream)
        result["generate"] = {
            "seconds": round(gen, 2),
            "events_per_s": round(n / gen),
            "stream_mb": round((info.state.bytes or 0) / 2**20, 1),
        }
        err.print(f"log: {head:,} events, {result['generate']['stream_mb']} MiB in {gen:.1f} s")
        # Raw read and replay, in both orders around the replay (the host is noisy).
        raw_first = await raw_read(store.js, store.stream, subjects.all_events, head)
        err.print(f"raw ordered-consumer read: {raw_first:,.0f} events/s")
        full = await replay(store, work / "replay.db", head, snapshots=False)
        err.print(f"replay: {full['events_per_s']:,} events/s in {full['seconds']} s")
        raw_after = await raw_read(store.js, store.stream, subjects.all_events, head)
        err.print(f"raw ordered-consumer read: {raw_after:,.0f} events/s")
        raw = (raw_first + raw_after) / 2
        result["raw_read_per_s"] = round(raw)
        result["replay"] = full
        result["replay_ratio"] = round(full["events_per_s"] / raw, 3)

        err.print("node on an empty data dir, no snapshot ...")
        result["node_no_snapshot"] = await asyncio.to_thread(
            node_start, work / "node-1", url, head, snapshot=True
        )
        snap = result["node_no_snapshot"].pop("snapshot")
        result["snapshot"] = snap
        err.print(
            f"  serving {result['node_no_snapshot']['serving_seconds']} s, read models at head "
            f"{result['node_no_snapshot']['caught_up_seconds']} s; snapshot at "
            f"{snap['last_seq']:,}: {snap['size'] / 2**20:.1f} MiB in {snap['seconds']} s"
        )

        tail = max(1, n // 100)
        await publish(nc, store, events(tail, subjects, first_task=n), tail)
        head = await store.last_seq()
        result["tail_events"] = head - snap["last_seq"]
        restored = await replay(store, work / "restored.db", head, snapshots=True)
        result["restore"] = restored
        err.print(
            f"read side with the snapshot: {restored['seconds']} s "
            f"(restore {restored['open_seconds']} s, tail {restored['events_applied']:,} events)"
        )
        err.print("node on an empty data dir, with the snapshot ...")
        result["node_with_snapshot"] = await asyncio.to_thread(
            node_start, work / "node-2", url, head, snapshot=False
        )
        result["node_with_snapshot"].pop("snapshot")
    finally:
        await nc.close()
    return result


def render(r: dict[str, Any]) -> str:
    m, g = r["machine"], r["generate"]
    full, rest = r["replay"], r["restore"]
    n1, n2, snap = r["node_no_snapshot"], r["node_with_snapshot"], r["snapshot"]
    return "\n".join(
        [
            f"machine: {m['cpus']} CPUs, Python {m['python']}, nats-server {m['nats_server']}",
            f"log: {r['events']:,} events ({g['stream_mb']} MiB), generated at "
            f"{g['events_per_s']:,} events/s",
            "",
            f"  raw ordered-consumer read      {r['raw_read_per_s']:>10,} events/s",
            f"  replay -> SQLite (kv=False)    {full['events_per_s']:>10,} events/s"
            f"   ratio {r['replay_ratio']:.2f}  (target >= 0.30)",
            "",
            "  restart of the read side (empty data dir, log of "
            f"{r['events'] + r['tail_events']:,} events)",
            f"    without a snapshot (full replay)     {full['seconds']:>8.1f} s",
            f"    with a snapshot (restore + tail)     {rest['seconds']:>8.1f} s"
            f"   (restore {rest['open_seconds']} s of a {snap['size'] / 2**20:.0f} MiB snapshot,"
            f" tail {rest['events_applied']:,} events)",
            "",
            "  pantheon up on an empty data dir      serving    read models at head",
            f"    without a snapshot                 {n1['serving_seconds']:>6.1f} s"
            f"   {n1['caught_up_seconds']:>8.1f} s",
            f"    with a snapshot                    {n2['serving_seconds']:>6.1f} s"
            f"   {n2['caught_up_seconds']:>8.1f} s",
            f"  pantheon snapshot of a running node: {snap['seconds']} s "
            f"({snap['size'] / 2**20:.1f} MiB at sequence {snap['last_seq']:,})",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=1_000_000, help="events in the log")
    parser.add_argument("--keep", type=Path, help="work in DIR (must not exist) and keep it")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if args.events < 100:
        parser.error("--events must be at least 100")
    logs.configure("warning")
    with contextlib.ExitStack() as stack:
        if args.keep is not None:
            if args.keep.exists():
                parser.error(f"--keep {args.keep}: already exists")
            work = args.keep
            work.mkdir(parents=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pantheon-replay-")))
        server = stack.enter_context(EmbeddedNats(work / "nats"))
        result = asyncio.run(bench(args.events, server.url, work))
    print(
        orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() if args.json else render(result)
    )


if __name__ == "__main__":
    main()
