"""Read-model snapshots in the object store, against a real nats-server and real SQLite."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

from pantheon_es.client import PantheonClient
from pantheon_es.embedded import EmbeddedNats
from pantheon_es.events import EventRecord
from pantheon_es.node import Node, NodeConfig
from pantheon_es.store import EventStore
from projections.projector import Projector, current_digest, dump_tables, rebuild
from projections.snapshots import SnapshotStore, make_snapshot, restore_snapshot
from projections.tasks import TasksModel
from tests.conftest import Stack, eventually
from tests.test_cli import ROOT, pantheon_argv

SHELL = {"kind": "shell", "argv": ["true"]}


async def activity(stack: Stack, n: int, prefix: str) -> list[str]:
    """``n`` submits, every third cancelled: rows both created and changed."""
    tids = [
        (await stack.client.submit_task(f"{prefix}-{i}", SHELL, labels={"p": prefix}))["task_id"]
        for i in range(n)
    ]
    for tid in tids[::3]:
        await stack.client.cancel_task(tid, reason="snapshot test")
    assert await stack.projector.wait_for(await stack.store.last_seq())
    return tids


async def open_counting(projector: Projector) -> list[int]:
    """Open ``projector`` and record the sequence of every event it applies from then on."""
    applied: list[int] = []

    def sink(records: list[EventRecord]) -> None:
        applied.extend(r.seq for r in records)

    projector.sinks.append(sink)
    await projector.open()
    return applied


async def test_empty_data_dir_restores_the_snapshot_applies_only_the_tail_and_equals_a_rebuild(
    stack: Stack, tmp_path: Path
) -> None:
    await activity(stack, 20, "before")
    snap, pruned = await make_snapshot(stack.store, stack.db_path)
    assert snap.last_seq == stack.projector.position and pruned == []
    assert snap.digest == current_digest() and snap.size > 0
    assert snap.encoding == "gzip" and 0 < snap.stored_size < snap.size / 2  # stored compressed
    await activity(stack, 10, "after")  # the tail
    head = await stack.store.last_seq()
    assert head > snap.last_seq

    projector = Projector(stack.store, tmp_path / "fresh" / "projections.db", kv=False,
                          snapshots=True)  # fmt: skip
    applied = await open_counting(projector)
    try:
        assert projector.restored is not None and projector.restored.object == snap.object
        assert projector.position == snap.last_seq
        await projector.catch_up(head)
    finally:
        await projector.shutdown()

    assert applied == list(range(snap.last_seq + 1, head + 1)), "only the tail is applied"
    await rebuild(stack.store, tmp_path / "rebuilt.db")
    restored_tables = await dump_tables(tmp_path / "fresh" / "projections.db")
    assert restored_tables == await dump_tables(tmp_path / "rebuilt.db")
    assert len(restored_tables["tasks"]) == 30


async def test_snapshot_with_another_schema_digest_is_ignored_and_the_log_is_replayed(
    stack: Stack, tmp_path: Path
) -> None:
    await activity(stack, 6, "x")
    await make_snapshot(stack.store, stack.db_path)
    head = await stack.store.last_seq()

    # Another set of tables = another schema digest: the snapshot does not fit it.
    projector = Projector(stack.store, tmp_path / "other.db", models=[TasksModel()], kv=False,
                          snapshots=True)  # fmt: skip
    applied = await open_counting(projector)
    try:
        assert projector.restored is None and projector.position == 0
        await projector.catch_up(head)
    finally:
        await projector.shutdown()
    assert applied == list(range(1, head + 1)), "a full rebuild"
    other = await dump_tables(tmp_path / "other.db", [TasksModel()])
    assert other["tasks"] == (await dump_tables(stack.db_path))["tasks"]
    assert await restore_snapshot(stack.store, tmp_path / "x.db", digest="0" * 16) is None
    assert not (tmp_path / "x.db").exists()


async def test_local_database_is_kept_unless_the_snapshot_is_far_ahead(
    stack: Stack, tmp_path: Path
) -> None:
    await activity(stack, 3, "a")
    local = tmp_path / "local.db"
    await rebuild(stack.store, local)  # a local copy at this position
    at = await stack.store.last_seq()
    await activity(stack, 6, "b")
    snap, _ = await make_snapshot(stack.store, stack.db_path)
    gap = snap.last_seq - at

    kept = await restore_snapshot(stack.store, local, digest=current_digest(), min_gap=gap + 1)
    assert kept is None
    assert (await dump_tables(local))["tasks"] != (await dump_tables(stack.db_path))["tasks"]

    restored = await restore_snapshot(stack.store, local, digest=current_digest(), min_gap=gap)
    assert restored is not None and restored.last_seq == snap.last_seq
    assert await dump_tables(local) == await dump_tables(stack.db_path)


async def test_only_the_newest_k_snapshots_are_kept(stack: Stack) -> None:
    made = []
    for i in range(3):
        await activity(stack, 1, f"k{i}")
        info, pruned = await make_snapshot(stack.store, stack.db_path, keep=2)
        made.append(info)
        assert pruned == ([made[0].object] if i == 2 else [])
    listed = await SnapshotStore(stack.store).list_snapshots()
    assert [s.object for s in listed] == [made[2].object, made[1].object]


async def test_a_node_with_an_empty_data_dir_starts_its_scheduler_from_the_snapshot(
    nats_server: EmbeddedNats, store: EventStore, tmp_path: Path
) -> None:
    config = NodeConfig(nats_url=nats_server.url, root=store.subjects.root, workers=0,
                        leader_ttl=0)  # fmt: skip
    first = Node(replace(config, data_dir=tmp_path / "one"))
    async with first:
        run = asyncio.create_task(first.run())
        assert first.nc is not None and first.projector is not None
        c = PantheonClient(first.nc, subjects=first.subjects, timeout=10)
        before = [(await c.submit_task(f"t{i}", SHELL))["task_id"] for i in range(5)]
        assert await first.projector.wait_for(await store.last_seq())
        snap, _ = await make_snapshot(store, first.db_path)
        after = [(await c.submit_task(f"u{i}", SHELL))["task_id"] for i in range(3)]
        assert await first.projector.wait_for(await store.last_seq())
        first.request_stop()
        await asyncio.wait_for(run, 30)

    # No workers: every task is still pending, so all eight are in the live set.
    second = Node(replace(config, data_dir=tmp_path / "two"))
    async with second:
        assert second.projector is not None and second.scheduler is not None
        restored = second.projector.restored
        assert restored is not None and restored.last_seq == snap.last_seq
        assert second.scheduler.position == snap.last_seq, "bootstrapped at the snapshot"
        assert len(second.scheduler.tasks) == len(before)
        run = asyncio.create_task(second.run())
        try:

            async def live() -> bool:
                assert second.scheduler is not None
                return {tid for (_t, tid) in second.scheduler.tasks} == {*before, *after}

            await eventually(live)
        finally:
            second.request_stop()
            await asyncio.wait_for(run, 30)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PANTHEON_")}
    return subprocess.run(
        [*pantheon_argv(), "snapshot", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
    )


async def test_snapshot_cli_makes_lists_and_refuses_bad_input_appending_nothing(
    stack: Stack, nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    await activity(stack, 4, "cli")
    head = await stack.store.last_seq()
    where = ["--nats-url", nats_server.url, "--namespace", stack.store.subjects.root]

    made = await asyncio.to_thread(cli, *where, "--data-dir", str(tmp_path), "--json")
    assert made.returncode == 0, made.stderr
    doc: dict[str, Any] = json.loads(made.stdout)
    assert doc["snapshot"]["last_seq"] == head
    assert doc["snapshot"]["digest"] == current_digest()
    assert [s["object"] for s in doc["snapshots"]] == [doc["snapshot"]["object"]]

    from_log = await asyncio.to_thread(cli, *where, "--from-log", "--keep", "1", "--json",
                                       "--data-dir", str(tmp_path / "none"))  # fmt: skip
    assert from_log.returncode == 0, from_log.stderr
    rebuilt = json.loads(from_log.stdout)
    assert rebuilt["snapshot"]["last_seq"] == head and len(rebuilt["snapshots"]) == 1

    listed = await asyncio.to_thread(cli, *where, "--list", "--json", "--data-dir", str(tmp_path))
    assert json.loads(listed.stdout)["snapshots"] == rebuilt["snapshots"]

    missing = await asyncio.to_thread(cli, *where, "--data-dir", str(tmp_path / "none"))
    assert missing.returncode == 1 and "not_found" in missing.stderr
    bad = await asyncio.to_thread(cli, *where, "--keep", "0", "--data-dir", str(tmp_path))
    assert bad.returncode == 2
    assert await stack.store.last_seq() == head, "the tool never appends"


async def test_read_side_with_snapshot_every_makes_snapshots_as_events_arrive(
    nats_server: EmbeddedNats, store: EventStore, tmp_path: Path
) -> None:
    node = Node(NodeConfig(nats_url=nats_server.url, root=store.subjects.root, workers=0,
                           leader_ttl=0, snapshot_every=5, data_dir=tmp_path))  # fmt: skip
    async with node:
        run = asyncio.create_task(node.run())
        try:
            assert node.nc is not None
            c = PantheonClient(node.nc, subjects=node.subjects, timeout=10)
            made: list[Any] = []
            for round_ in range(2):  # each round: 6 more events, then one more snapshot
                for i in range(6):
                    await c.submit_task(f"p{round_}-{i}", SHELL)

                async def one_more(n: int = round_ + 1) -> list[Any]:
                    found = await SnapshotStore(store).list_snapshots()
                    return found if len(found) >= n else []

                made = await eventually(one_more)
            assert all(s.last_seq >= 5 for s in made)
            assert made[0].last_seq - made[1].last_seq >= 5, "one per 5 events at most"
        finally:
            node.request_stop()
            await asyncio.wait_for(run, 30)


def test_bench_replay_generates_valid_events_of_whole_task_lives() -> None:
    from collections import Counter

    from pantheon_es.events import decode
    from pantheon_es.subjects import Subjects
    from tools.bench_replay import events

    subjects = Subjects("pantheon")
    made = list(events(1000, subjects))
    assert len(made) == 1000
    decoded = [decode(payload, i) for i, (_subject, payload) in enumerate(made, 1)]
    kinds = Counter(e.type for e in decoded)
    assert kinds["WorkerRegistered"] == 4
    assert kinds["TaskSubmitted"] >= kinds["TaskCompleted"] > 0
    assert kinds["MessagesDelivered"] > 0  # the last life may be cut after its MessageSent
    assert kinds["MessageSent"] - kinds["MessagesDelivered"] in (0, 1)
    assert len({e.event_id for e in decoded}) == 1000, "every event id is unique"
    for (subject, _payload), e in zip(made, decoded, strict=True):
        assert subject == subjects.aggregate(e.tenant, e.aggregate, e.aggregate_id)
