"""Scheduler benchmark (issue 4): decision latency under a deep queue, DAG wall time, memory.

    python -m tools.bench_scheduler [--pending 10000,100000] [--workers 50] [--samples 200]
                                    [--dag-runs 3] [--json]

Each part starts ``pantheon up`` as its own process (embedded nats-server) and
measures from this process, as a client would:

* **decision latency** with N pending tasks over ``--workers`` registered
  workers (2 slots each, all busy; simulated workers: registered by command,
  they never run anything). One at a time, a leased task is completed (as its
  worker would); the latency is from the notice of its ``TaskCompleted`` to
  the notice of the ``LeaseGranted`` that refills the slot: the scheduler
  hearing the event, choosing among N, and appending its decision.
* **scheduler memory and start-up**: a fresh scheduler loads its live set
  from the read models written by that run (traced with tracemalloc), with N
  pending; then, for the smallest N, after every task completed, so the
  history holds N completed tasks and the live set is empty. The node
  process's resident memory is printed too.
* **a long history** (``--history N``): N task lives (submitted, leased,
  started, completed; every 100th left pending) generated into a log of
  their own, the read models rebuilt from it, and a fresh scheduler's live set
  loaded from them (traced as above): what a million finished tasks cost it.
* **1,000-node DAG**: 10 layers x 100 no-op python tasks, each depending on
  two of the layer before, through ``pantheon up`` with 2 worker processes:
  from the create request to the notice of ``WorkflowFinished``.

Targets (issue 4, this machine): decision p99 < 10 ms at 100,000 pending; the
DAG in < 1 s. Printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import orjson

from pantheon_es import connection, ids, logs
from pantheon_es.client import PantheonClient
from pantheon_es.embedded import EmbeddedNats
from pantheon_es.scheduler import Scheduler
from pantheon_es.store import EventStore, StoreConfig
from pantheon_es.subjects import Subjects
from projections.projector import rebuild
from tools.bench_replay import events, lives_events, publish
from tools.bench_tasks import Node, percentile, wait_workers

NOOP = {"kind": "python", "target": "tools.bench_targets:noop"}


class Notices:
    """The tenant's task notices: leases granted (task -> lease) and the time of each."""

    def __init__(self) -> None:
        self.leased: dict[str, tuple[str, int]] = {}
        self.grants = 0
        self.completions = 0
        self.event = asyncio.Event()
        self.last_grant_at = 0.0
        self.completed_at: dict[str, float] = {}
        self.on_grant: Any = None

    async def on_msg(self, msg: Any) -> None:
        now = time.perf_counter()
        head = msg.data[:120]
        if b'"type":"LeaseGranted"' in head:
            ev = orjson.loads(msg.data)
            self.leased[ev["aggregate_id"]] = (ev["data"]["lease_id"], ev["data"]["fencing_token"])
            self.grants += 1
            self.last_grant_at = now
            self.event.set()
            if self.on_grant is not None:
                self.on_grant(ev["aggregate_id"])
        elif b'"type":"TaskCompleted"' in head:
            self.completions += 1
            self.completed_at[orjson.loads(msg.data)["aggregate_id"]] = now
            self.event.set()

    async def wait(self, check: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            self.event.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SystemExit("timed out waiting for the scheduler")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.event.wait(), min(remaining, 1.0))


async def register_fake_workers(client: PantheonClient, n: int, slots: int) -> None:
    await asyncio.gather(*(
        client.command("worker", "register", {
            "worker_id": f"sim{i}", "incarnation": ids.new_id(), "slots": slots, "ttl": 3600,
            "capacity": {"cpu": 64, "memory_mb": 65536},
        })
        for i in range(n)
    ))  # fmt: skip


async def submit_many(client: PantheonClient, n: int, window: int = 400) -> str:
    last = ""
    for i in range(0, n, window):
        results = await asyncio.gather(*(
            client.submit_task("bench", NOOP, resources={"cpu": 0})
            for _ in range(i, min(n, i + window))
        ))  # fmt: skip
        last = results[-1]["task_id"]
        if i and i % 20000 == 0:
            print(f"  submitted {i}", file=sys.stderr)
    return last


async def complete(client: PantheonClient, task_id: str, lease: tuple[str, int]) -> None:
    body = {"task_id": task_id, "lease_id": lease[0], "fencing_token": lease[1]}
    await client.command("task", "complete", body)


def live_set_memory(db_path: Path) -> dict[str, Any]:
    """A fresh scheduler's live set loaded from the read models: bytes and seconds."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    row = db.execute("SELECT last_seq FROM projector_checkpoint").fetchone()
    started = time.perf_counter()  # timed without tracing (tracemalloc slows allocation)
    Scheduler(None, None, Subjects()).bootstrap(db, int(row[0]), int(row[0]))  # type: ignore[arg-type]
    seconds = time.perf_counter() - started
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    scheduler = Scheduler(None, None, Subjects())  # type: ignore[arg-type]
    scheduler.bootstrap(db, int(row[0]), int(row[0]))
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    used = sum(s.size_diff for s in after.compare_to(before, "filename"))
    counts = dict(db.execute("SELECT status, count(*) FROM tasks GROUP BY status").fetchall())
    db.close()
    return {
        "live_tasks": len(scheduler.tasks),
        "history_tasks": counts,
        "scheduler_mb": round(used / 2**20, 1),
        "bytes_per_live_task": round(used / max(len(scheduler.tasks), 1)),
        "bootstrap_s": round(seconds, 3),
    }


async def decision_latency(
    base: Path, pending: int, workers: int, samples: int, drain: bool
) -> dict[str, Any]:
    data = base / f"pending-{pending}"
    data.mkdir()
    slots = 2
    options = ("--workers", "0", "--lease-ttl", "3600", "--leader-ttl", "0",
               "--max-pending-per-tenant", str(pending + 10_000))  # fmt: skip
    with Node(data, *options) as up:
        client = await PantheonClient.connect(up.url, timeout=60)
        notices = Notices()
        sub = await client.nc.subscribe(
            client.subjects.changed("default", "task"), cb=notices.on_msg
        )
        rss_idle = up.rss_mb()
        await register_fake_workers(client, workers, slots)
        await wait_workers(client, workers)
        busy = workers * slots
        started = time.perf_counter()
        last = await submit_many(client, pending + busy)
        submit_s = time.perf_counter() - started
        await notices.wait(lambda: notices.grants >= busy, 120)
        # the scheduler holds every submitted task before we measure
        deadline = time.monotonic() + 300
        while (await client.why(last, timeout=10))["scheduler"] in (None, {"live": False}):
            if time.monotonic() > deadline:
                raise SystemExit("the scheduler did not catch up")
            await asyncio.sleep(0.2)
        rss_pending = up.rss_mb()
        latencies = []
        for _ in range(samples):
            task_id, lease = notices.leased.popitem()
            grants = notices.grants
            await complete(client, task_id, lease)
            await notices.wait(
                lambda g=grants, t=task_id: notices.grants > g and t in notices.completed_at, 30
            )
            latencies.append((notices.last_grant_at - notices.completed_at[task_id]) * 1000)
        memory = live_set_memory(data / "projections.db")
        result: dict[str, Any] = {
            "pending": pending,
            "workers": workers,
            "submit_per_s": round((pending + busy) / submit_s),
            "decision_ms": {
                "p50": round(percentile(latencies, 50), 2),
                "p90": round(percentile(latencies, 90), 2),
                "p99": round(percentile(latencies, 99), 2),
                "max": round(max(latencies), 2),
            },
            "samples": samples,
            "node_rss_mb": {"idle": rss_idle, "with_pending": rss_pending},
            "live_set": memory,
        }
        if drain:
            target = pending + busy
            in_flight: set[asyncio.Task[None]] = set()

            def finish(task_id: str) -> None:
                lease = notices.leased.pop(task_id, None)
                if lease is not None:
                    t = asyncio.get_running_loop().create_task(complete(client, task_id, lease))
                    in_flight.add(t)
                    t.add_done_callback(in_flight.discard)

            notices.on_grant = finish
            for task_id in list(notices.leased):
                finish(task_id)
            await notices.wait(lambda: notices.completions >= target, 900)
            notices.on_grant = None
            await asyncio.sleep(1.0)  # the read models catch up
            result["after_all_completed"] = {
                "live_set": live_set_memory(data / "projections.db"),
                "node_rss_mb": up.rss_mb(),
            }
        await sub.unsubscribe()
        await client.close()
    return result


def layered_dag() -> list[dict[str, Any]]:
    nodes = []
    for layer in range(10):
        for i in range(100):
            deps = [] if layer == 0 else [f"L{layer - 1}-{i}", f"L{layer - 1}-{(i + 1) % 100}"]
            nodes.append({"name": f"L{layer}-{i}", "executor": NOOP, "depends_on": deps,
                          "resources": {"cpu": 0}})  # fmt: skip
    return nodes


async def long_history(base: Path, tasks: int) -> dict[str, Any]:
    """A fresh scheduler's live set over a log of ``tasks`` generated task lives."""
    with EmbeddedNats(base / "history-nats") as server:
        nc = await connection.connect(server.url, pending_size=256 * 1024 * 1024)
        try:
            store = EventStore(nc, Subjects(), StoreConfig())
            await store.provision()
            n = lives_events(tasks)
            await publish(nc, store, events(n, store.subjects, messages=False), n)
            db = base / "history.db"
            started = time.perf_counter()
            head = await rebuild(store, db)
            rebuilt = time.perf_counter() - started
        finally:
            await nc.close()
    return {
        "tasks": tasks,
        "events": head,
        "rebuild_s": round(rebuilt, 1),
        "live_set": live_set_memory(db),
    }


async def dag(base: Path, runs: int) -> dict[str, Any]:
    data = base / "dag"
    data.mkdir()
    walls = []
    with Node(data, "--workers", "2", "--worker-slots", "32") as up:
        client = await PantheonClient.connect(up.url, timeout=60)
        await wait_workers(client, 2)
        for _ in range(runs):
            finished = asyncio.Event()

            async def on_notice(msg: Any, done: asyncio.Event = finished) -> None:
                if b'"type":"WorkflowFinished"' in msg.data[:120]:
                    done.set()

            sub = await client.nc.subscribe(client.subjects.changed("default", "workflow"),
                                            cb=on_notice)  # fmt: skip
            nodes = layered_dag()
            started = time.perf_counter()
            created = await client.create_workflow("bench-dag", nodes)
            await asyncio.wait_for(finished.wait(), 600)
            walls.append(time.perf_counter() - started)
            await sub.unsubscribe()
            state = await client.get_workflow(created["workflow_id"], nodes=False)
            assert state["status"] == "completed", state
        await client.close()
    return {
        "nodes": 1000,
        "edges": 1800,
        "worker_processes": 2,
        "wall_s": [round(w, 3) for w in walls],
        "median_s": round(statistics.median(walls), 3),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pending", default="10000,100000", help="Comma-separated queue depths.")
    parser.add_argument("--workers", type=int, default=50)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--dag-runs", type=int, default=3)
    parser.add_argument(
        "--history",
        type=int,
        default=0,
        help="Also measure the live set over a log of this many task lives (e.g. 1000000).",
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--keep", type=Path, help="Keep the nodes' data here (default: a temp dir)."
    )
    args = parser.parse_args()
    logs.configure("warning")
    depths = [int(x) for x in args.pending.split(",") if x]
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "latency": [],
    }
    with tempfile.TemporaryDirectory(prefix="pantheon-bench-") as tmp:
        base = args.keep or Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        for i, n in enumerate(sorted(depths)):
            print(f"decision latency with {n} pending ...", file=sys.stderr)
            report["latency"].append(
                await decision_latency(base, n, args.workers, args.samples, drain=i == 0)
            )
        if args.dag_runs:
            print("1,000-node DAG ...", file=sys.stderr)
            report["dag"] = await dag(base, args.dag_runs)
        if args.history:
            print(f"a history of {args.history:,} task lives ...", file=sys.stderr)
            report["history"] = await long_history(base, args.history)
    if args.json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
        return
    for r in report["latency"]:
        d, m = r["decision_ms"], r["live_set"]
        print(f"pending {r['pending']:>7} over {r['workers']} workers: decision p50 {d['p50']} ms, "
              f"p90 {d['p90']}, p99 {d['p99']}, max {d['max']} ({r['samples']} samples; target "
              f"p99 < 10 ms at 100,000)")  # fmt: skip
        print(f"    scheduler live set: {m['live_tasks']} tasks, {m['scheduler_mb']} MiB "
              f"({m['bytes_per_live_task']} B/task), loaded in {m['bootstrap_s']} s; node RSS "
              f"{r['node_rss_mb']['idle']} -> {r['node_rss_mb']['with_pending']} MiB; "
              f"submits {r['submit_per_s']}/s")  # fmt: skip
        if "after_all_completed" in r:
            a = r["after_all_completed"]
            print(f"    after all {sum(a['live_set']['history_tasks'].values())} completed: "
                  f"live set {a['live_set']['live_tasks']} tasks, {a['live_set']['scheduler_mb']} "
                  f"MiB, loaded in {a['live_set']['bootstrap_s']} s; node RSS "
                  f"{a['node_rss_mb']} MiB")  # fmt: skip
    if "history" in report:
        h, m = report["history"], report["history"]["live_set"]
        print(f"history of {h['tasks']:,} task lives ({h['events']:,} events, read models "
              f"rebuilt in {h['rebuild_s']} s): scheduler live set {m['live_tasks']} tasks, "
              f"{m['scheduler_mb']} MiB, loaded in {m['bootstrap_s']} s; tasks by status "
              f"{m['history_tasks']}")  # fmt: skip
    if "dag" in report:
        g = report["dag"]
        print(
            f"1,000-node DAG, 2 worker processes: {g['median_s']} s median of {g['wall_s']} "
            "(target < 1 s)"
        )


if __name__ == "__main__":
    asyncio.run(main())
