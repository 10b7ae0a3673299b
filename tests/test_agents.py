"""Agents end to end: the built-in offline agent, messages between agents, crashes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pantheon_es import ids
from pantheon_es.client import PantheonClient
from pantheon_es.embedded import EmbeddedNats
from pantheon_es.errors import ConflictError, InvalidError, NotFoundError, StaleLeaseError
from pantheon_es.mailbox import RANK, MessagePriority
from pantheon_es.store import EventStore
from pantheon_es.subjects import Subjects
from tests.conftest import Cluster, eventually, pythonpath_env

ROOT = Path(__file__).resolve().parents[1]
PRIORITIES = ["urgent", "low", "high", "medium"]


async def mailbox_events(store: EventStore, agent_id: str) -> list[Any]:
    return [h.event for h in await store.read_aggregate("default", "mailbox", agent_id)]


def assert_priority_delivery(events: list[Any]) -> None:
    """Every delivery took the highest-priority pending messages, FIFO within a priority."""
    pending: dict[str, tuple[int, int]] = {}
    order = 0
    for event in events:
        if event.type == "MessageSent":
            pending[event.data.message_id] = (-RANK[MessagePriority(event.data.priority)], order)
            order += 1
        elif event.type == "MessagesDelivered":
            delivered = event.data.message_ids
            best_first = sorted(pending, key=lambda m: pending[m])[: len(delivered)]
            assert delivered == best_first, (delivered, best_first)
            for message_id in delivered:
                del pending[message_id]


@pytest.mark.slow
async def test_five_offline_agents_message_each_other_once_each_in_priority_order(
    cluster: Cluster,
) -> None:
    # Room for all five at once: they wait for each other's messages (1 cpu each by default).
    capacity = {"cpu": 8.0, "memory_mb": 4096, "gpu": 0, "custom": {}}
    await cluster.add_worker(worker_id="w1", slots=8, capacity=capacity)
    agents = [ids.new_id() for _ in range(5)]
    for i, me in enumerate(agents):
        peers = [a for a in agents if a != me]
        lines = [
            f"/send {peer} {PRIORITIES[(i + j) % 4]} coordination from {i} to {agents.index(peer)}"
            for j, peer in enumerate(peers)
        ]
        lines += ["/sleep 1", "/recv 4 60"]  # let the others' messages queue up, then read
        await cluster.client.spawn_agent("\n".join(lines), agent_id=me, name=f"agent-{i}")

    finished = [await cluster.client.wait_for_task(a, timeout=90) for a in agents]

    assert [f["status"] for f in finished] == ["completed"] * 5, [f.get("error") for f in finished]
    assert cluster.node.store is not None
    for i, agent in enumerate(agents):
        received = finished[i]["result"]["messages"]
        assert sorted(m["body"] for m in received) == sorted(
            f"from {agents.index(s)} to {i}" for s in agents if s != agent
        )
        events = await mailbox_events(cluster.node.store, agent)
        assert [e.type for e in events].count("MessageSent") == 4
        delivered = [m for e in events if e.type == "MessagesDelivered" for m in e.data.message_ids]
        assert sorted(delivered) == sorted(
            e.data.message_id for e in events if e.type == "MessageSent"
        )
        assert_priority_delivery(events)
    # The audit trail: sender, recipient, priority and times of all 20 messages.
    audit = (await cluster.client.list_messages(limit=100))["items"]
    assert len(audit) == 20
    for m in audit:
        assert m["sender"] in agents and m["recipient"] in agents and m["sender"] != m["recipient"]
        assert m["priority"] in PRIORITIES and m["type"] == "coordination"
        assert m["status"] == "read"
        assert m["sent_at"] <= m["delivered_at"] <= m["read_at"]


async def test_offline_agent_reads_its_files_and_reports_progress(
    cluster: Cluster, tmp_path: Path
) -> None:
    await cluster.add_worker(worker_id="w1")
    notes = tmp_path / "notes.md"
    notes.write_text("one\ntwo\nthree\n")
    agent = (await cluster.client.spawn_agent("Summarise the notes", files=[str(notes)]))[
        "agent_id"
    ]

    done = await cluster.client.wait_for_task(agent, timeout=30)

    assert done["status"] == "completed", done.get("error")
    assert done["result"]["files"][str(notes)]["lines"] == 3
    assert done["result"]["prompt_words"] == 3
    assert done["progress"] == 1.0 and done["progress_message"] == "done"


async def test_shell_task_usage_is_sampled_and_shown_in_the_read_model(cluster: Cluster) -> None:
    await cluster.add_worker(worker_id="w1")
    busy = "import time\nend = time.time() + 2.5\nwhile time.time() < end: pass\nprint('done')"
    task_id = (
        await cluster.client.submit_task(
            "busy", {"kind": "shell", "argv": [sys.executable, "-c", busy]}
        )
    )["task_id"]

    done = await cluster.client.wait_for_task(task_id, timeout=30)

    assert done["status"] == "completed", done.get("error")
    assert done["result"]["exit_code"] == 0 and "done" in done["result"]["stdout_tail"]
    assert Path(done["result"]["stdout_path"]).read_text().strip() == "done"  # noqa: ASYNC240 - a small file, read once
    assert done["cpu_percent"] > 10 and done["memory_mb"] > 1  # a real busy process, measured


async def test_bad_agent_commands_get_typed_errors_and_append_nothing(cluster: Cluster) -> None:
    await cluster.add_worker(worker_id="w1")
    assert cluster.node.store is not None
    done = (
        await cluster.client.submit_task(
            "quick", {"kind": "python", "target": "tests.task_targets:noop"}
        )
    )["task_id"]
    finished = await cluster.client.wait_for_task(done, timeout=20)
    before = await cluster.node.store.last_seq()

    with pytest.raises(NotFoundError):
        await cluster.client.send_message(ids.new_id(), "anyone there?")
    with pytest.raises(ConflictError):
        await cluster.client.send_message(done, "too late")
    with pytest.raises(InvalidError):
        await cluster.client.spawn_agent("")
    with pytest.raises(InvalidError):
        await cluster.client.submit_task("x", {"kind": "python", "target": "no colon here"})
    with pytest.raises(NotFoundError):
        await cluster.client.command("task", "cancel", {"task_id": ids.new_id()})
    granted = next(
        h.event
        for h in await cluster.node.store.read_aggregate("default", "task", done)
        if h.event.type == "LeaseGranted"
    )
    with pytest.raises(StaleLeaseError):  # a heartbeat for a lease that has ended
        await cluster.client.heartbeat(done, granted.data.lease_id, 1)
    assert finished["status"] == "completed"
    assert await cluster.node.store.last_seq() == before


# -- restart of the whole service ---------------------------------------------------------------


class UpProcess:
    """`pantheon up` joined to an external server, without local workers."""

    def __init__(self, url: str, root: str, data_dir: Path, *extra: str) -> None:
        self.url, self.root, self.data_dir = url, root, data_dir
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        discovery = self.data_dir / "pantheon.json"
        discovery.unlink(missing_ok=True)
        with open(self.data_dir.parent / "up.log", "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pantheon_es.cli",
                    "up",
                    "--nats-url",
                    self.url,
                    "--namespace",
                    self.root,
                    "--data-dir",
                    str(self.data_dir),
                    "--workers",
                    "0",
                    "--lease-ttl",
                    "6",
                    *self.extra,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=pythonpath_env(),
            )
        deadline = time.monotonic() + 30
        while not discovery.exists():
            assert self.proc.poll() is None and time.monotonic() < deadline, (
                "pantheon up did not start"
            )
            time.sleep(0.05)

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


@pytest.mark.slow
async def test_service_killed_and_restarted_loses_and_duplicates_nothing(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    import secrets

    import nats

    root = f"r{secrets.token_hex(4)}"
    # a short leadership lease: the restarted node waits for the dead one's to age out
    up = UpProcess(nats_server.url, root, tmp_path / "node", "--leader-ttl", "2")
    up.data_dir.mkdir()
    up.start()
    workers = [
        subprocess.Popen(  # noqa: ASYNC220 - the test runs real worker processes, started once
            [
                sys.executable,
                "-m",
                "pantheon_es.cli",
                "worker",
                "--nats-url",
                nats_server.url,
                "--namespace",
                root,
                "--data-dir",
                str(tmp_path),
                "--worker-id",
                f"rw{i}",
                "--ttl",
                "10",
            ],
            stdout=open(tmp_path / f"rw{i}.log", "wb"),  # noqa: SIM115, ASYNC230 - test setup, closed with the process
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=pythonpath_env(),
        )
        for i in (1, 2)
    ]
    nc = await nats.connect(nats_server.url)
    client = PantheonClient(nc, subjects=Subjects(root), timeout=15)
    try:
        await eventually(lambda: _active_workers(client, 2), timeout=30)
        listener = ids.new_id()
        await client.spawn_agent(
            "/progress 10 listening\n/recv 3 120", agent_id=listener, name="listener"
        )
        sleeper = (
            await client.submit_task(
                "sleeper",
                {"kind": "python", "target": "tests.task_targets:sleep", "kwargs": {"seconds": 4}},
            )
        )["task_id"]
        idle = (
            await client.submit_task(
                "idle",
                {
                    "kind": "python",
                    "target": "tests.task_targets:sleep",
                    "kwargs": {"seconds": 120},
                },
                inactivity_timeout=5,
            )
        )["task_id"]
        await client.wait_for_task(listener, timeout=30, statuses=frozenset({"running"}))
        await client.wait_for_task(sleeper, timeout=30, statuses=frozenset({"running"}))
        await client.send_message(listener, "before the crash", priority="low")

        up.kill9()  # the whole service, while agents run and a message is queued
        await asyncio.sleep(1.0)
        up.start()

        await client.send_message(listener, "after the restart", priority="urgent")
        await client.send_message(listener, "one more", priority="high")
        results = {t: await client.wait_for_task(t, timeout=60) for t in (listener, sleeper, idle)}
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                w.wait(15)
            except subprocess.TimeoutExpired:
                w.kill()
        if up.proc and up.proc.poll() is None:
            up.proc.send_signal(signal.SIGINT)
            up.proc.wait(30)
        await nc.close()

    assert results[listener]["status"] == "completed", results[listener].get("error")
    assert results[sleeper]["status"] == "completed"
    assert results[idle]["status"] == "timed_out"  # its timer resumed from the log
    bodies = [m["body"] for m in results[listener]["result"]["messages"]]
    assert sorted(bodies) == sorted(["before the crash", "after the restart", "one more"])

    nc = await nats.connect(nats_server.url)
    try:
        store = EventStore(nc, Subjects(root))
        for task_id in (listener, sleeper, idle):
            types = [h.event.type for h in await store.read_aggregate("default", "task", task_id)]
            finishing = [t for t in types if t in ("TaskCompleted", "TaskFailed", "TaskTimedOut")]
            assert len(finishing) == 1, types  # nothing ran to completion twice
            assert types.count("LeaseGranted") == 1, types  # no lease lost or duplicated
        box = await mailbox_events(store, listener)
        assert [e.type for e in box].count("MessageSent") == 3
        delivered = [m for e in box if e.type == "MessagesDelivered" for m in e.data.message_ids]
        assert len(delivered) == len(set(delivered)) == 3  # each message delivered once
        timed_out = next(
            h.event
            for h in await store.read_aggregate("default", "task", idle)
            if h.event.type == "TaskTimedOut"
        )
        late = (timed_out.occurred_at - timed_out.data.last_activity_at).total_seconds()
        assert 5.0 <= late < 8.0, late  # at its deadline, across the restart
    finally:
        await nc.close()


async def _active_workers(client: PantheonClient, n: int) -> bool:
    return int((await client.list_workers(status=["active"]))["total"]) >= n
