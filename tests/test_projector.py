"""The projector and query service against a real nats-server and real SQLite."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NATS

from pantheon_es import ids
from pantheon_es.embedded import EmbeddedNats
from pantheon_es.errors import InvalidError, NotFoundError, UnknownEventTypeError
from pantheon_es.store import EventStore
from pantheon_es.subjects import Subjects
from projections.projector import Projector, dump_tables, rebuild
from projections.tasks import TASKS
from tests.conftest import Stack, eventually, start_stack, stop_stack

SHELL = {"kind": "shell", "argv": ["true"]}


async def submit_many(stack: Stack, n: int, **kw: Any) -> list[str]:
    out = []
    for i in range(n):
        out.append((await stack.client.submit_task(f"job-{i}", SHELL, **kw))["task_id"])
    return out


async def test_live_read_models_equal_a_rebuild_from_sequence_one(
    stack: Stack, tmp_path: Path
) -> None:
    tids = await submit_many(stack, 30, labels={"team": "a"})
    for tid in tids[::3]:
        await stack.client.cancel_task(tid, reason="r")
    head = await stack.store.last_seq()
    assert await stack.projector.wait_for(head)

    applied = await rebuild(stack.store, tmp_path / "rebuilt.db")

    assert applied == head
    live = await dump_tables(stack.db_path)
    assert live == await dump_tables(tmp_path / "rebuilt.db")
    assert len(live["tasks"]) == 30


async def test_kv_bucket_holds_current_state_of_every_task(stack: Stack) -> None:
    tids = await submit_many(stack, 5)
    await stack.client.cancel_task(tids[0])
    assert await stack.projector.wait_for(await stack.store.last_seq())
    kv = await stack.nc.jetstream().key_value(stack.store.subjects.state_bucket)

    async def all_there() -> bool:
        for tid in tids:
            entry = await kv.get(f"default.task.{tid}")
            state = orjson.loads(entry.value)
            assert state["status"] == ("cancelled" if tid == tids[0] else "pending")
        return True

    await eventually(all_there)
    row = await stack.client.get_task(tids[0])
    stored = orjson.loads((await kv.get(f"default.task.{tids[0]}")).value)
    derived = {"duration_s", "idle_s", "activity_class"}  # computed when asked
    assert stored == {k: v for k, v in row.items() if k not in derived}


async def test_killed_projector_resumes_without_double_applying(
    nc: NATS, store: EventStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack, run = await start_stack(nc, store, tmp_path / "served.db")
    try:
        tids = await submit_many(stack, 120)
        for tid in tids:
            await stack.client.cancel_task(tid)
    finally:
        await stop_stack(stack, run)
    head = await store.last_seq()

    class KilledMidBatch(Projector):
        """Cancelled inside the write of the batch that crosses a third of the log."""

        async def _write(self, uow: Any, last_seq: int) -> None:
            if last_seq >= head // 3:
                task = asyncio.current_task()
                assert task is not None
                task.cancel()  # lands at the next chunk boundary, before COMMIT
            await super()._write(uow, last_seq)

    monkeypatch.setattr("projections.projector.WRITE_CHUNK", 3)  # several chunks per batch
    db = tmp_path / "killed.db"
    projector = KilledMidBatch(store, db, batch_size=7, kv=False)
    await projector.open()
    with pytest.raises(asyncio.CancelledError):
        await projector.run()
    current = asyncio.current_task()
    assert current is not None
    current.uncancel()  # the cancellation was ours and has been delivered
    assert projector.db is not None
    projector.db.close()
    killed_at = projector.position

    resumed = Projector(store, db, batch_size=7, kv=False)
    await resumed.open()
    assert 0 < resumed.position == killed_at < head // 3  # the killed batch left no trace
    await resumed.catch_up(head)
    await resumed.shutdown()

    await rebuild(store, tmp_path / "fresh.db")
    tables = await dump_tables(db)
    assert tables == await dump_tables(tmp_path / "fresh.db")
    version = TASKS.columns.index("version")
    assert {row[version] for row in tables["tasks"]} == {2}  # each event applied once


async def test_unknown_event_type_stops_the_projector_naming_the_sequence(
    store: EventStore, tmp_path: Path
) -> None:
    subject = store.subjects.aggregate("default", "task", ids.new_id())
    ack = await store.js.publish(subject, orjson.dumps({"type": "TaskTeleported", "data": {}}))

    with pytest.raises(UnknownEventTypeError, match=f"sequence {ack.seq}"):
        await rebuild(store, tmp_path / "a.db")
    assert await rebuild(store, tmp_path / "b.db", skip_unknown=True) == ack.seq


async def test_get_and_list_with_filters_and_pagination(stack: Stack) -> None:
    a = await submit_many(stack, 7, labels={"team": "a"})
    b = await submit_many(stack, 3, labels={"team": "b"}, priority="urgent")
    await stack.client.cancel_task(a[0])

    page1 = await stack.client.list_tasks(limit=4)
    assert [t["id"] for t in page1["items"]] == (a + b)[::-1][:4]
    assert (page1["total"], page1["has_more"], page1["current_page"], page1["total_pages"]) == (
        10,
        True,
        1,
        3,
    )
    last = await stack.client.list_tasks(limit=4, offset=8)
    assert len(last["items"]) == 2 and last["has_more"] is False and last["current_page"] == 3

    team_b = await stack.client.list_tasks(labels={"team": "b"})
    assert sorted(t["id"] for t in team_b["items"]) == sorted(b)
    assert {t["priority_name"] for t in team_b["items"]} == {"urgent"}
    cancelled = await stack.client.list_tasks(status=["cancelled"])
    assert [t["id"] for t in cancelled["items"]] == [a[0]]
    oldest = await stack.client.list_tasks(order="oldest", limit=1)
    assert oldest["items"][0]["id"] == a[0]
    assert (await stack.client.get_task(a[0]))["finished_at"] is not None


async def test_queries_read_their_own_writes(stack: Stack) -> None:
    for _ in range(20):
        tid = (await stack.client.submit_task("now", SHELL))["task_id"]
        assert (await stack.client.get_task(tid))["status"] == "pending"


async def test_bad_queries_get_typed_errors(stack: Stack) -> None:
    with pytest.raises(NotFoundError):
        await stack.client.get_task(ids.new_id())
    with pytest.raises(InvalidError):
        await stack.client.list_tasks(limit=0)
    with pytest.raises(InvalidError):
        await stack.client.query("task", "get", {"task_id": "x"})


# -- property: any command sequence gives identical read models live and rebuilt ----------------

OPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("submit"),
            st.sampled_from(["low", "medium", "high", "urgent", 0, 999]),
            st.dictionaries(
                st.sampled_from(["team", "env"]), st.sampled_from(["a", "b"]), max_size=2
            ),
        ),
        st.tuples(st.just("cancel"), st.integers(min_value=0, max_value=30), st.booleans()),
        st.tuples(st.just("resubmit"), st.integers(min_value=0, max_value=30), st.none()),
    ),
    min_size=1,
    max_size=25,
)


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=OPS)
def test_any_task_command_sequence_gives_identical_read_models_live_and_rebuilt(
    nats_server: EmbeddedNats, tmp_path: Path, ops: list[tuple[Any, Any, Any]]
) -> None:
    asyncio.run(_run_ops(nats_server.url, tmp_path / secrets.token_hex(4), ops))


async def _run_ops(url: str, base: Path, ops: list[tuple[Any, Any, Any]]) -> None:
    nc = await nats.connect(url)
    try:
        store = EventStore(nc, Subjects(root=f"h{secrets.token_hex(4)}"))
        await store.provision()
        stack, run = await start_stack(nc, store, base / "live.db")
        try:
            tids: list[str] = []
            for op, a, b in ops:
                if op == "submit":
                    r = await stack.client.submit_task("p", SHELL, priority=a, labels=b or None)
                    tids.append(r["task_id"])
                elif op == "cancel" and tids:
                    await stack.client.cancel_task(tids[a % len(tids)], reason="x" if b else None)
                elif op == "resubmit":  # the same key again: one task, not two
                    await stack.client.submit_task(
                        f"k{a % 3}", SHELL, idempotency_key=f"key-{a % 3}"
                    )
            head = await store.last_seq()
            assert await stack.projector.wait_for(head)
        finally:
            await stop_stack(stack, run)
        await rebuild(store, base / "rebuilt.db")
        assert await dump_tables(base / "live.db") == await dump_tables(base / "rebuilt.db")
    finally:
        await nc.close()


async def test_kv_deletion_lost_in_a_crash_is_redone_at_restart(
    nc: NATS, store: EventStore, tmp_path: Path
) -> None:
    stack, run = await start_stack(nc, store, tmp_path / "served.db")
    try:
        kept, archived = await submit_many(stack, 2)
        for tid in (kept, archived):
            await stack.client.cancel_task(tid)
        await stack.client.archive_task(archived)  # the last event: the bucket deletes the key
    finally:
        await stop_stack(stack, run)
    head = await store.last_seq()

    class CrashBeforeDeletes(Projector):
        """Its KV deletions never reach the bucket (the process died right after commit)."""

        async def _put_states(self, items: Any, seq: int) -> int:
            if any(row is None for _key, row in items):
                raise ConnectionError("killed before the KV write")
            return await super()._put_states(items, seq)

    db = tmp_path / "crashed.db"
    crashed = CrashBeforeDeletes(store, db, batch_size=1)
    await crashed.open()
    assert await crashed.catch_up() == head
    await crashed.shutdown()
    kv = await nc.jetstream().key_value(store.subjects.state_bucket)
    key = f"default.task.{archived}"
    assert orjson.loads((await kv.get(key)).value)["status"] == "cancelled"  # stale

    restarted = Projector(store, db)
    await restarted.open()  # the resync re-does the deletion the crash lost
    await restarted.shutdown()
    with pytest.raises(nats.js.errors.KeyNotFoundError):
        await kv.get(key)
    assert orjson.loads((await kv.get(f"default.task.{kept}")).value)["status"] == "cancelled"


async def _lingering(
    nc: NATS, store: EventStore, tmp_path: Path, linger: float
) -> tuple[Stack, asyncio.Task[None], list[int]]:
    """A stack whose projector lingers; the returned list gets each applied batch's size."""
    stack, run = await start_stack(nc, store, tmp_path / "lingering.db", linger=linger)
    sizes: list[int] = []
    stack.projector.sinks.append(lambda batch: sizes.append(len(batch)))
    return stack, run, sizes


async def test_a_lingering_projector_writes_events_close_together_as_one_batch(
    nc: NATS, store: EventStore, tmp_path: Path
) -> None:
    stack, run, sizes = await _lingering(nc, store, tmp_path, linger=2.0)
    try:
        await submit_many(stack, 3)  # one after another, each well inside the linger
        head = await store.last_seq()
        assert await stack.projector.wait_for(head, timeout=10, hurry=False)
        assert sizes == [3]
    finally:
        await stop_stack(stack, run)


async def test_a_waiting_reader_cuts_the_linger_short(
    nc: NATS, store: EventStore, tmp_path: Path
) -> None:
    stack, run, sizes = await _lingering(nc, store, tmp_path, linger=60.0)
    try:
        (tid,) = await submit_many(stack, 1)
        # A query waits for the stream's last sequence: it must not wait out the linger
        # (its consistency timeout is far shorter than 60 s).
        assert (await stack.client.get_task(tid))["status"] == "pending"
        assert await stack.projector.wait_for(await store.last_seq(), timeout=5)
        (tid2,) = await submit_many(stack, 1)
        assert (await stack.client.get_task(tid2))["id"] == tid2
        assert sizes == [1, 1]
    finally:
        await asyncio.wait_for(stop_stack(stack, run), 10)  # shutdown cuts it short too


async def test_one_batch_or_one_event_per_batch_gives_the_same_read_models(
    stack: Stack, tmp_path: Path
) -> None:
    """Rows created and changed within one batch (never looked up in SQLite) end as
    when every event is its own batch: tasks, messages, mailboxes."""
    tids = await submit_many(stack, 12)
    for i, tid in enumerate(tids):
        await stack.client.send_message(tid, f"hello {i}", sender=tids[i - 1])
    for tid in tids[::2]:
        assert await stack.client.receive_messages(tid, max=5, ack=True)
    for tid in tids[::3]:
        await stack.client.cancel_task(tid, reason="r")
    head = await stack.store.last_seq()

    dumps = []
    for size in (1, 10_000):
        projector = Projector(stack.store, tmp_path / f"b{size}.db", kv=False, batch_size=size)
        await projector.open()
        assert await projector.catch_up(head) == head
        await projector.shutdown()
        dumps.append(await dump_tables(tmp_path / f"b{size}.db"))
    assert dumps[0] == dumps[1]
    assert len(dumps[0]["messages"]) == 12
    assert {r[0] for r in dumps[0]["tasks"]} == set(tids)


async def test_catch_up_checkpoints_in_bulk_and_live_again_after(
    stack: Stack, tmp_path: Path
) -> None:
    await submit_many(stack, 3)
    projector = Projector(stack.store, tmp_path / "bulk.db", kv=False)
    await projector.open()
    try:
        seen: list[int] = []

        def progress(position: int, target: int) -> None:
            assert projector.db is not None
            seen.append(projector.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0])

        await projector.catch_up(progress=progress)
        assert projector.db is not None
        assert seen and set(seen) == {20_000}
        assert projector.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000
    finally:
        await projector.shutdown()
