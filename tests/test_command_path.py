"""The command path's cheap constructions agree with the library's own ones."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from pantheon_es import ids
from pantheon_es.events import REGISTRY, decode, encode, make_event
from pantheon_es.service import _KeyedLocks
from pantheon_es.specs import PythonSpec, Resources
from pantheon_es.store import _Acks
from pantheon_es.tasks import TaskCompleted, TaskSubmitted


@pytest.mark.parametrize(
    "data",
    [
        TaskSubmitted(
            name="noop",
            executor=PythonSpec(target="tools.bench_targets:noop"),
            priority=200,
            resources=Resources(cpu=0),
            labels={"team": "a"},
        ),
        TaskCompleted(lease_id=ids.new_id(), result={"x": [1, 2]}),
    ],
)
def test_make_event_equals_pydantic_model_construct(data: Any) -> None:
    fields: dict[str, Any] = dict(
        event_id=ids.new_id(),
        tenant="default",
        aggregate_id=ids.new_id(),
        occurred_at=datetime.now(UTC),
        actor="test",
        correlation_id="corr",
        causation_id=None,
    )
    fast = make_event(data, **fields)
    cls = REGISTRY.envelope_class(data.event_type)
    slow = cls.model_construct(
        **fields, type=data.event_type, schema_version=data.schema_version,
        aggregate=data.aggregate, data=data,
    )  # fmt: skip
    assert fast == slow
    assert type(fast) is type(slow)
    assert fast.model_fields_set == slow.model_fields_set
    assert encode(fast) == encode(slow)
    assert decode(encode(fast)) == fast  # and it validates as the model it claims to be
    with pytest.raises(Exception, match="frozen"):
        fast.actor = "someone else"  # type: ignore[misc]


async def test_acks_time_out_by_the_sweep_while_others_are_answered(nc: Any) -> None:
    async def answer_some(msg: Any) -> None:
        if msg.data == b"answer":
            await msg.respond(b"ack")

    sub = await nc.subscribe("acks.test", cb=answer_some)
    acks = _Acks(nc)
    start = time.monotonic()
    answered, silent = await asyncio.gather(
        acks.publish("acks.test", b"answer", {}, 0.3),
        acks.publish("acks.test", b"silent", {}, 0.3),
        return_exceptions=True,
    )
    waited = time.monotonic() - start
    assert answered == b"ack"
    assert isinstance(silent, TimeoutError)
    assert 0.3 <= waited < 2.0  # the sweep runs every min(timeout, 0.25 s)
    assert acks._pending == {}
    await asyncio.sleep(0.35)
    assert acks._sweep is None  # nothing in flight: no timer left running
    await sub.unsubscribe()


async def test_keyed_locks_serialise_one_key_and_forget_it_after() -> None:
    locks = _KeyedLocks()
    order: list[str] = []

    async def hold(name: str, key: tuple[str, str, str]) -> None:
        async with locks.hold(key):
            order.append(f"{name}+")
            await asyncio.sleep(0.01)
            order.append(f"{name}-")

    k1, k2 = ("t", "task", "a"), ("t", "task", "b")
    await asyncio.gather(hold("a1", k1), hold("a2", k1), hold("b", k2))
    assert order.index("a1-") < order.index("a2+")  # same key: one after the other
    assert order.index("b+") < order.index("a1-")  # other key: at the same time
    assert locks._locks == {}

    # A waiter cancelled while waiting leaves no entry behind and does not break the lock.
    async with locks.hold(k1):
        waiter = asyncio.create_task(hold("w", k1))
        await asyncio.sleep(0.01)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
    assert locks._locks == {}
    await hold("after", k1)
    assert order[-2:] == ["after+", "after-"]


async def test_the_aggregate_cache_never_goes_back_to_an_older_state(store: Any) -> None:
    """Acks can be handled out of order (create_all holds no per-key lock): a state
    put with an older sequence than the cached one is ignored."""
    from pantheon_es.aggregates import AGGREGATE_TYPES
    from pantheon_es.service import AggregateCache

    cache = AggregateCache(store, size=10)
    key = ("default", "task", ids.new_id())
    cache.put(key, "leased", 12)
    cache.put(key, "submitted", 11)
    assert await cache.load(AGGREGATE_TYPES["task"], "default", key[2]) == ("leased", 12)
    cache.put(key, "completed", 13)
    assert await cache.load(AGGREGATE_TYPES["task"], "default", key[2]) == ("completed", 13)
