"""The JetStream event store against a real nats-server."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import nats.errors
import orjson
import pytest

from pantheon_es import ids
from pantheon_es.errors import ConcurrencyError, UnavailableError
from pantheon_es.events import Event, EventData, make_event
from pantheon_es.specs import Resources, ShellSpec
from pantheon_es.store import EventStore, StoreConfig
from pantheon_es.tasks import TaskCancelled, TaskSubmitted
from tests.conftest import eventually


def _event(data: EventData, task_id: str, tenant: str = "default") -> Event[Any]:
    return make_event(
        data,
        event_id=ids.new_id(),
        tenant=tenant,
        aggregate_id=task_id,
        occurred_at=datetime.now(UTC),
        actor="test",
        correlation_id="corr",
        causation_id=None,
    )


def submitted(task_id: str, name: str = "job", tenant: str = "default") -> Event[Any]:
    data = TaskSubmitted(
        name=name,
        executor=ShellSpec(argv=["true"]),
        priority=200,
        resources=Resources(),
        labels={"team": "a"},
    )
    return _event(data, task_id, tenant)


def cancelled(task_id: str, tenant: str = "default") -> Event[Any]:
    return _event(TaskCancelled(reason="test", previous_status="pending"), task_id, tenant)


async def test_append_then_read_aggregate_round_trips_events(store: EventStore) -> None:
    task_id = ids.new_id()
    first = submitted(task_id)
    r1 = await store.append([first], expected_seq=0)
    second = cancelled(task_id)
    r2 = await store.append([second], expected_seq=r1.last_seq)

    history = await store.read_aggregate("default", "task", task_id)

    assert [h.event for h in history] == [first, second]
    assert [h.seq for h in history] == [r1.last_seq, r2.last_seq]
    assert r2.last_seq == r1.last_seq + 1
    assert not r1.already_written
    assert await store.subject_last_seq(history[0].subject) == r2.last_seq


async def test_read_aggregate_of_unknown_id_is_empty(store: EventStore) -> None:
    assert await store.read_aggregate("default", "task", ids.new_id()) == []


async def test_twenty_concurrent_appends_with_same_expected_seq_exactly_one_wins(
    store: EventStore,
) -> None:
    task_id = ids.new_id()
    base = await store.append([submitted(task_id)], expected_seq=0)

    async def attempt() -> str:
        try:
            await store.append([cancelled(task_id)], expected_seq=base.last_seq)
            return "won"
        except ConcurrencyError:
            return "conflict"

    outcomes = await asyncio.gather(*(attempt() for _ in range(20)))

    assert outcomes.count("won") == 1
    assert outcomes.count("conflict") == 19
    assert len(await store.read_aggregate("default", "task", task_id)) == 2


async def test_twenty_concurrent_batches_with_same_expected_seq_exactly_one_wins(
    store: EventStore,
) -> None:
    task_id = ids.new_id()

    async def attempt() -> str:
        try:
            await store.append([submitted(task_id), cancelled(task_id)], expected_seq=0)
            return "won"
        except ConcurrencyError:
            return "conflict"

    outcomes = await asyncio.gather(*(attempt() for _ in range(20)))

    assert outcomes.count("won") == 1
    assert len(await store.read_aggregate("default", "task", task_id)) == 2


@pytest.mark.parametrize("size", [1, 3])
async def test_retried_append_after_lost_ack_is_recognised_as_written(
    store: EventStore, size: int
) -> None:
    task_id = ids.new_id()
    events = [submitted(task_id)] + [cancelled(task_id) for _ in range(size - 1)]
    first = await store.append(events, expected_seq=0)
    last_before = await store.last_seq()

    # The same append again, as a writer whose ack was lost would send it.
    again = await store.append(events, expected_seq=0)

    assert again.already_written
    assert (again.first_seq, again.last_seq) == (first.first_seq, first.last_seq)
    assert await store.last_seq() == last_before


async def test_retried_append_is_recognised_even_after_another_writer_appended(
    store: EventStore,
) -> None:
    task_id = ids.new_id()
    mine = [submitted(task_id)]
    r = await store.append(mine, expected_seq=0)
    await store.append([cancelled(task_id)], expected_seq=r.last_seq)  # someone else

    again = await store.append(mine, expected_seq=0)

    assert again.already_written
    assert again.last_seq == r.last_seq


async def test_append_with_stale_seq_of_different_events_is_a_conflict(store: EventStore) -> None:
    task_id = ids.new_id()
    await store.append([submitted(task_id)], expected_seq=0)
    with pytest.raises(ConcurrencyError):
        await store.append([submitted(task_id)], expected_seq=0)


async def test_atomic_batch_rejected_as_a_whole_leaves_stream_unchanged(store: EventStore) -> None:
    task_id = ids.new_id()
    r = await store.append([submitted(task_id)], expected_seq=0)
    before = await store.last_seq()

    with pytest.raises(ConcurrencyError):
        await store.append(
            [cancelled(task_id), cancelled(task_id), cancelled(task_id)], expected_seq=0
        )

    assert await store.last_seq() == before
    history = await store.read_aggregate("default", "task", task_id)
    assert [h.seq for h in history] == [r.last_seq]


async def test_batch_lands_contiguously_and_is_read_back_in_order(store: EventStore) -> None:
    task_id = ids.new_id()
    events = [submitted(task_id), cancelled(task_id), cancelled(task_id)]

    r = await store.append(events, expected_seq=0)

    assert r.last_seq - r.first_seq == 2
    history = await store.read_aggregate("default", "task", task_id)
    assert [h.event.event_id for h in history] == [e.event_id for e in events]
    assert [h.seq for h in history] == list(range(r.first_seq, r.last_seq + 1))


async def test_append_refuses_events_of_two_aggregates(store: EventStore) -> None:
    with pytest.raises(ValueError, match="one aggregate"):
        await store.append([submitted(ids.new_id()), submitted(ids.new_id())], expected_seq=0)


async def test_provision_is_idempotent_and_updates_duplicate_window(nc: Any, subjects: Any) -> None:
    a = EventStore(nc, subjects, StoreConfig(duplicate_window=120))
    await a.provision()
    await a.provision()
    b = EventStore(nc, subjects, StoreConfig(duplicate_window=30))
    await b.provision()

    info = await nc.jetstream().stream_info(subjects.stream)

    assert info.config.duplicate_window == 30
    assert info.config.allow_atomic
    assert info.config.subjects == [subjects.all_events]


async def test_feed_replays_from_a_sequence_then_follows_live_appends(store: EventStore) -> None:
    task_ids = [ids.new_id() for _ in range(5)]
    seqs = [(await store.append([submitted(t)], expected_seq=0)).last_seq for t in task_ids]

    async with store.feed(from_seq=seqs[2]) as feed:
        got = []
        while len(got) < 3:
            got += await feed.next_batch(timeout=5)
        assert [g.seq for g in got] == seqs[2:]
        live = await store.append([submitted(ids.new_id())], expected_seq=0)
        more = await feed.next_batch(timeout=5)

    assert [m.seq for m in more] == [live.last_seq]


async def test_feed_keeps_memory_bounded_by_its_buffer(store: EventStore) -> None:
    for _ in range(300):
        await store.append([submitted(ids.new_id())], expected_seq=0)

    async with store.feed(from_seq=1, max_buffer=50) as feed:
        seen: list[int] = []
        while len(seen) < 300:
            batch = await feed.next_batch(max_items=1000, timeout=5)
            assert len(batch) <= 50
            seen += [b.seq for b in batch]
            await asyncio.sleep(0)

    assert seen == sorted(seen) and len(set(seen)) == 300


async def test_a_slow_reader_pauses_the_feed_and_loses_nothing(store: EventStore) -> None:
    """The server pushes far more than the buffer while the reader sleeps: the feed pauses
    (unsubscribes) and resumes after the last event kept, also on a filtered subject."""
    expected = []
    for i in range(600):
        tenant = "slow" if i % 3 else "other"
        seq = (
            await store.append([submitted(ids.new_id(), tenant=tenant)], expected_seq=0)
        ).last_seq
        if tenant == "slow":
            expected.append(seq)

    subject = store.subjects.events("slow")
    async with store.feed(from_seq=1, subject=subject, max_buffer=40) as feed:
        seen: list[int] = []
        while len(seen) < len(expected):
            await asyncio.sleep(0.02)  # the loop is free: deliveries pile up meanwhile
            assert len(feed._buffer) <= 40
            batch = await feed.next_batch(max_items=15, timeout=5)
            assert batch, f"stalled after {len(seen)} of {len(expected)}"
            seen += [b.seq for b in batch]
        assert feed.pauses >= 5
        live = await store.append([submitted(ids.new_id(), tenant="slow")], expected_seq=0)
        assert [b.seq for b in await feed.next_batch(timeout=5)] == [live.last_seq]

    assert seen == expected


async def test_stored_events_are_republished_as_notices_and_rejected_ones_are_not(
    store: EventStore,
) -> None:
    task_id = ids.new_id()
    notices: list[Any] = []
    sub = await store.nc.subscribe(
        store.subjects.changed("default", "task", task_id), cb=_collect(notices)
    )
    first = submitted(task_id)
    r = await store.append([first], expected_seq=0)
    with pytest.raises(ConcurrencyError):  # rejected: must not be announced
        await store.append([cancelled(task_id)], expected_seq=0)
    second = cancelled(task_id)
    await store.append([second], expected_seq=r.last_seq)

    async def both_arrived() -> bool:
        return len(notices) >= 2

    await eventually(both_arrived)
    await asyncio.sleep(0.2)  # room for a wrong third one to show up
    await sub.unsubscribe()
    assert [orjson.loads(n.data)["event_id"] for n in notices] == [first.event_id, second.event_id]
    assert [int(n.headers["Nats-Sequence"]) for n in notices] == [r.last_seq, r.last_seq + 1]


def _collect(into: list[Any]) -> Any:
    async def cb(msg: Any) -> None:
        into.append(msg)

    return cb


async def test_an_append_with_no_stream_behind_its_subject_fails_as_no_responders(
    nc: Any, subjects: Any
) -> None:
    """The server answers "503 no responders" at once; the append does not wait for
    an ack that cannot come (raw acks on a Connection read the status line)."""
    store = EventStore(nc, subjects, StoreConfig(ack_timeout=3, append_attempts=1))
    with pytest.raises(UnavailableError) as caught:  # never provisioned
        await store.append([submitted(ids.new_id())], expected_seq=0)
    assert isinstance(caught.value.__cause__, nats.errors.NoRespondersError)


async def test_new_aggregates_go_in_atomic_batches_and_an_existing_one_stops_its_batch(
    store: EventStore,
) -> None:
    a, b, c = ids.new_id(), ids.new_id(), ids.new_id()
    seqs = await store.append_new([[submitted(a)], [submitted(b), cancelled(b)], [submitted(c)]])
    first = seqs[0]
    assert seqs == [first, first + 2, first + 3]
    assert [h.seq for h in await store.read_aggregate("default", "task", b)] == [
        first + 1,
        first + 2,
    ]

    # More than one batch holds: 1,001 decisions in two, consecutive.
    many = await store.append_new([[submitted(ids.new_id())] for _ in range(1001)])
    assert many == list(range(first + 4, first + 4 + 1001))

    # c exists: nothing of that batch is stored.
    before = await store.last_seq()
    with pytest.raises(ConcurrencyError):
        await store.append_new([[submitted(ids.new_id())], [submitted(c)]])
    assert await store.last_seq() == before
