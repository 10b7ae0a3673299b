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

``--fold-only`` needs no server: it feeds :class:`~tools.invariants.InvariantChecker`
a synthetic history made of real event payloads (:func:`synthetic_history`, the
log of a system that keeps ``--window`` tasks live at a time), and reports the
fold's rate (tracing off), what the process's RSS grew by in the first round,
and the memory the checker keeps (``tracemalloc``, one more pass): bytes per task
after the fold, and the peak. ``--undelivered N`` (implies ``--mixed``) sends
every agent N more messages that nobody takes: left in its mailbox when it
finishes, or with ``--to-live`` sent to one of 1,000 mailboxes whose agents never
finish.

    python -m tools.bench_verify --fold-only --tasks 1000000 [--mixed]
    python -m tools.bench_verify --fold-only --tasks 1000000 --undelivered 10 [--to-live]

Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import psutil

from pantheon_es import connection, ids, logs
from pantheon_es.embedded import EmbeddedNats
from pantheon_es.events import EventData, EventRecord, decode_record, encode, make_event
from pantheon_es.gc_tuning import tune_gc
from pantheon_es.mailbox import MessagePriority, MessagesDelivered, MessageSent, MessageType
from pantheon_es.specs import ErrorInfo, Resources, ShellSpec
from pantheon_es.store import EventStore, StoreConfig
from pantheon_es.subjects import Subjects
from pantheon_es.tasks import (
    LeaseGranted,
    LeaseRenewed,
    TaskCompleted,
    TaskFailed,
    TaskStarted,
    TaskSubmitted,
)
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


# -- the fold alone, without a server ---------------------------------------------------------

#: Placeholders in the payload templates, replaced per task (26 characters, as ids are).
_TASK, _EVENT, _DEP, _EXTRA = (
    b"7ZZZZZZZZZZZZZZZZZZZZZTASK",
    b"7ZZZZZZZZZZZZZZZZZZZZEVENT",
    b"7ZZZZZZZZZZZZZZZZZZZZZZDEP",
    b"7ZZZZZZZZZZZZZZZZZZZZEXTRA",
)
#: Mailboxes of agents that never finish, for ``--undelivered N --to-live``.
LIVE_RECIPIENTS = 1000


def _templates() -> dict[str, bytes]:
    """One encoded event per step of a task's life, its ids to be replaced."""
    now = datetime.now(UTC)
    later = now + timedelta(hours=1)
    task, dep = _TASK.decode(), _DEP.decode()
    lease = f"L{task}"
    steps: dict[str, EventData] = {
        "submit": TaskSubmitted(name="bench", executor=ShellSpec(argv=["true"]), priority=200,
                                resources=Resources(), labels={"bench": "yes"}),
        "submit_dep": TaskSubmitted(name="bench", executor=ShellSpec(argv=["true"]), priority=200,
                                    resources=Resources(), labels={"bench": "yes"},
                                    depends_on=[dep]),
        "grant": LeaseGranted(lease_id=lease, worker_id="w0", attempt=1, fencing_token=1,
                              expires_at=later, ttl=30),
        "start": TaskStarted(lease_id=lease, started_at=now),
        "renew": LeaseRenewed(lease_id=lease, expires_at=later, activity=True),
        "complete": TaskCompleted(lease_id=lease, result=1),
        "fail": TaskFailed(lease_id=lease, error=ErrorInfo(type="Boom", message="bench")),
        "send_low": MessageSent(message_id=f"{task[:-1]}1", sender="s", type=MessageType.UPDATE,
                                priority=MessagePriority.LOW, body="b"),
        "send_high": MessageSent(message_id=f"{task[:-1]}2", sender="s", type=MessageType.UPDATE,
                                 priority=MessagePriority.HIGH, body="b"),
        "send_extra": MessageSent(message_id=_EXTRA.decode(), sender="s",
                                  type=MessageType.UPDATE, priority=MessagePriority.LOW, body="b"),
        "deliver": MessagesDelivered(message_ids=[f"{task[:-1]}2", f"{task[:-1]}1"]),
    }  # fmt: skip
    return {
        name: encode(make_event(data, event_id=_EVENT.decode(), tenant="default",
                                aggregate_id=task, occurred_at=now, actor="bench",
                                correlation_id="bench", causation_id=None))
        for name, data in steps.items()
    }  # fmt: skip


def _life(i: int, mixed: bool, window: int, undelivered: int = 0) -> list[str]:
    if not mixed or i % 10 in (0, 1, 2, 4, 6, 8, 9):
        return ["submit", "grant", "start", "renew", "complete"]
    if i % 10 == 3:  # a dead letter: kept for a redrive
        return ["submit", "grant", "start", "fail"]
    if i % 10 == 5 and i >= window:  # depends on a task that finished a window ago
        return ["submit_dep", "grant", "start", "renew", "complete"]
    # an agent: two messages to its mailbox, delivered highest priority first (the low
    # ones nobody takes are sent later, so they are not due before those two)
    extra = ["send_extra"] * undelivered
    return ["submit", "grant", "start", "send_low", "send_high", *extra, "deliver", "complete"]


def synthetic_history(
    tasks: int,
    window: int = 1000,
    mixed: bool = False,
    batch: int = 5000,
    undelivered: int = 0,
    to_live: bool = False,
) -> Iterator[list[EventRecord]]:
    """A valid history of ``tasks`` task lives, decoded as the feed decodes it, in batches.

    Tasks run ``window`` at a time (submitted, leased, started, renewed, completed, each
    step for the whole window), on 8 workers registered first. ``mixed``: of every 10
    tasks one fails (a dead letter), one depends on the task ``window`` before it, and one
    is an agent that is sent two messages (delivered in priority order); 5.1 events a task.
    ``undelivered``: each agent is also sent that many low-priority messages nobody takes,
    to its own mailbox (left there when it finishes) or, ``to_live``, to one of
    :data:`LIVE_RECIPIENTS` mailboxes whose agents never finish.
    Every payload is parsed afresh, so the checker keeps what ``verify`` would keep.
    """
    mixed = mixed or undelivered > 0
    live = [ids.new_id().encode() for _ in range(LIVE_RECIPIENTS if to_live else 0)]
    sent = 0
    templates = _templates()
    seq = 0
    out: list[EventRecord] = []
    now = datetime.now(UTC)
    registered = WorkerRegistered(
        incarnation="i", capacity=Capacity(cpu=4096, memory_mb=0), slots=window, labels={},
        hostname="h", pid=1, version="bench", ttl=30, expires_at=now + timedelta(hours=1),
    )  # fmt: skip
    for w in range(WORKERS):
        seq += 1
        out.append(decode_record(encode(_event(registered, f"w{w}", now)), seq))
    task_ids = [ids.new_id() for _ in range(min(tasks, window))]
    for first in range(0, tasks, window):
        chunk = range(first, min(first + window, tasks))
        previous, task_ids = task_ids, [ids.new_id() for _ in chunk]
        lives = [_life(i, mixed, window, undelivered) for i in chunk]
        for step in range(max(map(len, lives))):
            for j, life in enumerate(lives):
                if step >= len(life):
                    continue
                task = task_ids[j].encode()
                payload = templates[life[step]].replace(_TASK, task)
                payload = payload.replace(_EVENT, task[:-4] + b"E%03d" % step)
                if life[step] == "submit_dep":
                    payload = payload.replace(_DEP, previous[j].encode())
                elif life[step] == "grant":
                    payload = payload.replace(b'"w0"', b'"w%d"' % (j % WORKERS))
                elif life[step] == "send_extra":
                    to = live[sent % len(live)] if live else task
                    payload = templates[life[step]].replace(_TASK, to)
                    payload = payload.replace(_EXTRA, task[:-5] + b"M%04d" % step)
                    payload = payload.replace(_EVENT, task[:-4] + b"E%03d" % step)
                    sent += 1
                seq += 1
                out.append(decode_record(payload, seq))
                if len(out) >= batch:
                    yield out
                    out = []
    if out:
        yield out


def fold_only(
    tasks: int, rounds: int, window: int, mixed: bool, undelivered: int = 0, to_live: bool = False
) -> dict[str, Any]:
    """The checker's rate (median of ``rounds``, decoding not timed) and memory."""
    rates: list[float] = []
    total, rss = 0, psutil.Process().memory_info

    def history() -> Iterator[list[EventRecord]]:
        return synthetic_history(tasks, window, mixed, undelivered=undelivered, to_live=to_live)

    for r in range(rounds):
        gc.collect()
        rss_before = rss().rss
        checker, seconds, total = InvariantChecker(), 0.0, 0
        for batch in history():
            start = time.perf_counter()
            checker.feed(batch)
            seconds += time.perf_counter() - start
            total += len(batch)
        assert not checker.violations, checker.violations[:3]
        rates.append(total / seconds)
        if r == 0:  # what the process grew by (SQLite's cache included, unlike tracemalloc)
            rss_growth = rss().rss - rss_before
        checker.close()
        del checker
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    checker = InvariantChecker()
    for batch in history():
        checker.feed(batch)
    del batch
    gc.collect()
    kept, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    counts = checker.record_counts()
    checker.close()
    agents = sum(1 for i in range(tasks) if "deliver" in _life(i, True, window))
    return {
        "tasks": tasks,
        "events": total,
        "window": window,
        "mixed": mixed or undelivered > 0,
        "undelivered": undelivered * agents,
        "to_live": to_live,
        "rounds": rounds,
        "fold_events_per_s": round(statistics.median(rates)),
        "kept_bytes": kept - base,
        "bytes_per_task": round((kept - base) / tasks, 1),
        "peak_bytes": peak - base,
        "rss_growth_bytes": rss_growth,
        "records": counts,
    }


def render_fold(res: dict[str, Any]) -> str:
    kind = "mixed" if res["mixed"] else "all completed"
    if res["undelivered"]:
        where = "mailboxes that live on" if res["to_live"] else "finished agents' mailboxes"
        kind += f", {res['undelivered']:,} messages left undelivered in {where}"
    counts = ", ".join(f"{k} {v:,}" for k, v in res["records"].items())
    return "\n".join(
        [
            f"invariant fold: {res['tasks']:,} tasks, {res['events']:,} events "
            f"({kind}, {res['window']:,} live at a time)",
            f"  rate (median of {res['rounds']})  {res['fold_events_per_s']:>12,} events/s",
            f"  kept after the fold     {res['kept_bytes']:>12,} bytes "
            f"({res['bytes_per_task']:,} a task)",
            f"  peak while folding      {res['peak_bytes']:>12,} bytes",
            f"  RSS grew by             {res['rss_growth_bytes']:>12,} bytes (first round)",
            f"  records: {counts}",
        ]
    )


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
    parser.add_argument(
        "--fold-only",
        action="store_true",
        help="the invariant fold alone on a synthetic history: rate and memory",
    )
    parser.add_argument("--window", type=int, default=1000, help="--fold-only: tasks live at once")
    parser.add_argument("--mixed", action="store_true",
                        help="--fold-only: dead letters, dependencies, messages")  # fmt: skip
    parser.add_argument("--undelivered", type=int, default=0, metavar="N",
                        help="--fold-only: N more messages to every agent, never taken "
                             "(implies --mixed)")  # fmt: skip
    parser.add_argument("--to-live", action="store_true",
                        help="--fold-only: to 1,000 agents that never finish")  # fmt: skip
    args = parser.parse_args(argv)
    logs.configure("warning")
    if args.fold_only:
        tune_gc()
        res = fold_only(
            args.tasks, args.rounds, args.window, args.mixed, args.undelivered, args.to_live
        )
        print(
            orjson.dumps(res, option=orjson.OPT_INDENT_2).decode()
            if args.json
            else render_fold(res)
        )
        return
    with tempfile.TemporaryDirectory(prefix="pantheon-bench-") as tmp, ExitStack() as stack:
        url = args.nats_url or stack.enter_context(EmbeddedNats(Path(tmp) / "nats")).url
        res = asyncio.run(bench(url, args.tasks, args.rounds, Path(tmp)))
    print(orjson.dumps(res, option=orjson.OPT_INDENT_2).decode() if args.json else render(res))


if __name__ == "__main__":
    main()
