"""Foundation benchmark: appends and projection against raw JetStream, in one run.

    python -m tools.bench [--events 20000] [--window 256] [--rounds 3] [--json]

Starts an embedded nats-server (or uses --nats-url) and measures, alternating
rounds so machine noise hits both sides alike:

* raw append: pipelined ``js.publish`` of the same payloads with the same
  headers (``Nats-Msg-Id``, ``Nats-Expected-Last-Subject-Sequence``), versus
  ``EventStore.append`` (one decision = one event, new aggregate each);
* raw read: nats-py's ordered push consumer counting every message, versus the
  projector folding the same events into SQLite (with and without the KV
  state writes); also Pantheon's own feed counting them (the projector's input:
  its ordered consumer reads raw messages, docs/decisions.md).

Targets (issue 2, this 2-core machine): appends >= 70% of raw; projector
>= 20,000 events/s and >= 30% of the raw read rate. Figures are printed,
never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from nats.js.api import DeliverPolicy

from pantheon_es import connection, ids, logs
from pantheon_es.embedded import EmbeddedNats
from pantheon_es.events import Event, encode, make_event
from pantheon_es.gc_tuning import tune_gc
from pantheon_es.specs import Resources, ShellSpec
from pantheon_es.store import EventStore, StoreConfig
from pantheon_es.subjects import Subjects
from pantheon_es.tasks import TaskCancelled, TaskSubmitted
from projections.projector import Projector


def submitted(tenant: str = "default") -> Event[Any]:
    data = TaskSubmitted(
        name="bench",
        executor=ShellSpec(argv=["true"]),
        priority=200,
        resources=Resources(),
        labels={"bench": "yes"},
    )
    return as_event(data, ids.new_id(), tenant)


def cancelled(task_id: str, tenant: str = "default") -> Event[Any]:
    return as_event(TaskCancelled(reason="bench", previous_status="pending"), task_id, tenant)


def as_event(data: Any, task_id: str, tenant: str) -> Event[Any]:
    return make_event(
        data,
        event_id=ids.new_id(),
        tenant=tenant,
        aggregate_id=task_id,
        occurred_at=datetime.now(UTC),
        actor="bench",
        correlation_id="bench",
        causation_id=None,
    )


async def pipelined(items: list[Any], window: int, fn: Callable[[Any], Awaitable[Any]]) -> float:
    """Seconds to run ``fn`` over ``items`` with ``window`` calls in flight (a sliding
    window: each call that ends lets the next one start)."""
    start = time.perf_counter()
    todo = iter(items)

    async def lane() -> None:
        for item in todo:  # the lanes share one iterator: each item runs once
            await fn(item)

    await asyncio.gather(*(lane() for _ in range(min(window, len(items)))))
    return time.perf_counter() - start


async def raw_append(js: Any, subjects: Subjects, events: list[Event[Any]], window: int) -> float:
    prepared = [
        (
            subjects.aggregate(e.tenant, e.aggregate, e.aggregate_id),
            encode(e),
            {"Nats-Msg-Id": e.event_id, "Nats-Expected-Last-Subject-Sequence": "0"},
        )
        for e in events
    ]

    async def one(p: tuple[str, bytes, dict[str, str]]) -> None:
        await js.publish(p[0], p[1], headers=p[2])

    return len(prepared) / await pipelined(prepared, window, one)


async def store_append(
    store: EventStore, events: list[Event[Any]], window: int, expected: dict[str, int] | None = None
) -> float:
    """Append each event as one decision; ``expected`` maps aggregate id -> its last seq."""
    seqs = expected if expected is not None else {}

    async def one(e: Event[Any]) -> None:
        r = await store.append([e], expected_seq=seqs.get(e.aggregate_id, 0))
        seqs[e.aggregate_id] = r.last_seq

    return len(events) / await pipelined(events, window, one)


async def raw_read(js: Any, stream: str, subject: str, total: int) -> float:
    done = asyncio.Event()
    count = 0

    async def cb(msg: Any) -> None:
        nonlocal count
        count += 1
        if count >= total:
            done.set()

    start = time.perf_counter()
    sub = await js.subscribe(
        subject,
        stream=stream,
        cb=cb,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL,
        pending_msgs_limit=1_000_000,
        pending_bytes_limit=1 << 30,
    )
    await done.wait()
    elapsed = time.perf_counter() - start
    await sub.unsubscribe()
    return total / elapsed


async def feed_read(store: EventStore, total: int) -> float:
    """Pantheon's own ordered consumer (EventFeed on a Connection), counting events."""
    start = time.perf_counter()
    count = 0
    async with store.feed(from_seq=1) as feed:
        while count < total:
            count += len(await feed.next_batch(2000, timeout=10))
    return total / (time.perf_counter() - start)


async def project(store: EventStore, db: Path, total: int, *, kv: bool) -> float:
    projector = Projector(store, db, kv=kv)
    await projector.open()
    tune_gc()  # what `pantheon up` does once it has started
    start = time.perf_counter()
    await projector.catch_up(total)
    if kv and projector._kv_pending is not None:
        await projector._kv_pending  # the KV writes of the last batch count too
    elapsed = time.perf_counter() - start
    await projector.shutdown()
    return total / elapsed


async def bench(url: str, n: int, window: int, rounds: int, workdir: Path) -> dict[str, Any]:
    nc = await connection.connect(url, pending_size=256 * 1024 * 1024)
    tune_gc()  # the node's GC settings, for both sides of every comparison
    results: dict[str, list[float]] = {k: [] for k in ("raw_append", "store_append")}
    try:
        for r in range(rounds):
            # Separate namespaces so both sides write into equally empty streams.
            raw_ns, store_ns = Subjects(f"braw{r}"), Subjects(f"bstore{r}")
            raw_store = EventStore(nc, raw_ns, StoreConfig())
            store = EventStore(nc, store_ns, StoreConfig())
            await raw_store.provision()
            await store.provision()
            order = [("raw", raw_store), ("store", store)]
            if r % 2:
                order.reverse()
            for kind, target in order:
                events = [submitted() for _ in range(n)]
                if kind == "raw":
                    results["raw_append"].append(
                        await raw_append(target.js, raw_ns, events, window)
                    )
                else:
                    results["store_append"].append(await store_append(target, events, window))
            print(
                f"round {r + 1}/{rounds}: raw append {results['raw_append'][-1]:,.0f}/s, "
                f"store append {results['store_append'][-1]:,.0f}/s",
                file=sys.stderr,
            )

        # Read side: one stream with submits and cancels (cancels need a row loaded).
        read_ns = Subjects("bread")
        store = EventStore(nc, read_ns, StoreConfig())
        await store.provision()
        subs = [submitted() for _ in range(n)]
        seqs: dict[str, int] = {}
        await store_append(store, subs, window, seqs)
        await store_append(store, [cancelled(e.aggregate_id) for e in subs[: n // 2]], window, seqs)
        total = await store.last_seq()
        reads: dict[str, list[float]] = {
            "raw_read": [],
            "feed_read": [],
            "projector": [],
            "projector_kv": [],
        }
        for r in range(rounds):
            # Alternate the order, as for appends, so drift hits every side alike.
            steps = [
                ("raw_read", raw_read(store.js, store.stream, read_ns.all_events, total)),
                ("feed_read", feed_read(store, total)),
                ("projector", project(store, workdir / f"p{r}.db", total, kv=False)),
                ("projector_kv", project(store, workdir / f"k{r}.db", total, kv=True)),
            ]
            for name, step in steps if r % 2 == 0 else reversed(steps):
                reads[name].append(await step)
            print(
                f"round {r + 1}/{rounds}: raw read {reads['raw_read'][-1]:,.0f}/s, "
                f"feed {reads['feed_read'][-1]:,.0f}/s, projector "
                f"{reads['projector'][-1]:,.0f}/s, with KV {reads['projector_kv'][-1]:,.0f}/s",
                file=sys.stderr,
            )
    finally:
        await nc.close()
    med = {k: statistics.median(v) for k, v in {**results, **reads}.items()}
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "nats_server": str(nc.connected_server_version).split(" v")[-1].rstrip(">"),
        },
        "events": n,
        "read_events": total,
        "window": window,
        "rounds": rounds,
        "median_per_s": {k: round(v) for k, v in med.items()},
        "append_ratio": round(med["store_append"] / med["raw_append"], 3),
        "projector_ratio": round(med["projector"] / med["raw_read"], 3),
        "projector_kv_ratio": round(med["projector_kv"] / med["raw_read"], 3),
        "targets": {"append_ratio": 0.70, "projector_per_s": 20_000, "projector_ratio": 0.30},
    }


def render(res: dict[str, Any]) -> str:
    m = res["median_per_s"]
    mach = res["machine"]
    lines = [
        f"machine: {mach['cpus']} CPUs, Python {mach['python']}, nats-server {mach['nats_server']}",
        f"Pantheon-ES foundation bench: {res['events']:,} appends per side, "
        f"{res['read_events']:,} events read, window {res['window']}, "
        f"median of {res['rounds']} rounds",
        "",
        f"  raw js.publish (same headers)     {m['raw_append']:>10,} events/s",
        f"  EventStore.append                 {m['store_append']:>10,} events/s"
        f"   ratio {res['append_ratio']:.2f}  (target >= 0.70)",
        "",
        f"  raw ordered-consumer read         {m['raw_read']:>10,} events/s",
        f"  EventFeed read (no projection)    {m['feed_read']:>10,} events/s"
        f"   ratio {m['feed_read'] / m['raw_read']:.2f}",
        f"  projector -> SQLite               {m['projector']:>10,} events/s"
        f"   ratio {res['projector_ratio']:.2f}  (target >= 0.30 and >= 20,000/s)",
        f"  projector -> SQLite + KV state    {m['projector_kv']:>10,} events/s"
        f"   ratio {res['projector_kv_ratio']:.2f}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=20_000, help="appends per side per round")
    parser.add_argument("--window", type=int, default=256, help="appends in flight")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nats-url", help="use this server instead of an embedded one")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    logs.configure("warning")
    with tempfile.TemporaryDirectory(prefix="pantheon-bench-") as tmp:
        work = Path(tmp)
        if args.nats_url:
            res = asyncio.run(bench(args.nats_url, args.events, args.window, args.rounds, work))
        else:
            with EmbeddedNats(work / "nats") as server:
                res = asyncio.run(bench(server.url, args.events, args.window, args.rounds, work))
    print(orjson.dumps(res, option=orjson.OPT_INDENT_2).decode() if args.json else render(res))


if __name__ == "__main__":
    main()
