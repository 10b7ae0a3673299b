"""The invariants of a Pantheon-ES history, checked by one pure fold over the log.

:class:`InvariantChecker` takes decoded :class:`~pantheon_es.events.EventRecord`
objects in stream order (``feed`` has the signature of a projector sink) and
records a :class:`Violation` for every event that breaks one of
:data:`INVARIANTS`, naming its stream sequence, event id and type. It does no
I/O, so it is tested without a server; ``tools.verify`` streams the log
through it. What each invariant means exactly is written in docs/operations.md
("Replay and verify") and docs/decisions.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pantheon_es.events import EventRecord

#: name -> what it promises (the names appear in reports and in ``--json``).
INVARIANTS: dict[str, str] = {
    "single_live_lease": "no two live leases on one task",
    "worker_capacity": "no worker over-committed at any moment (slots and resources)",
    "stale_report": "no report accepted from an ended or expired lease (fencing)",
    "one_terminal_event": "every terminal task has exactly one terminal event",
    "message_order": "messages delivered in priority order per recipient, FIFO within one",
    "dependency_order": "every workflow dependency completed before its dependent started",
}

#: Reports a worker makes under a lease; the service accepts them only from the live,
#: unexpired lease. (RetryScheduled also comes from a failure report.)
REPORTS = frozenset(
    {
        "TaskStarted",
        "LeaseRenewed",
        "TaskProgressed",
        "TaskCompleted",
        "TaskFailed",
        "LeaseReleased",
        "RetryScheduled",
    }
)
TERMINAL_EVENTS = {
    "TaskCompleted": "completed",
    "TaskFailed": "failed",
    "TaskTimedOut": "timed_out",
    "TaskCancelled": "cancelled",
    "TaskSkipped": "skipped",
}
#: Events after which a task holds no lease.
LEASE_ENDS = frozenset({*TERMINAL_EVENTS, "LeaseExpired", "LeaseReleased", "RetryScheduled"})
MESSAGE_RANK = {"low": 0, "medium": 1, "high": 2, "urgent": 3}
#: The scheduler's own retry of an attempt that ran too long: not a worker's report,
#: decided without looking at the lease's expiry.
SCHEDULER_RETRY_ERRORS = frozenset({"StartToCloseTimeout"})
EPS = 1e-9

TaskKey = tuple[str, str]  # (tenant, task id)
WorkerKey = tuple[str, str]  # (tenant, worker id)


@dataclass(frozen=True, slots=True)
class Violation:
    """One event that breaks one invariant."""

    invariant: str
    seq: int
    event_id: str
    type: str
    tenant: str
    aggregate_id: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "invariant": self.invariant,
            "seq": self.seq,
            "event_id": self.event_id,
            "type": self.type,
            "tenant": self.tenant,
            "aggregate_id": self.aggregate_id,
            "message": self.message,
        }

    def __str__(self) -> str:
        return (
            f"seq {self.seq} {self.type} {self.event_id} "
            f"({self.tenant}/{self.aggregate_id}): [{self.invariant}] {self.message}"
        )


@dataclass(slots=True)
class _Lease:
    lease_id: str
    worker: WorkerKey
    expires_at: datetime
    granted_seq: int


@dataclass(slots=True)
class _Task:
    status: str = "unknown"  # before its TaskSubmitted (a forged or truncated log)
    need: dict[str, float] = field(default_factory=dict)
    depends_on: tuple[str, ...] = ()
    lease: _Lease | None = None
    terminal_seq: int = 0
    terminal_type: str = ""


@dataclass(slots=True)
class _Worker:
    capacity: dict[str, float]
    slots: int
    #: task -> resources of its live lease on this worker
    held: dict[TaskKey, dict[str, float]] = field(default_factory=dict)
    #: the sum of ``held`` (kept as leases come and go: a check costs O(resources))
    used: dict[str, float] = field(default_factory=dict)

    def hold(self, task: TaskKey, need: dict[str, float]) -> None:
        self.drop(task)
        self.held[task] = need
        for name, amount in need.items():
            self.used[name] = self.used.get(name, 0.0) + amount

    def drop(self, task: TaskKey) -> None:
        need = self.held.pop(task, None)
        for name, amount in (need or {}).items():
            self.used[name] -= amount


@dataclass(slots=True)
class _Message:
    rank: int
    order: int
    priority: str
    delivered: bool = False


@dataclass(slots=True)
class _Mailbox:
    messages: dict[str, _Message] = field(default_factory=dict)
    sent: int = 0


def resource_vector(resources: dict[str, Any] | None, default_cpu: float) -> dict[str, float]:
    """A flat {name: amount} of a Resources/Capacity JSON object (custom as ``custom:NAME``)."""
    r = resources or {}
    vec = {
        "cpu": float(r.get("cpu", default_cpu)),
        "memory_mb": float(r.get("memory_mb", 0)),
        "gpu": float(r.get("gpu", 0)),
    }
    for name, amount in (r.get("custom") or {}).items():
        vec[f"custom:{name}"] = float(amount)
    return vec


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text)


class InvariantChecker:
    """Folds a history, event by event, recording every violation."""

    def __init__(self) -> None:
        self.violations: list[Violation] = []
        self.events = 0
        self.last_seq = 0
        self._tasks: dict[TaskKey, _Task] = {}
        self._workers: dict[WorkerKey, _Worker] = {}
        self._mailboxes: dict[TaskKey, _Mailbox] = {}
        self._completed: set[TaskKey] = set()
        #: dependencies a WorkflowCreated recorded for a task id (its TaskSubmitted repeats them)
        self._workflow_deps: dict[TaskKey, tuple[str, ...]] = {}

    # -- feeding ---------------------------------------------------------------------------------
    def feed(self, events: Iterable[EventRecord]) -> None:
        """Apply events in stream order (usable as a projector sink)."""
        for event in events:
            self.apply(event)

    def apply(self, ev: EventRecord) -> None:
        self.events += 1
        self.last_seq = max(self.last_seq, ev.seq)
        if ev.aggregate == "task":
            self._task_event(ev)
        elif ev.aggregate == "worker":
            self._worker_event(ev)
        elif ev.aggregate == "mailbox":
            self._mailbox_event(ev)
        elif ev.type == "WorkflowCreated":
            for node in ev.data.get("nodes", []):
                key = (ev.tenant, node["task_id"])
                self._workflow_deps[key] = tuple(node.get("depends_on") or ())

    def _violate(self, invariant: str, ev: EventRecord, message: str) -> None:
        self.violations.append(
            Violation(invariant, ev.seq, ev.event_id, ev.type, ev.tenant, ev.aggregate_id, message)
        )

    # -- tasks -----------------------------------------------------------------------------------
    def _task_event(self, ev: EventRecord) -> None:
        key = (ev.tenant, ev.aggregate_id)
        data = ev.data
        if ev.type == "TaskSubmitted":
            deps = tuple(data.get("depends_on") or ()) or self._workflow_deps.get(key, ())
            self._tasks[key] = _Task("pending", resource_vector(data.get("resources"), 1.0), deps)
            return
        task = self._tasks.setdefault(key, _Task())
        if ev.type in REPORTS and data.get("lease_id") is not None:
            self._check_report(ev, task)
        if ev.type == "LeaseGranted":
            self._grant(ev, key, task)
        elif ev.type == "TaskStarted":
            task.status = "running"
        elif ev.type == "LeaseRenewed":
            if task.lease is not None and task.lease.lease_id == data["lease_id"]:
                task.lease.expires_at = _time(data["expires_at"])
        elif ev.type == "TaskRedriven":
            task.status, task.terminal_seq, task.terminal_type = "pending", 0, ""
        if ev.type in TERMINAL_EVENTS:
            self._terminal(ev, key, task)
        elif ev.type in LEASE_ENDS:
            # Whatever lease it names, the task's state drops its lease (tasks.evolve does).
            self._end_lease(key, task)
            task.status = "pending"

    def _check_report(self, ev: EventRecord, task: _Task) -> None:
        lease_id = ev.data["lease_id"]
        lease = task.lease
        if lease is None or lease.lease_id != lease_id:
            live = f"live lease {lease.lease_id}" if lease else "no live lease"
            self._violate(
                "stale_report",
                ev,
                f"report under lease {lease_id}, which is not the live lease "
                f"(task {task.status}, {live})",
            )
            return
        error_type = (ev.data.get("error") or {}).get("type")
        if ev.type == "RetryScheduled" and error_type in SCHEDULER_RETRY_ERRORS:
            return
        at = _time(ev.occurred_at)
        if at >= lease.expires_at:
            self._violate(
                "stale_report",
                ev,
                f"report under lease {lease_id} at {ev.occurred_at}, after it expired at "
                f"{lease.expires_at.isoformat()}",
            )

    def _grant(self, ev: EventRecord, key: TaskKey, task: _Task) -> None:
        data = ev.data
        if task.lease is not None:
            self._violate(
                "single_live_lease",
                ev,
                f"lease {data['lease_id']} granted while lease {task.lease.lease_id} "
                f"(granted at seq {task.lease.granted_seq}) is still live",
            )
            self._end_lease(key, task)
        unmet = [d for d in task.depends_on if (ev.tenant, d) not in self._completed]
        if unmet:
            self._violate(
                "dependency_order",
                ev,
                f"leased before its dependencies completed: {', '.join(unmet)}",
            )
        worker_key = (data.get("worker_tenant") or ev.tenant, data["worker_id"])
        task.lease = _Lease(data["lease_id"], worker_key, _time(data["expires_at"]), ev.seq)
        task.status = "leased"
        worker = self._workers.get(worker_key)
        if worker is None:
            return  # never registered in this log: no capacity to hold it against
        worker.hold(key, task.need)
        self._check_capacity(ev, worker_key, worker)

    def _check_capacity(self, ev: EventRecord, worker_key: WorkerKey, worker: _Worker) -> None:
        if len(worker.held) > worker.slots:
            self._violate(
                "worker_capacity",
                ev,
                f"worker {worker_key[1]} holds {len(worker.held)} live leases, "
                f"{worker.slots} slots",
            )
        over = [
            f"{name} {amount:g} > {worker.capacity.get(name, 0.0):g}"
            for name, amount in sorted(worker.used.items())
            if amount > worker.capacity.get(name, 0.0) + EPS
        ]
        if over:
            self._violate(
                "worker_capacity",
                ev,
                f"worker {worker_key[1]} over-committed by its live leases: {', '.join(over)}",
            )

    def _end_lease(self, key: TaskKey, task: _Task) -> None:
        if task.lease is not None:
            worker = self._workers.get(task.lease.worker)
            if worker is not None:
                worker.drop(key)
        task.lease = None

    def _terminal(self, ev: EventRecord, key: TaskKey, task: _Task) -> None:
        if task.terminal_seq:
            self._violate(
                "one_terminal_event",
                ev,
                f"task already {task.status} by {task.terminal_type} at seq {task.terminal_seq}",
            )
        self._end_lease(key, task)
        task.status = TERMINAL_EVENTS[ev.type]
        task.terminal_seq, task.terminal_type = ev.seq, ev.type
        if ev.type == "TaskCompleted":
            self._completed.add(key)

    # -- workers ---------------------------------------------------------------------------------
    def _worker_event(self, ev: EventRecord) -> None:
        key = (ev.tenant, ev.aggregate_id)
        if ev.type == "WorkerRegistered":
            capacity = resource_vector(ev.data.get("capacity"), 0.0)
            old = self._workers.get(key)
            # A re-registration keeps what the worker runs, as the scheduler does.
            worker = _Worker(capacity, int(ev.data.get("slots", 1)))
            if old is not None:
                worker.held, worker.used = old.held, old.used
            self._workers[key] = worker
            if worker.held:
                self._check_capacity(ev, key, worker)
        elif ev.type in ("WorkerLost", "WorkerStopped"):
            # Its leases are doomed (they expire next); the scheduler frees the worker now.
            self._workers.pop(key, None)

    # -- mailboxes -------------------------------------------------------------------------------
    def _mailbox_event(self, ev: EventRecord) -> None:
        box = self._mailboxes.setdefault((ev.tenant, ev.aggregate_id), _Mailbox())
        if ev.type == "MessageSent":
            priority = str(ev.data.get("priority", "medium"))
            box.messages[ev.data["message_id"]] = _Message(
                MESSAGE_RANK.get(priority, 1), box.sent, priority
            )
            box.sent += 1
        elif ev.type == "MessagesDelivered":
            self._delivered(ev, box, list(ev.data.get("message_ids") or ()))

    def _delivered(self, ev: EventRecord, box: _Mailbox, ids: list[str]) -> None:
        waiting = sorted(
            (m for m in box.messages.items() if not m[1].delivered),
            key=lambda item: (-item[1].rank, item[1].order),
        )
        expected = [message_id for message_id, _ in waiting[: len(ids)]]
        if ids != expected:
            problem = self._order_problem(box, ids, expected)
            self._violate("message_order", ev, problem)
        for message_id in ids:
            message = box.messages.get(message_id)
            if message is not None:
                message.delivered = True

    @staticmethod
    def _order_problem(box: _Mailbox, ids: list[str], expected: list[str]) -> str:
        for i, message_id in enumerate(ids):
            message = box.messages.get(message_id)
            if message is None:
                return f"delivered {message_id}, never sent to this mailbox"
            if message.delivered or message_id in ids[:i]:
                return f"delivered {message_id} a second time"
            if i >= len(expected):
                return f"delivered {len(ids)} messages, {len(expected)} were pending"
            if message_id != expected[i]:
                ahead = box.messages[expected[i]]
                return (
                    f"delivered {message_id} ({message.priority}, #{message.order}) while "
                    f"{expected[i]} ({ahead.priority}, #{ahead.order}) was due first"
                )
        return "delivery order differs from priority order"

    # -- the report --------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """Violations per invariant (every invariant named, zero included)."""
        out = dict.fromkeys(INVARIANTS, 0)
        for v in self.violations:
            out[v.invariant] += 1
        return out
