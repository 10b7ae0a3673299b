"""The invariant checker of `pantheon verify`: a pure fold, tested without a server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from pantheon_es import ids
from pantheon_es.events import EventData, EventRecord, decode_record, encode, make_event
from pantheon_es.mailbox import MailboxState, MessagePriority, MessagesDelivered, MessageSent
from pantheon_es.mailbox import evolve as mailbox_evolve
from tools.invariants import InvariantChecker

T0 = datetime(2026, 11, 24, 8, 0, tzinfo=UTC)
TASK, OTHER = "01JTASK0000000000000000001", "01JTASK0000000000000000002"


def at(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


class History:
    """Hand-written records, numbered like a stream."""

    def __init__(self) -> None:
        self.records: list[EventRecord] = []

    def add(
        self, type_: str, aggregate: str, aggregate_id: str, data: dict[str, Any], t: float = 0.0
    ) -> EventRecord:
        seq = len(self.records) + 1
        record = EventRecord(seq, f"ev{seq}", type_, 1, "default", aggregate, aggregate_id,
                             at(t), "test", "corr", None, data)  # fmt: skip
        self.records.append(record)
        return record

    def task(self, type_: str, data: dict[str, Any], t: float = 0.0, task: str = TASK) -> int:
        return self.add(type_, "task", task, data, t).seq

    def submit(
        self, task: str = TASK, cpu: float = 1.0, depends_on: list[str] | None = None
    ) -> None:
        resources = {"cpu": cpu, "memory_mb": 0, "gpu": 0, "custom": {}}
        self.task("TaskSubmitted", {"resources": resources, "depends_on": depends_on or []},
                  task=task)  # fmt: skip

    def grant(self, lease: str, t: float = 0.0, task: str = TASK, worker: str = "w1") -> int:
        data = {"lease_id": lease, "worker_id": worker, "attempt": 1, "fencing_token": 1,
                "expires_at": at(t + 10), "ttl": 10.0}  # fmt: skip
        return self.task("LeaseGranted", data, t, task)

    def register(self, worker: str = "w1", cpu: float = 2.0, slots: int = 4) -> None:
        capacity = {"cpu": cpu, "memory_mb": 1024, "gpu": 0, "custom": {}}
        self.add("WorkerRegistered", "worker", worker, {"capacity": capacity, "slots": slots})

    def check(self) -> InvariantChecker:
        checker = InvariantChecker()
        checker.feed(self.records)
        return checker


def only(checker: InvariantChecker) -> tuple[str, int]:
    assert len(checker.violations) == 1, checker.violations
    v = checker.violations[0]
    return v.invariant, v.seq


def test_a_clean_life_of_a_task_breaks_nothing() -> None:
    h = History()
    h.register()
    h.submit()
    h.grant("L1", t=1)
    h.task("TaskStarted", {"lease_id": "L1", "started_at": at(2)}, t=2)
    h.task("LeaseRenewed", {"lease_id": "L1", "expires_at": at(19), "activity": True}, t=9)
    h.task("TaskProgressed", {"lease_id": "L1"}, t=15)  # after the first expiry, renewed
    h.task("LeaseExpired", {"lease_id": "L1", "attempt": 1, "reason": "not renewed"}, t=20)
    h.grant("L2", t=21)
    h.task("TaskCompleted", {"lease_id": "L2"}, t=22)
    checker = h.check()
    assert checker.violations == []
    assert checker.events == 9 and set(checker.counts().values()) == {0}


def test_second_grant_while_a_lease_is_live_is_named() -> None:
    h = History()
    h.submit()
    h.grant("L1")
    forged = h.grant("L2", t=1)
    assert only(h.check()) == ("single_live_lease", forged)
    assert "L1" in h.check().violations[0].message


def test_completion_after_expiry_is_a_stale_report() -> None:
    h = History()
    h.submit()
    h.grant("L1")
    h.task("LeaseExpired", {"lease_id": "L1", "attempt": 1, "reason": "not renewed"}, t=11)
    forged = h.task("TaskCompleted", {"lease_id": "L1"}, t=12)
    checker = h.check()
    assert only(checker) == ("stale_report", forged)
    assert checker.violations[0].event_id == f"ev{forged}"
    assert checker.violations[0].type == "TaskCompleted"


def test_report_after_the_lease_ran_out_unrenewed_is_stale() -> None:
    h = History()
    h.submit()
    h.grant("L1")  # expires at t=10
    late = h.task("LeaseRenewed", {"lease_id": "L1", "expires_at": at(25), "activity": False},
                  t=10.5)  # fmt: skip
    assert only(h.check()) == ("stale_report", late)


def test_scheduler_start_to_close_retry_is_not_a_report() -> None:
    h = History()
    h.submit()
    h.grant("L1")
    h.task("RetryScheduled", {"lease_id": "L1", "error": {"type": "StartToCloseTimeout"}}, t=11)
    assert h.check().violations == []


def test_worker_over_committed_by_cpu_or_slots_is_named() -> None:
    h = History()
    h.register("w1", cpu=2.0, slots=4)
    h.submit(TASK, cpu=1.5)
    h.submit(OTHER, cpu=1.0)
    h.grant("L1", task=TASK)
    over = h.grant("L2", task=OTHER)
    checker = h.check()
    assert only(checker) == ("worker_capacity", over)
    assert "cpu 2.5 > 2" in checker.violations[0].message

    h = History()
    h.register("w1", cpu=8.0, slots=1)
    h.submit(TASK)
    h.submit(OTHER)
    h.grant("L1", task=TASK)
    h.task("TaskCompleted", {"lease_id": "L1"}, t=1)  # frees the slot
    h.grant("L2", task=OTHER, t=2)
    assert h.check().violations == []
    third = h.grant("L3", task=TASK, t=3)  # TASK is completed, but the slot count is the point
    assert ("worker_capacity", third) in [(v.invariant, v.seq) for v in h.check().violations]


def test_lost_worker_frees_its_capacity() -> None:
    h = History()
    h.register("w1", cpu=1.0, slots=1)
    h.submit(TASK)
    h.submit(OTHER)
    h.grant("L1", task=TASK)
    h.add("WorkerLost", "worker", "w1", {"incarnation": "i1"})
    h.register("w1", cpu=1.0, slots=1)
    h.grant("L2", task=OTHER)
    assert h.check().violations == []


def test_second_terminal_event_is_named_unless_redriven_between() -> None:
    h = History()
    h.submit()
    h.grant("L1")
    h.task("TaskFailed", {"lease_id": "L1", "error": {"type": "E"}}, t=1)
    h.task("TaskRedriven", {"previous_status": "failed", "reason": "r"}, t=2)
    h.grant("L2", t=3)
    h.task("TaskCompleted", {"lease_id": "L2"}, t=4)
    assert h.check().violations == []
    again = h.task("TaskCancelled", {"previous_status": "completed"}, t=5)
    assert only(h.check()) == ("one_terminal_event", again)


def test_dependent_leased_before_its_dependency_completed_is_named() -> None:
    h = History()
    h.submit(TASK)
    h.submit(OTHER, depends_on=[TASK])
    early = h.grant("L2", task=OTHER)
    assert only(h.check()) == ("dependency_order", early)

    h = History()
    h.submit(TASK)
    h.submit(OTHER, depends_on=[TASK])
    h.grant("L1", task=TASK)
    h.task("TaskCompleted", {"lease_id": "L1"}, t=1, task=TASK)
    h.grant("L2", task=OTHER, t=2)
    assert h.check().violations == []


def send(h: History, message_id: str, priority: str) -> None:
    h.add("MessageSent", "mailbox", TASK, {"message_id": message_id, "priority": priority})


def test_delivery_out_of_priority_or_fifo_order_is_named() -> None:
    h = History()
    send(h, "m1", "low")
    send(h, "m2", "urgent")
    send(h, "m3", "urgent")
    h.add("MessagesDelivered", "mailbox", TASK, {"message_ids": ["m2", "m3"]})
    h.add("MessagesDelivered", "mailbox", TASK, {"message_ids": ["m1"]})
    assert h.check().violations == []

    h = History()
    send(h, "m1", "low")
    send(h, "m2", "urgent")
    wrong = h.add("MessagesDelivered", "mailbox", TASK, {"message_ids": ["m1"]}).seq
    checker = h.check()
    assert only(checker) == ("message_order", wrong)
    assert "m2 (urgent" in checker.violations[0].message

    h = History()
    send(h, "m1", "high")
    send(h, "m2", "high")
    swapped = h.add("MessagesDelivered", "mailbox", TASK, {"message_ids": ["m2", "m1"]}).seq
    assert only(h.check()) == ("message_order", swapped)


# -- property: the real mailbox domain never breaks the order the checker holds it to --------------

Op = tuple[str, Any]
ops = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.sampled_from(list(MessagePriority))),
        st.tuples(st.just("receive"), st.integers(1, 4)),
    ),
    max_size=40,
)


def _event(data: EventData) -> Any:
    return make_event(
        data, event_id=ids.new_id(), tenant="default", aggregate_id=TASK, occurred_at=T0,
        actor="test", correlation_id="c", causation_id=None,
    )  # fmt: skip


def _mailbox_history(script: list[Op]) -> list[EventRecord]:
    state = MailboxState(TASK, {})
    records: list[EventRecord] = []
    for kind, arg in script:
        if kind == "send":
            data: EventData = MessageSent(message_id=ids.new_id(), sender="s", priority=arg,
                                          type="update", body="b")  # fmt: skip
        else:
            taken = state.pending()[:arg]
            if not taken:
                continue
            data = MessagesDelivered(message_ids=[m.message_id for m in taken])
        event = _event(data)
        records.append(decode_record(encode(event), len(records) + 1))
        state = mailbox_evolve(state, event)
    return records


@settings(max_examples=60, deadline=None)
@given(ops)
def test_deliveries_the_mailbox_decides_are_always_in_order(script: list[Op]) -> None:
    checker = InvariantChecker()
    checker.feed(_mailbox_history(script))
    assert checker.violations == []


@settings(max_examples=60, deadline=None)
@given(ops)
def test_a_delivery_reordered_across_priorities_is_caught(script: list[Op]) -> None:
    tail: list[Op] = [("send", MessagePriority.LOW), ("send", MessagePriority.URGENT),
                      ("receive", 100)]  # fmt: skip
    records = _mailbox_history(script + tail)
    last = records[-1]
    assert last.type == "MessagesDelivered" and len(last.data["message_ids"]) >= 2
    records[-1] = last._replace(
        data={**last.data, "message_ids": list(reversed(last.data["message_ids"]))}
    )
    checker = InvariantChecker()
    checker.feed(records)
    assert [(v.invariant, v.seq) for v in checker.violations] == [("message_order", last.seq)]
