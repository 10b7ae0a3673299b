"""Pure parts, no server: ids, subjects, the codec and the task aggregate."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from pantheon_es import ids
from pantheon_es.domain import DecideContext
from pantheon_es.errors import (
    ConflictError,
    ErrorCode,
    NotFoundError,
    OverloadedError,
    UnknownEventTypeError,
    error_from_reply,
)
from pantheon_es.events import REGISTRY, EventData, decode, encode, make_event
from pantheon_es.specs import PRIORITY_LEVELS, priority_name
from pantheon_es.subjects import Subjects, is_token
from pantheon_es.tasks import (
    TASK,
    CancelTask,
    SubmitTask,
    TaskCancelled,
    TaskStatus,
    TaskSubmitted,
    decide,
)

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
SHELL = {"kind": "shell", "argv": ["echo", "hi"]}


def ctx(aggregate_id: str = "01J00000000000000000000000") -> DecideContext:
    return DecideContext("default", aggregate_id, NOW)


def wrap(data: EventData, aggregate_id: str, at: datetime = NOW) -> Any:
    return make_event(
        data,
        event_id=ids.new_id(),
        tenant="default",
        aggregate_id=aggregate_id,
        occurred_at=at,
        actor="test",
        correlation_id="c",
        causation_id=None,
    )


# -- ids -------------------------------------------------------------------------------------


def test_ids_are_strictly_increasing_within_one_millisecond() -> None:
    made = [ids.new_id() for _ in range(10_000)]
    assert made == sorted(made)
    assert len(set(made)) == len(made)


@given(st.integers(min_value=0, max_value=2**48 - 1), st.integers(min_value=0, max_value=2**79))
def test_an_id_is_the_encoding_of_its_time_and_random_part(ms: int, rand: int) -> None:
    generator = ids._Generator()
    generator._last_ms, generator._last_rand = ms, rand - 1  # the next id in ms is rand
    assert generator.next(ms) == ids.encode((ms << 80) | rand)
    assert generator.next(ms + 1) == ids.encode(((ms + 1) << 80) | generator._last_rand)


def test_ids_are_subject_safe_and_carry_their_time() -> None:
    value = ids.new_id()
    assert len(value) == 26 and is_token(value) and ids.is_id(value)
    assert abs(ids.timestamp_of(value) - datetime.now(UTC)) < timedelta(seconds=5)


@given(st.integers(min_value=0, max_value=2**48 - 1), st.integers(min_value=0, max_value=2**48 - 1))
def test_ids_sort_by_time(a_ms: int, b_ms: int) -> None:
    a = ids.encode(a_ms << 80)
    b = ids.encode(b_ms << 80)
    assert (a < b) == (a_ms < b_ms)


# -- subjects --------------------------------------------------------------------------------


def test_subjects_follow_the_design_layout() -> None:
    s = Subjects()
    assert s.stream == "PANTHEON_EVENTS"
    assert s.command("default", "task", "submit") == "pantheon.cmd.default.task.submit"
    assert s.aggregate("acme", "task", "X1") == "pantheon.ev.acme.task.X1"
    assert s.events("acme") == "pantheon.ev.acme.>"
    assert s.work("acme", "w-1") == "pantheon.work.acme.w-1"
    assert s.state_key("acme", "task", "X1") == "acme.task.X1"
    assert s.parse_aggregate("pantheon.ev.acme.task.X1") == ("acme", "task", "X1")
    parsed = s.parse_command("pantheon.cmd.acme.task.cancel")
    assert parsed is not None and (parsed.tenant, parsed.aggregate, parsed.verb) == (
        "acme",
        "task",
        "cancel",
    )
    assert s.parse_command("pantheon.cmd.acme.task") is None


@pytest.mark.parametrize("bad", ["a.b", "a*", ">", "a b", "", "x" * 129])
def test_unsafe_tokens_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="subject-safe"):
        Subjects().aggregate(bad, "task", "X")


# -- errors -----------------------------------------------------------------------------------


def test_error_replies_round_trip_to_the_same_leaf() -> None:
    original = OverloadedError("slow down", details={"pending": 10}, retry_after=2.5)
    back = error_from_reply(original.to_reply()["error"])
    assert type(back) is OverloadedError
    assert (back.message, back.details, back.retry_after) == ("slow down", {"pending": 10}, 2.5)
    assert {c.value for c in ErrorCode} >= {"invalid", "not_found", "conflict", "overloaded"}


# -- codec -------------------------------------------------------------------------------------


def test_codec_round_trips_a_typed_event() -> None:
    cmd = SubmitTask.model_validate({"name": "n", "executor": SHELL, "labels": {"a": "b"}})
    event = wrap(decide(None, cmd, ctx()).events[0], "01J00000000000000000000000")
    raw = encode(event)
    back = decode(raw)
    assert back == event
    assert isinstance(back.data, TaskSubmitted)
    assert b'"occurred_at":"2026-11-24T12:00:00Z"' in raw


def test_decoding_an_unknown_type_names_it_and_the_sequence() -> None:
    raw = encode(wrap(TaskCancelled(previous_status="pending"), "X")).replace(
        b"TaskCancelled", b"TaskExploded"
    )
    with pytest.raises(UnknownEventTypeError, match=r"TaskExploded.*sequence 42"):
        decode(raw, 42)


def test_old_schema_versions_are_upcast_on_read() -> None:
    class Renamed(EventData, type_name="TestRenamedV2", version=2, aggregate="task"):
        title: str

    @REGISTRY.upcaster("TestRenamedV2", from_version=1)
    def _v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
        return {"title": data["name"]}

    v2 = wrap(Renamed(title="x"), "X")
    stored_v1 = (
        encode(v2)
        .replace(b'"schema_version":2', b'"schema_version":1')
        .replace(b'"title":"x"', b'"name":"x"')
    )
    back = decode(stored_v1)
    assert back.schema_version == 2 and back.data == Renamed(title="x")


# -- the task aggregate --------------------------------------------------------------------------


def test_submit_decides_one_submitted_event_with_numeric_priority() -> None:
    cmd = SubmitTask.model_validate({"name": "n", "executor": SHELL, "priority": "urgent"})
    decision = decide(None, cmd, ctx())
    assert len(decision.events) == 1
    assert isinstance(decision.events[0], TaskSubmitted)
    assert decision.events[0].priority == PRIORITY_LEVELS["urgent"]
    assert decision.result == {"task_id": ctx().aggregate_id, "status": "pending"}


def test_cancel_of_pending_task_decides_cancelled_then_is_a_no_op() -> None:
    tid = "01J00000000000000000000000"
    submitted = wrap(decide(None, SubmitTask(name="n", executor=SHELL), ctx(tid)).events[0], tid)
    state = TASK.fold([submitted])
    assert state is not None and state.status == TaskStatus.PENDING

    first = decide(state, CancelTask(task_id=tid, reason="no"), ctx(tid))
    assert [type(e) for e in first.events] == [TaskCancelled]
    state = TASK.evolve(state, wrap(first.events[0], tid))
    assert state.status == TaskStatus.CANCELLED and state.version == 2

    again = decide(state, CancelTask(task_id=tid), ctx(tid))
    assert again.events == [] and again.result["changed"] is False


def test_cancel_of_unknown_task_is_not_found() -> None:
    with pytest.raises(NotFoundError):
        decide(None, CancelTask(task_id="01J00000000000000000000000"), ctx())


def test_submit_onto_an_existing_id_is_a_conflict() -> None:
    tid = "01J00000000000000000000000"
    state = TASK.fold(
        [wrap(decide(None, SubmitTask(name="n", executor=SHELL), ctx(tid)).events[0], tid)]
    )
    with pytest.raises(ConflictError):
        decide(state, SubmitTask(name="n", executor=SHELL), ctx(tid))


@pytest.mark.parametrize(
    "body",
    [
        {"name": "", "executor": SHELL},
        {"name": "n", "executor": {"kind": "shell", "argv": []}},
        {"name": "n", "executor": {"kind": "python", "target": "not a target"}},
        {"name": "n", "executor": {"kind": "teleport"}},
        {"name": "n", "executor": SHELL, "priority": "whenever"},
        {"name": "n", "executor": SHELL, "priority": 1001},
        {"name": "n", "executor": SHELL, "resources": {"cpu": -1}},
        {"name": "n", "executor": SHELL, "resources": {"custom": {"a.b": 1}}},
        {"name": "n", "executor": SHELL, "surprise": True},
    ],
)
def test_invalid_submit_bodies_do_not_validate(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        SubmitTask.model_validate(body)


def test_priority_names_and_numbers_share_one_scale() -> None:
    assert priority_name(400) == "urgent" and priority_name(250) == "medium"
    assert priority_name(0) == "low"
    cmd = SubmitTask.model_validate({"name": "n", "executor": SHELL, "priority": 350})
    assert cmd.priority == 350
