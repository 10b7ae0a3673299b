"""The event feed's own ordered consumer (raw messages) against a real nats-server:
flow control, gaps, heartbeats and a consumer that disappears; and nats-py's
ordered consumer for clients that are not a :class:`Connection`."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest

from pantheon_es import connection, ids
from pantheon_es.embedded import EmbeddedNats
from pantheon_es.errors import PantheonError
from pantheon_es.specs import Resources, ShellSpec
from pantheon_es.store import EventFeed, EventStore, RawEvent, StoreConfig
from pantheon_es.subjects import Subjects
from pantheon_es.tasks import TaskSubmitted
from tests.conftest import eventually
from tests.test_store import _event, submitted


async def _append(store: EventStore, count: int) -> list[int]:
    return [
        (await store.append([submitted(ids.new_id())], expected_seq=0)).last_seq
        for _ in range(count)
    ]


async def _read(feed: EventFeed, count: int, timeout: float = 10) -> list[RawEvent]:
    got: list[RawEvent] = []
    while len(got) < count:
        batch = await feed.next_batch(max_items=1000, timeout=timeout)
        assert batch, f"the feed stalled after {len(got)} of {count}"
        got += batch
    return got


async def test_a_feed_on_a_connection_reads_raw_messages(store: EventStore) -> None:
    seqs = await _append(store, 20)
    async with store.feed(from_seq=1) as feed:
        got = await _read(feed, 20)
        assert feed._raw is not None  # the raw path, not nats-py's ordered consumer
    assert [g.seq for g in got] == seqs
    assert {g.subject for g in got} == {
        store.subjects.aggregate("default", "task", e.subject.rsplit(".", 1)[-1]) for e in got
    }
    assert all(g.timestamp_ns > 0 for g in got)
    assert got[-1].pending == 0 and got[0].pending == 19


async def test_a_feed_creates_a_named_consumer_through_the_subject_that_carries_its_filter(
    store: EventStore, nc: connection.Connection
) -> None:
    """What lets NATS permissions hold a user to one tenant (docs/decisions.md, "NATS
    permissions for one tenant"): the filter is in the API subject, not only the body."""
    for tenant in ("a", "a", "b"):
        await store.append([submitted(ids.new_id(), tenant=tenant)], expected_seq=0)
    requests: list[tuple[str, dict[str, Any]]] = []

    async def seen(msg: Any) -> None:
        requests.append((msg.subject, orjson.loads(msg.data)["config"]))

    await nc.subscribe(f"$JS.API.CONSUMER.CREATE.{store.stream}.>", cb=seen)
    await nc.flush()
    a = store.subjects.events("a")
    async with store.feed(from_seq=2, subject=a) as feed:
        got = await _read(feed, 1)
        assert feed.initial_pending == 1  # a's events from sequence 2: the create reply's count
    assert [g.seq for g in got] == [2]
    assert await store.stream_last_seq(a) == await store.last_seq() == 3
    assert await store.first_seq(a, start_seq=2) == 2
    assert await store.first_seq(a, start_seq=3) is None
    assert await store.subject_last_seq(a) == 2

    async def four() -> bool:
        return len(requests) == 4

    await eventually(four, timeout=5)
    for subject, config in requests:  # the feed, the last sequence, the two lookups
        assert subject == f"$JS.API.CONSUMER.CREATE.{store.stream}.{config['name']}.{a}"
        assert config["filter_subject"] == a


async def test_flow_control_is_answered_so_a_long_catch_up_never_stalls(
    store: EventStore,
) -> None:
    """16 MB in one go: far past the consumer's flow-control window, which the server
    stops at until the feed answers."""
    big = "x" * 8000
    seqs = []
    for _ in range(2000):
        data = TaskSubmitted(
            name="big",
            executor=ShellSpec(argv=["true"]),
            priority=200,
            resources=Resources(),
            labels={"blob": big},
        )
        event = _event(data, ids.new_id())
        seqs.append((await store.append([event], expected_seq=0)).last_seq)
    # Heartbeats 30 s apart: a stall could not be undone by one ("Consumer Stalled") in time.
    async with store.feed(from_seq=1, max_buffer=5000, heartbeat=30) as feed:
        got = await _read(feed, 2000, timeout=5)
        assert feed.pauses == 0 and feed.resets == 0
    assert [g.seq for g in got] == seqs


@pytest.mark.parametrize("fault", ["skipped consumer sequence", "heartbeat ahead"])
async def test_a_gap_starts_a_new_consumer_after_the_last_event_kept(
    store: EventStore, fault: str
) -> None:
    seqs = await _append(store, 30)
    async with store.feed(from_seq=1) as feed:
        first = await _read(feed, 30)
        # What the server would send if messages of this consumer were lost on the way.
        if fault == "skipped consumer sequence":
            reply = f"$JS.ACK.{store.stream}.c.1.{seqs[-1] + 5}.{feed._dseq + 5}.1.0"
            feed._keep_raw(b"subject", reply.encode(), b"{}")
        else:
            feed._control(
                b"",
                f"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: {feed._dseq + 3}\r\n"
                f"Nats-Last-Stream: {seqs[-1] + 3}\r\n\r\n".encode(),
            )
        assert feed.resets == 1
        more = await _append(store, 10)
        rest = await _read(feed, 10)
    assert [g.seq for g in first + rest] == seqs + more  # nothing lost, nothing twice


async def test_a_consumer_that_disappears_is_replaced_within_two_heartbeats(
    store: EventStore,
) -> None:
    seqs = await _append(store, 10)
    async with store.feed(from_seq=1, heartbeat=0.3) as feed:
        first = await _read(feed, 10)
        for info in await store.js.consumers_info(store.stream):
            await store.js.delete_consumer(store.stream, info.name)
        more = await _append(store, 10)  # nothing delivers these until a new consumer
        rest = await _read(feed, 10, timeout=5)
        assert feed.resets >= 1
    assert [g.seq for g in first + rest] == seqs + more


async def test_a_plain_nats_py_client_gets_the_same_feed(
    nats_server: Any, store: EventStore, subjects: Subjects
) -> None:
    """Not a Connection: nats-py's ordered consumer, pausing included."""
    seqs = await _append(store, 120)
    plain = await nats.connect(nats_server.url)
    try:
        other = EventStore(plain, subjects, StoreConfig())
        async with other.feed(from_seq=1, max_buffer=25) as feed:
            assert feed._raw is None
            got = []
            while len(got) < 120:
                await asyncio.sleep(0.01)
                got += await feed.next_batch(max_items=10, timeout=5)
            assert feed.pauses >= 1
    finally:
        await plain.close()
    assert [g.seq for g in got] == seqs


async def test_a_feed_follows_the_log_across_a_server_restart(tmp_path: Path) -> None:
    """The server stops and starts again on the same port and store: the connection
    reconnects, the feed's consumer is gone with the old server, and the watchdog
    starts a new one after the last event kept."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = EmbeddedNats(tmp_path / "nats", port=port)
    await asyncio.to_thread(server.start)
    nc = await connection.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    try:
        store = EventStore(nc, Subjects("restart"), StoreConfig())
        await store.provision()
        seqs = await _append(store, 5)
        async with store.feed(from_seq=1, heartbeat=0.3) as feed:
            first = await _read(feed, 5)
            await asyncio.to_thread(server.stop)
            await asyncio.to_thread(server.start)

            async def appended() -> list[int]:
                try:
                    return await _append(store, 5)
                except PantheonError:
                    return []  # JetStream not back yet

            more = await eventually(appended, timeout=20, interval=0.2)
            rest = await _read(feed, 5, timeout=10)
            assert feed.resets >= 1
        assert [g.seq for g in first + rest] == seqs + more
    finally:
        await nc.close()
        await asyncio.to_thread(server.stop)
