"""The command service over real NATS: bad input, idempotency, concurrency."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from nats.aio.client import Client as NATS

from pantheon_es import ids
from pantheon_es.client import PantheonClient
from pantheon_es.errors import (
    ConflictError,
    InvalidError,
    MalformedError,
    NotFoundError,
    TooLargeError,
    UnknownCommandError,
)
from pantheon_es.events import make_event
from pantheon_es.idempotency import Claim, fingerprint
from pantheon_es.service import CommandService, ServiceConfig
from pantheon_es.store import EventStore, StoreConfig
from pantheon_es.subjects import Subjects
from pantheon_es.tasks import CancelTask, SubmitTask, TaskSubmitted
from tests.conftest import Stack

SHELL = {"kind": "shell", "argv": ["echo", "hi"]}


async def raw_request(nc: NATS, subject: str, data: bytes) -> dict[str, Any]:
    msg = await nc.request(subject, data, timeout=5)
    return dict(orjson.loads(msg.data))


async def task_events(store: EventStore, tenant: str = "default") -> int:
    info = await store.js.stream_info(store.stream, subjects_filter=store.subjects.events(tenant))
    return int(info.state.messages)


BAD_INPUTS = [
    ("task.submit", b"{not json", MalformedError),
    ("task.submit", b"[1, 2, 3]", MalformedError),
    ("task.submit", b'"a string"', MalformedError),
    ("task.explode", b"{}", UnknownCommandError),
    ("spaceship.submit", b"{}", UnknownCommandError),
    ("task.submit", b'{"name": 5, "executor": {"kind": "shell", "argv": ["x"]}}', InvalidError),
    ("task.submit", b'{"name": "n"}', InvalidError),
    ("task.submit", b'{"name": "n", "executor": {"kind": "shell", "argv": []}}', InvalidError),
    (
        "task.submit",
        b'{"name": "n", "executor": {"kind": "shell", "argv": ["x"]}, "x": 1}',
        InvalidError,
    ),
    (
        "task.submit",
        b'{"name": "n", "executor": {"kind": "shell", "argv": ["x"]}, "priority": -3}',
        InvalidError,
    ),
    ("task.cancel", b'{"task_id": "not-an-id"}', InvalidError),
    ("task.cancel", b'{"task_id": "01J00000000000000000000000"}', NotFoundError),
]


@pytest.mark.parametrize(("verb", "body", "error"), BAD_INPUTS)
async def test_bad_input_gets_typed_error_and_appends_nothing(
    stack: Stack, verb: str, body: bytes, error: type[Exception]
) -> None:
    subjects = stack.store.subjects
    before = await stack.store.last_seq()
    aggregate, _, v = verb.partition(".")

    reply = await raw_request(stack.nc, subjects.command("default", aggregate, v), body)

    assert reply["ok"] is False
    assert reply["error"]["code"] == error.code.value  # type: ignore[attr-defined]
    assert reply["error"]["message"]
    assert await stack.store.last_seq() == before
    # ... and the service keeps serving.
    ok = await stack.client.submit_task("after-bad-input", SHELL)
    assert ok["seq"] == before + 1


async def test_invalid_reply_names_each_bad_field(stack: Stack) -> None:
    with pytest.raises(InvalidError) as info:
        await stack.client.command("task", "submit", {"name": "", "executor": {"kind": "python"}})
    locs = {d["loc"] for d in info.value.details}
    assert "name" in locs and any(loc.startswith("executor") for loc in locs)


async def test_payload_over_the_limit_is_too_large_and_appends_nothing(
    nc: NATS, store: EventStore
) -> None:
    service = CommandService(nc, store, ServiceConfig(max_command_bytes=4096))
    await service.start()
    try:
        before = await store.last_seq()
        body = orjson.dumps({"name": "big", "executor": {"kind": "shell", "argv": ["x" * 10_000]}})
        reply = await raw_request(nc, store.subjects.command("default", "task", "submit"), body)
        assert reply["error"]["code"] == TooLargeError.code.value
        assert reply["error"]["details"] == {"size": len(body), "limit": 4096}
        assert await store.last_seq() == before
        client = PantheonClient(nc, subjects=store.subjects)
        assert (await client.submit_task("small", SHELL))["seq"] == before + 1
    finally:
        await service.shutdown()


async def test_submit_then_cancel_then_cancel_again(stack: Stack) -> None:
    submitted = await stack.client.submit_task("job", SHELL, priority="high")
    tid = submitted["task_id"]
    first = await stack.client.cancel_task(tid, reason="changed my mind")
    second = await stack.client.cancel_task(tid)

    assert first == {
        "task_id": tid,
        "status": "cancelled",
        "changed": True,
        "seq": submitted["seq"] + 1,
    }
    assert second["changed"] is False and second["seq"] == first["seq"]
    history = await stack.store.read_aggregate("default", "task", tid)
    assert [h.event.type for h in history] == ["TaskSubmitted", "TaskCancelled"]
    assert history[1].event.causation_id != history[0].event.causation_id


async def test_same_idempotency_key_twice_gives_one_event_and_same_reply(stack: Stack) -> None:
    first = await stack.client.submit_task("once", SHELL, idempotency_key="order-42")
    second = await stack.client.submit_task("once", SHELL, idempotency_key="order-42")

    assert second == first
    assert await task_events(stack.store) == 1


@pytest.mark.slow
async def test_idempotency_key_is_honoured_after_the_dedup_window(
    nc: NATS, subjects: Subjects
) -> None:
    store = EventStore(nc, subjects, StoreConfig(duplicate_window=1.0))
    await store.provision()
    info = await store.js.stream_info(store.stream)
    assert info.config.duplicate_window == 1.0
    service = CommandService(nc, store)
    await service.start()
    try:
        client = PantheonClient(nc, subjects=subjects)
        first = await client.submit_task("once", SHELL, idempotency_key="k-1")
        await asyncio.sleep(1.5)  # wait out JetStream's duplicate window
        second = await client.submit_task("once", SHELL, idempotency_key="k-1")
        assert second == first
        assert await task_events(store) == 1
    finally:
        await service.shutdown()


async def test_same_key_for_a_different_command_is_a_conflict(stack: Stack) -> None:
    await stack.client.submit_task("a", SHELL, idempotency_key="k")
    with pytest.raises(ConflictError, match="different command"):
        await stack.client.submit_task("b", SHELL, idempotency_key="k")
    assert await task_events(stack.store) == 1


async def test_concurrent_requests_with_one_key_create_one_task(stack: Stack) -> None:
    told_to_wait: list[float | None] = []

    async def submit_retrying() -> dict[str, Any]:
        while True:
            try:
                return await stack.client.submit_task("racy", SHELL, idempotency_key="same")
            except ConflictError as exc:  # "in flight": the client backs off as told
                told_to_wait.append(exc.retry_after)
                await asyncio.sleep((exc.retry_after or 1.0) / 10)

    replies = await asyncio.gather(*(submit_retrying() for _ in range(10)))

    assert len({r["task_id"] for r in replies}) == 1
    assert await task_events(stack.store) == 1
    assert None not in told_to_wait  # every "in flight" answer says when to retry


async def test_keyed_no_op_cancel_is_remembered(stack: Stack) -> None:
    tid = (await stack.client.submit_task("x", SHELL))["task_id"]
    await stack.client.cancel_task(tid)
    a = await stack.client.command("task", "cancel", {"task_id": tid, "idempotency_key": "c"})
    b = await stack.client.command("task", "cancel", {"task_id": tid, "idempotency_key": "c"})
    assert a == b and a["changed"] is False


async def test_claim_left_pending_by_a_crash_after_append_is_resolved_from_the_log(
    stack: Stack,
) -> None:
    # What a service that crashed between its append and marking the claim done leaves behind.
    command = SubmitTask(name="crashy", executor=SHELL, idempotency_key="crash-1")
    task_id = ids.new_id()
    event = make_event(
        TaskSubmitted(
            name="crashy",
            executor=command.executor,
            priority=command.priority,
            resources=command.resources,
            labels={},
            idempotency_key="crash-1",
        ),
        event_id=ids.new_id(),
        tenant="default",
        aggregate_id=task_id,
        occurred_at=datetime.now(UTC),
        actor="test",
        correlation_id="c",
        causation_id=None,
    )
    index = stack.service.idempotency
    claim = Claim(
        fingerprint=fingerprint(command),
        state="pending",
        at=index.now(),
        reply={"task_id": task_id, "status": "pending"},
        subject=stack.store.subjects.aggregate("default", "task", task_id),
        expected_seq=0,
        event_ids=[event.event_id],
    )
    await index.create(index.key("default", "crash-1"), claim)
    appended = await stack.store.append([event], expected_seq=0)

    reply = await stack.client.submit_task("crashy", SHELL, idempotency_key="crash-1")

    assert reply == {"task_id": task_id, "status": "pending", "seq": appended.last_seq}
    assert await task_events(stack.store) == 1


async def test_stale_claim_whose_events_never_landed_is_taken_over(
    nc: NATS, store: EventStore
) -> None:
    service = CommandService(nc, store, ServiceConfig(claim_timeout=0.2))
    await service.start()
    try:
        command = SubmitTask(name="lost", executor=SHELL, idempotency_key="lost-1")
        index = service.idempotency
        ghost = ids.new_id()
        await index.create(
            index.key("default", "lost-1"),
            Claim(
                fingerprint=fingerprint(command),
                state="pending",
                at=index.now() - 1.0,
                reply={"task_id": ghost, "status": "pending"},
                subject=store.subjects.aggregate("default", "task", ghost),
                expected_seq=0,
                event_ids=[ids.new_id()],
            ),
        )
        client = PantheonClient(nc, subjects=store.subjects)
        reply = await client.submit_task("lost", SHELL, idempotency_key="lost-1")
        assert reply["task_id"] != ghost
        assert await task_events(store) == 1
        assert await client.submit_task("lost", SHELL, idempotency_key="lost-1") == reply
    finally:
        await service.shutdown()


async def test_replica_with_stale_cache_decides_again_on_fresh_state(
    nc: NATS, store: EventStore
) -> None:
    a = CommandService(nc, store)
    b = CommandService(nc, store)
    tid = (await a.execute("default", SubmitTask(name="shared", executor=SHELL)))["task_id"]
    await a.execute("default", CancelTask(task_id=tid, reason="warm a's cache"))
    # b has never seen the task: it loads it from the log and sees it cancelled.
    assert (await b.execute("default", CancelTask(task_id=tid)))["changed"] is False

    # a caches a second task as pending; b cancels it behind a's back.
    tid2 = (await a.execute("default", SubmitTask(name="other", executor=SHELL)))["task_id"]
    assert (await b.execute("default", CancelTask(task_id=tid2)))["changed"] is True
    again = await a.execute("default", CancelTask(task_id=tid2))  # a's cache is stale

    assert again["changed"] is False
    history = await store.read_aggregate("default", "task", tid2)
    assert [h.event.type for h in history] == ["TaskSubmitted", "TaskCancelled"]


async def test_unknown_tenant_token_in_subject_is_invalid(stack: Stack) -> None:
    before = await stack.store.last_seq()
    subject = f"{stack.store.subjects.root}.cmd.bad+tenant.task.submit"
    reply = await raw_request(stack.nc, subject, orjson.dumps({"name": "x", "executor": SHELL}))
    assert reply["error"]["code"] == "invalid"
    assert await stack.store.last_seq() == before


async def test_tenants_are_isolated(stack: Stack) -> None:
    other = PantheonClient(stack.nc, tenant="acme", subjects=stack.store.subjects)
    tid = (await other.submit_task("theirs", SHELL))["task_id"]
    with pytest.raises(NotFoundError):
        await stack.client.cancel_task(tid)
    with pytest.raises(NotFoundError):
        await stack.client.get_task(tid)
    assert (await other.get_task(tid))["tenant"] == "acme"
