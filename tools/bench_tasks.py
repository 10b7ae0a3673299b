"""Agents/tasks benchmark: throughput, single-task latency, message latency.

    python -m tools.bench_tasks [--tasks 10000] [--latency 200] [--messages 100] [--json]

Starts ``pantheon up`` as its own process (embedded nats-server, 2 local
worker processes) and measures from this process, as a client would:

* throughput: ``--tasks`` no-op python tasks submitted (pipelined), from the
  first submit to the last completion; the events each task appended; and,
  in the same run, the raw JetStream append rate (pipelined ``js.publish``
  with the same headers), so that tasks/s x events/task / raw is visible;
* latency: ``--latency`` no-op tasks one after another, from submit to the
  client hearing of the result (p50, p99);
* messages: two running agents (python tasks), one sends ``--messages``
  messages to the other; from ``send`` to the recipient's inbox returning it.

Targets (issue 3, this machine): >= 2,000 tasks/s and a ratio >= 0.3; single
task p50 < 3 ms, p99 < 6 ms. Printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import psutil

from pantheon_es import connection, ids, logs
from pantheon_es.client import PantheonClient
from pantheon_es.gc_tuning import tune_gc
from pantheon_es.store import EventStore, StoreConfig
from pantheon_es.subjects import Subjects
from tools.bench import pipelined, raw_append, submitted

NOOP = {"kind": "python", "target": "tools.bench_targets:noop"}
NO_CPU = {"cpu": 0}  # a no-op needs no core; the worker's slots bound concurrency


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


class Node:
    """`pantheon up` in its own process (``options``: extra `pantheon up` options)."""

    def __init__(self, data_dir: Path, *options: str) -> None:
        self.data_dir = data_dir
        self.options = options
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def __enter__(self) -> Node:
        log = open(self.data_dir / "up.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pantheon_es.cli", "up", "--data-dir", str(self.data_dir),
             "--log-level", "warning", *self.options],
            stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1],
        )  # fmt: skip
        discovery = self.data_dir / "pantheon.json"
        deadline = time.monotonic() + 60
        while not discovery.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(
                    f"pantheon up did not start: {(self.data_dir / 'up.log').read_text()}"
                )
            time.sleep(0.05)
        self.url = orjson.loads(discovery.read_bytes())["nats_url"]
        return self

    def rss_mb(self) -> float:
        """Resident memory of the node process, MiB."""
        assert self.proc is not None
        rss = int(psutil.Process(self.proc.pid).memory_info().rss)
        return round(rss / 2**20, 1)

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system) so far of the node and each of its processes, by role."""
        assert self.proc is not None
        node = psutil.Process(self.proc.pid)
        out = {"node": 0.0, "read_side": 0.0, "workers": 0.0, "nats_server": 0.0}
        for proc in [node, *node.children(recursive=True)]:
            try:
                times = proc.cpu_times()
                cmdline = proc.cmdline()
            except psutil.Error:
                continue
            if proc.pid == node.pid:
                role = "node"
            elif "projector" in cmdline:
                role = "read_side"
            elif "worker" in cmdline:
                role = "workers"
            elif any("nats-server" in part for part in cmdline[:1]):
                role = "nats_server"
            else:
                continue
            out[role] += times.user + times.system
        return out

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(2)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _own_cpu() -> float:
    times = psutil.Process().cpu_times()
    return float(times.user + times.system)


async def wait_workers(client: PantheonClient, n: int) -> None:
    deadline = time.monotonic() + 60
    while int((await client.list_workers(status=["active"]))["total"]) < n:
        if time.monotonic() > deadline:
            raise SystemExit("workers did not register")
        await asyncio.sleep(0.1)


async def throughput(client: PantheonClient, n: int, window: int) -> dict[str, Any]:
    done = asyncio.Event()
    completed = 0

    async def on_notice(msg: Any) -> None:
        nonlocal completed
        if b'"type":"TaskCompleted"' in msg.data[:120]:
            completed += 1
            if completed >= n:
                done.set()

    sub = await client.nc.subscribe(client.subjects.changed(client.tenant, "task"), cb=on_notice)
    start = time.perf_counter()

    async def submit(_: int) -> None:
        await client.submit_task("noop", NOOP, resources=NO_CPU)

    submitted_at = start + await pipelined(list(range(n)), window, submit)
    await asyncio.wait_for(done.wait(), timeout=600)
    elapsed = time.perf_counter() - start
    await sub.unsubscribe()
    return {
        "tasks": n,
        "seconds": round(elapsed, 3),
        "submit_seconds": round(submitted_at - start, 3),
        "tasks_per_s": round(n / elapsed),
    }


async def events_per_task(url: str, root: str, tenant: str) -> tuple[float, int]:
    nc = await connection.connect(url)
    try:
        subjects = Subjects(root)
        info = await nc.jetstream().stream_info(
            subjects.stream, subjects_filter=subjects.events(tenant, "task")
        )
        tasks = len(info.state.subjects or {})
        return (info.state.messages / tasks if tasks else 0.0), tasks
    finally:
        await nc.close()


async def latency(client: PantheonClient, n: int) -> dict[str, Any]:
    finished: dict[str, asyncio.Future[float]] = {}

    async def on_notice(msg: Any) -> None:
        task_id = msg.subject.rsplit(".", 1)[1]
        future = finished.get(task_id)
        if future is not None and not future.done() and b'"type":"TaskCompleted"' in msg.data[:120]:
            future.set_result(time.perf_counter())

    sub = await client.nc.subscribe(client.subjects.changed(client.tenant, "task"), cb=on_notice)
    samples: list[float] = []
    loop = asyncio.get_running_loop()
    for _ in range(n):
        task_id = ids.new_id()  # chosen by the client, so it listens before submitting
        finished[task_id] = loop.create_future()
        start = time.perf_counter()
        await client.submit_task("noop", NOOP, resources=NO_CPU, task_id=task_id)
        end = await asyncio.wait_for(finished[task_id], 30)
        samples.append((end - start) * 1000)
    await sub.unsubscribe()
    return {
        "n": n,
        "p50_ms": round(percentile(samples, 50), 2),
        "p99_ms": round(percentile(samples, 99), 2),
        "max_ms": round(max(samples), 2),
    }


async def message_latency(client: PantheonClient, n: int) -> dict[str, Any]:
    receiver = ids.new_id()
    await client.submit_task(
        "ping-receiver",
        {"kind": "python", "target": "tools.bench_targets:ping_receiver", "kwargs": {"count": n}},
        resources=NO_CPU,
        task_id=receiver,
    )
    await client.wait_for_task(receiver, timeout=30, statuses=frozenset({"running"}))
    sender = (
        await client.submit_task(
            "ping-sender",
            {
                "kind": "python",
                "target": "tools.bench_targets:ping_sender",
                "kwargs": {"to": receiver, "count": n},
            },
            resources=NO_CPU,
        )
    )["task_id"]
    await client.wait_for_task(sender, timeout=120)
    result = await client.wait_for_task(receiver, timeout=120)
    ms = [v * 1000 for v in result["result"]]
    return {
        "n": len(ms),
        "p50_ms": round(percentile(ms, 50), 2),
        "p99_ms": round(percentile(ms, 99), 2),
    }


async def raw_rate(url: str, n: int, window: int) -> int:
    nc = await connection.connect(url, pending_size=256 * 1024 * 1024)
    try:
        subjects = Subjects("rawbench")
        store = EventStore(nc, subjects, StoreConfig())
        await store.provision()
        return round(await raw_append(store.js, subjects, [submitted() for _ in range(n)], window))
    finally:
        await nc.close()


async def bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    with Node(work, "--workers", "2", "--worker-slots", str(args.slots)) as node:
        nc = await connection.connect(node.url, pending_size=256 * 1024 * 1024)
        client = PantheonClient(nc, timeout=60)
        tune_gc()
        try:
            await wait_workers(client, 2)
            await throughput(client, 200, args.window)  # warm up imports, caches, connections
            result: dict[str, Any] = {
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}
            }
            print(f"throughput: {args.tasks:,} no-op python tasks ...", file=sys.stderr)
            before, client_before = node.cpu_seconds(), _own_cpu()
            result["throughput"] = await throughput(client, args.tasks, args.window)
            after, client_after = node.cpu_seconds(), _own_cpu()
            cpu = {k: (after[k] - before[k]) * 1000 / args.tasks for k in after}
            cpu["client"] = (client_after - client_before) * 1000 / args.tasks
            cpu["total"] = sum(cpu.values())
            result["cpu_ms_per_task"] = {k: round(v, 3) for k, v in cpu.items()}
            per_task, _tasks = await events_per_task(node.url, "pantheon", "default")
            result["events_per_task"] = round(per_task, 2)
            print(f"latency: {args.latency} tasks one after another ...", file=sys.stderr)
            result["latency"] = await latency(client, args.latency)
            print(f"messages: {args.messages} between two running agents ...", file=sys.stderr)
            result["messages"] = await message_latency(client, args.messages)
            print("raw JetStream appends ...", file=sys.stderr)
            result["raw_append_per_s"] = await raw_rate(node.url, 20_000, 256)
        finally:
            await nc.close()
    t = result["throughput"]
    result["ratio"] = round(
        t["tasks_per_s"] * result["events_per_task"] / result["raw_append_per_s"], 3
    )
    return result


def render(r: dict[str, Any]) -> str:
    t, lat, msg = r["throughput"], r["latency"], r["messages"]
    return "\n".join(
        [
            f"machine: {r['machine']['cpus']} CPUs, Python {r['machine']['python']}; "
            "pantheon up with 2 local worker processes",
            "",
            f"  throughput        {t['tasks']:,} no-op tasks in {t['seconds']} s = "
            f"{t['tasks_per_s']:,} tasks/s"
            f"   (target >= 2,000; submits took {t['submit_seconds']} s)",
            f"  events per task   {r['events_per_task']}",
            f"  raw JetStream     {r['raw_append_per_s']:,} appends/s (same run)",
            f"  ratio             {r['ratio']}   (tasks/s x events/task / raw; target >= 0.3)",
            f"  single task       p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms over {lat['n']}"
            "   (target p50 < 3 ms, p99 < 6 ms)",
            f"  message delivery  p50 {msg['p50_ms']} ms, p99 {msg['p99_ms']} ms over {msg['n']} "
            "messages",
            "  CPU per task      "
            + ", ".join(f"{k} {v} ms" for k, v in r["cpu_ms_per_task"].items())
            + "   (throughput run)",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--latency", type=int, default=200)
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--window", type=int, default=256, help="submits in flight")
    parser.add_argument("--slots", type=int, default=256, help="tasks each worker runs at once")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    logs.configure("warning")  # --json prints one document and nothing else
    with tempfile.TemporaryDirectory(prefix="pantheon-bench-tasks-") as tmp:
        result = asyncio.run(bench(args, Path(tmp)))
    print(
        orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() if args.json else render(result)
    )


if __name__ == "__main__":
    main()
