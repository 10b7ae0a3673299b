"""Replay and verify benchmark: their read rates against raw JetStream, in one run.

    python -m tools.bench_verify [--tasks 10000] [--rounds 3] [--json]

Fills a fresh stream with whole task lives (submitted, leased, started,
renewed, completed: 5 events a task, on workers that registered first, so
every invariant has work to do), then measures, alternating rounds so that
machine noise hits every side alike:

* raw read: an ordered push consumer counting every message (tools.bench);
* ``replay``: the read models rebuilt into a new file (tools.replay);
* ``verify``: the rebuild, the table comparison and the invariant fold
  (tools.verify), against a live-like database built by the first replay;
* the invariant fold alone over decoded records, in memory.

Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from pantheon_es import connection, ids, logs
from pantheon_es.embedded import EmbeddedNats
from pantheon_es.events import EventData, EventRecord, decode_record, make_event
from pantheon_es.gc_tuning import tune_gc
from pantheon_es.store import EventStore, StoreConfig
from pantheon_es.subjects import Subjects
from pantheon_es.tasks import LeaseGranted, LeaseRenewed, TaskCompleted, TaskStarted
from pantheon_es.workers import Capacity, WorkerRegistered
from tools.bench import raw_read, store_append, submitted
from tools.invariants import InvariantChecker
from tools.replay import replay
from tools.verify import verify

WORKERS = 8


def _event(data: EventData, aggregate_id: str, at: datetime) -> Any:
    return make_event(data, event_id=ids.new_id(), tenant="default", aggregate_id=aggregate_id,
                      occurred_at=at, actor="bench", correlation_id="bench",
                      causation_id=None)  # fmt: skip


def stages(tasks: int) -> list[list[Any]]:
    """The log in stages; each stage holds at most one event per aggregate."""
    now = datetime.now(UTC)
    later = now + timedelta(hours=1)
    registered = WorkerRegistered(
        incarnation="i", capacity=Capacity(cpu=4096, memory_mb=0), slots=tasks, labels={},
        hostname="h", pid=1, version="bench", ttl=30, expires_at=later,
    )  # fmt: skip
    workers = [_event(registered, f"w{i}", now) for i in range(WORKERS)]
    submits = [submitted() for _ in range(tasks)]
    out: list[list[Any]] = [workers, submits]
    lives: list[list[EventData]] = [
        [LeaseGranted(lease_id=f"L{s.aggregate_id}", worker_id=f"w{i % WORKERS}", attempt=1,
                      fencing_token=1, expires_at=later, ttl=30) for i, s in enumerate(submits)],
        [TaskStarted(lease_id=f"L{s.aggregate_id}", started_at=now) for s in submits],
        [LeaseRenewed(lease_id=f"L{s.aggregate_id}", expires_at=later, activity=True)
         for s in submits],
        [TaskCompleted(lease_id=f"L{s.aggregate_id}", result=1) for s in submits],
    ]  # fmt: skip
    for stage in lives:
        out.append([_event(d, s.aggregate_id, now) for d, s in zip(stage, submits, strict=True)])
    return out


async def fill(store: EventStore, tasks: int) -> int:
    expected: dict[str, int] = {}
    for stage in stages(tasks):
        await store_append(store, stage, 256, expected)
    return await store.last_seq()


async def bench(url: str, tasks: int, rounds: int, workdir: Path) -> dict[str, Any]:
    nc = await connection.connect(url, pending_size=256 * 1024 * 1024)
    tune_gc()  # what `pantheon replay` and `verify` do, for every side alike
    store = EventStore(nc, Subjects(f"bv{ids.new_id()[-6:].lower()}"), StoreConfig())
    await store.provision()
    total = await fill(store, tasks)
    rates: dict[str, list[float]] = {"raw_read": [], "replay": [], "verify": [], "fold": []}
    live = workdir / "live.db"
    await replay(store, live)
    records: list[EventRecord] = []
    async with store.feed() as feed:
        while len(records) < total:
            records += [decode_record(r.data, r.seq) for r in await feed.next_batch(5000, 10)]
    try:
        for r in range(rounds):
            rates["raw_read"].append(
                await raw_read(store.js, store.stream, store.subjects.all_events, total)
            )
            summary = await replay(store, workdir / f"replay-{r}.db")
            rates["replay"].append(total / summary.seconds)
            report = await verify(store, live)
            assert report.ok, "a benchmark log that does not verify"
            rates["verify"].append(total / report.seconds)
            checker = InvariantChecker()
            start = time.perf_counter()
            checker.feed(records)
            rates["fold"].append(total / (time.perf_counter() - start))
    finally:
        await nc.close()
    med = {k: round(statistics.median(v)) for k, v in rates.items()}
    return {
        "events": total,
        "rounds": rounds,
        "events_per_s": med,
        "ratio_to_raw_read": {
            k: round(med[k] / med["raw_read"], 3) for k in ("replay", "verify", "fold")
        },
    }


def render(res: dict[str, Any]) -> str:
    m, ratio = res["events_per_s"], res["ratio_to_raw_read"]
    return "\n".join(
        [
            f"replay/verify benchmark: {res['events']:,} events, median of {res['rounds']} rounds",
            f"  raw ordered-consumer read  {m['raw_read']:>10,} events/s",
            f"  pantheon replay            {m['replay']:>10,} events/s  ({ratio['replay']:.0%})",
            f"  pantheon verify            {m['verify']:>10,} events/s  ({ratio['verify']:.0%})",
            f"  invariant fold alone       {m['fold']:>10,} events/s  ({ratio['fold']:.0%})",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=10_000, help="task lives (5 events each)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nats-url", help="use this server instead of an embedded one")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    logs.configure("warning")
    with tempfile.TemporaryDirectory(prefix="pantheon-bench-") as tmp, ExitStack() as stack:
        url = args.nats_url or stack.enter_context(EmbeddedNats(Path(tmp) / "nats")).url
        res = asyncio.run(bench(url, args.tasks, args.rounds, Path(tmp)))
    print(orjson.dumps(res, option=orjson.OPT_INDENT_2).decode() if args.json else render(res))


if __name__ == "__main__":
    main()
