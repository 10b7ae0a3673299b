"""Leases, fencing, timeouts, mailboxes and workers: pure decide/evolve, no server."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pantheon_es.domain import AggregateType, DecideContext
from pantheon_es.errors import ConflictError, NotFoundError, StaleLeaseError
from pantheon_es.events import EventData, make_event
from pantheon_es.mailbox import MAILBOX, AckMessages, ReceiveMessages, SendMessage
from pantheon_es.tasks import (
    TASK,
    ArchiveTask,
    CancelTask,
    CompleteTask,
    ExpireLease,
    FailTask,
    GrantLease,
    Heartbeat,
    ReleaseTask,
    StartTask,
    SubmitTask,
    TaskState,
    TaskStatus,
    TimeOutTask,
)
from pantheon_es.workers import WORKER, Capacity, LoseWorker, RegisterWorker, WorkerHeartbeat

T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
TID = "01J00000000000000000000000"
SHELL = {"kind": "shell", "argv": ["true"]}
_ids = itertools.count()


class Aggregate:
    """Drives one aggregate through decide/evolve like the service does."""

    def __init__(self, kind: AggregateType[Any], aggregate_id: str = TID) -> None:
        self.kind = kind
        self.aggregate_id = aggregate_id
        self.state: Any = None
        self.now = T0
        self.related: dict[tuple[str, str], Any] = {}
        self.events: list[EventData] = []

    def do(self, command: Any, at: float = 0.0) -> dict[str, Any]:
        self.now = T0 + timedelta(seconds=at)
        ctx = DecideContext(
            "default",
            self.aggregate_id,
            self.now,
            self.related,
            new_id=lambda: f"M{next(_ids):025d}",
        )
        decision = self.kind.decide(self.state, command, ctx)
        for data in decision.events:
            event = make_event(
                data,
                event_id=f"E{next(_ids):025d}",
                tenant="default",
                aggregate_id=self.aggregate_id,
                occurred_at=self.now,
                actor="test",
                correlation_id="c",
                causation_id=None,
            )
            self.state = self.kind.evolve(self.state, event)
            self.events.append(data)
        return dict(decision.result)

    @property
    def types(self) -> list[str]:
        return [e.event_type for e in self.events]


def leased_task(ttl: float = 30, max_attempts: int = 3) -> Aggregate:
    task = Aggregate(TASK)
    task.do(SubmitTask(name="t", executor=SHELL, task_id=TID, max_attempts=max_attempts))
    task.do(GrantLease(task_id=TID, lease_id="L1", worker_id="w1", ttl=ttl))
    return task


def report(kind: type[Any], lease: str = "L1", token: int = 1, **kw: Any) -> Any:
    return kind(task_id=TID, lease_id=lease, fencing_token=token, **kw)


# -- leases and fencing ---------------------------------------------------------------------


def test_grant_start_heartbeat_complete_is_the_happy_path() -> None:
    task = leased_task()
    assert task.state.status == TaskStatus.LEASED and task.state.lease.fencing_token == 1
    task.do(report(StartTask), at=1)
    renewed = task.do(report(Heartbeat, activity=True), at=10)
    assert renewed["expires_at"] == (T0 + timedelta(seconds=40)).isoformat()
    task.do(report(CompleteTask, result={"ok": True}), at=20)
    assert task.types == [
        "TaskSubmitted",
        "LeaseGranted",
        "TaskStarted",
        "LeaseRenewed",
        "TaskCompleted",
    ]
    assert task.state.status == TaskStatus.COMPLETED and task.state.lease is None


def test_completion_without_a_reported_start_carries_the_start_in_one_event() -> None:
    task = leased_task()
    started = T0 + timedelta(seconds=2)
    task.do(report(CompleteTask, result=1, started_at=started), at=3)
    assert task.types[-1] == "TaskCompleted" and "TaskStarted" not in task.types
    assert task.events[-1].started_at == started  # type: ignore[attr-defined]
    assert task.state.started_at == started and task.state.status == TaskStatus.COMPLETED


def test_completion_after_a_reported_start_does_not_repeat_it() -> None:
    task = leased_task()
    task.do(report(StartTask), at=1)
    task.do(report(CompleteTask, started_at=T0), at=2)
    assert task.events[-1].started_at is None  # type: ignore[attr-defined]
    assert task.state.started_at == T0 + timedelta(seconds=1)


@pytest.mark.parametrize(
    ("lease", "token"), [("L1", 2), ("L0", 1), ("L0", 7)], ids=["old-token", "other-lease", "both"]
)
def test_report_with_a_stale_lease_or_token_is_refused_and_changes_nothing(
    lease: str, token: int
) -> None:
    task = leased_task()
    before = (task.state, len(task.events))
    for command in (StartTask, Heartbeat, CompleteTask, ReleaseTask):
        with pytest.raises(StaleLeaseError):
            task.do(report(command, lease=lease, token=token))
    with pytest.raises(StaleLeaseError):
        task.do(report(FailTask, lease=lease, token=token, error={"type": "X"}))
    assert (task.state, len(task.events)) == before


def test_report_after_the_lease_expired_is_refused_even_before_the_expiry_event() -> None:
    task = leased_task(ttl=30)
    with pytest.raises(StaleLeaseError, match="expired"):
        task.do(report(Heartbeat), at=30)
    with pytest.raises(StaleLeaseError):
        task.do(report(CompleteTask), at=31)


def test_expired_lease_returns_the_task_to_pending_and_the_next_token_is_higher() -> None:
    task = leased_task(ttl=5)
    assert task.do(ExpireLease(task_id=TID, lease_id="L1"), at=4)["changed"] is False  # not yet
    task.do(ExpireLease(task_id=TID, lease_id="L1"), at=5)
    assert task.state.status == TaskStatus.PENDING and task.state.lease is None
    task.do(GrantLease(task_id=TID, lease_id="L2", worker_id="w2", ttl=5), at=6)
    assert task.state.lease.fencing_token == 2
    with pytest.raises(StaleLeaseError):  # the first worker's late report
        task.do(report(CompleteTask, lease="L1", token=1), at=7)
    task.do(report(CompleteTask, lease="L2", token=2), at=7)
    assert task.types.count("TaskCompleted") == 1


def test_losing_the_last_allowed_lease_fails_the_task() -> None:
    task = leased_task(ttl=1, max_attempts=2)
    task.do(ExpireLease(task_id=TID, lease_id="L1"), at=2)
    task.do(GrantLease(task_id=TID, lease_id="L2", worker_id="w1", ttl=1), at=2)
    task.do(ExpireLease(task_id=TID, lease_id="L2", reason="worker lost"), at=2.5)
    assert task.state.status == TaskStatus.FAILED
    assert task.types[-2:] == ["LeaseExpired", "TaskFailed"]
    assert task.events[-1].error.type == "AttemptsExhausted"  # type: ignore[attr-defined]


def test_released_lease_goes_back_to_pending() -> None:
    task = leased_task()
    assert task.do(report(ReleaseTask, reason="shutdown"), at=1)["status"] == "pending"
    assert task.state.status == TaskStatus.PENDING


def test_grant_of_a_task_that_is_not_pending_is_a_conflict() -> None:
    task = leased_task()
    with pytest.raises(ConflictError):
        task.do(GrantLease(task_id=TID, lease_id="L9", worker_id="w9", ttl=5))


# -- timeouts and cancellation -------------------------------------------------------------


def test_inactivity_timeout_fires_only_after_the_latest_activity() -> None:
    task = leased_task(ttl=600)
    task.do(report(StartTask), at=0)
    task.do(report(Heartbeat, activity=False), at=50)  # lease renewal without activity
    messages_seen_at = T0 + timedelta(seconds=80)  # the scheduler saw a message at 80 s
    early = task.do(TimeOutTask(task_id=TID, timeout=60, last_activity_at=messages_seen_at), at=100)
    assert early["changed"] is False
    task.do(TimeOutTask(task_id=TID, timeout=60, last_activity_at=messages_seen_at), at=140)
    assert task.state.status == TaskStatus.TIMED_OUT
    assert task.events[-1].last_activity_at == messages_seen_at  # type: ignore[attr-defined]


def test_cancel_of_a_running_task_names_its_lease_and_twice_is_a_no_op() -> None:
    task = leased_task()
    task.do(report(StartTask))
    task.do(CancelTask(task_id=TID, reason="stop"))
    assert task.events[-1].lease_id == "L1"  # type: ignore[attr-defined]
    assert task.do(CancelTask(task_id=TID))["changed"] is False
    with pytest.raises(StaleLeaseError):
        task.do(report(CompleteTask))


def test_only_finished_tasks_are_archived_and_then_they_are_gone() -> None:
    task = leased_task()
    with pytest.raises(ConflictError):
        task.do(ArchiveTask(task_id=TID))
    task.do(report(CompleteTask))
    task.do(ArchiveTask(task_id=TID))
    with pytest.raises(NotFoundError):
        task.do(ArchiveTask(task_id=TID))


# -- mailboxes -----------------------------------------------------------------------------------


def _running_recipient() -> TaskState:
    task = leased_task()
    task.do(report(StartTask))
    state: TaskState = task.state
    return state


@given(st.lists(st.sampled_from(["low", "medium", "high", "urgent"]), min_size=1, max_size=30))
def test_messages_are_delivered_highest_priority_first_fifo_within_a_priority(
    priorities: list[str],
) -> None:
    box = Aggregate(MAILBOX)
    box.related = {("task", TID): _running_recipient()}
    for i, priority in enumerate(priorities):
        box.do(SendMessage(to=TID, body=f"m{i}", priority=priority, sender="s"))
    received: list[dict[str, Any]] = []
    while True:
        got = box.do(ReceiveMessages(agent_id=TID, max=3))["messages"]
        if not got:
            break
        received += got
    rank = {"low": 0, "medium": 1, "high": 2, "urgent": 3}
    expected = sorted(range(len(priorities)), key=lambda i: (-rank[priorities[i]], i))
    assert [m["body"] for m in received] == [f"m{i}" for i in expected]
    assert box.types.count("MessagesDelivered") == -(-len(priorities) // 3)  # each once


def test_message_to_an_unknown_or_finished_agent_is_a_typed_error() -> None:
    box = Aggregate(MAILBOX)
    with pytest.raises(NotFoundError):
        box.do(SendMessage(to=TID, body="hi"))
    done = leased_task()
    done.do(report(CompleteTask))
    box.related = {("task", TID): done.state}
    with pytest.raises(ConflictError, match="completed"):
        box.do(SendMessage(to=TID, body="hi"))
    assert box.events == []


def test_read_is_recorded_once_per_delivered_message() -> None:
    box = Aggregate(MAILBOX)
    box.related = {("task", TID): _running_recipient()}
    sent = box.do(SendMessage(to=TID, body="x"))["message_id"]
    with pytest.raises(NotFoundError):
        box.do(AckMessages(agent_id=TID, message_ids=["nope"]))
    assert box.do(AckMessages(agent_id=TID, message_ids=[sent]))["read"] == []  # not delivered yet
    box.do(ReceiveMessages(agent_id=TID))
    assert box.do(AckMessages(agent_id=TID, message_ids=[sent]))["read"] == [sent]
    assert box.do(AckMessages(agent_id=TID, message_ids=[sent]))["read"] == []
    assert box.types == ["MessageSent", "MessagesDelivered", "MessagesRead"]


# -- workers --------------------------------------------------------------------------------------


def test_worker_is_lost_only_after_its_heartbeats_stop() -> None:
    worker = Aggregate(WORKER, "w1")
    worker.do(
        RegisterWorker(
            worker_id="w1", incarnation="i1", capacity=Capacity(cpu=2, memory_mb=100), ttl=10
        )
    )
    worker.do(WorkerHeartbeat(worker_id="w1", incarnation="i1"), at=5)
    assert worker.do(LoseWorker(worker_id="w1", incarnation="i1"), at=10)["changed"] is False
    worker.do(LoseWorker(worker_id="w1", incarnation="i1"), at=15)
    assert worker.types[-1] == "WorkerLost"
    with pytest.raises(ConflictError, match="register again"):
        worker.do(WorkerHeartbeat(worker_id="w1", incarnation="i1"), at=16)
    worker.do(
        RegisterWorker(worker_id="w1", incarnation="i2", capacity=Capacity(cpu=2, memory_mb=100)),
        at=17,
    )
    assert worker.state.incarnation == "i2" and worker.state.status.value == "active"


def test_scheduler_builds_the_same_state_from_a_submit_record_as_evolve() -> None:
    from pantheon_es.events import decode_record, encode
    from pantheon_es.scheduler import _submitted_state

    task = Aggregate(TASK)
    task.do(
        SubmitTask(
            name="t",
            executor=SHELL,
            task_id=TID,
            resources={"cpu": 0.5, "memory_mb": 64, "custom": {"licence": 1}},
            inactivity_timeout=12,
            max_attempts=5,
        )
    )
    event = make_event(
        task.events[0],
        event_id="E" * 26,
        tenant="default",
        aggregate_id=TID,
        occurred_at=T0,
        actor="t",
        correlation_id="c",
        causation_id=None,
    )
    assert _submitted_state(decode_record(encode(event), 1)) == TASK.evolve(None, event)
