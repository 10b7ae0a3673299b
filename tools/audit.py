"""``pantheon audit ID``: everything the log says about one task, agent, workflow or worker.

Read-only. The events come from the log itself, one aggregate at a time
(:func:`read_aggregate`: a consumer filtered on the aggregate's subject, created
through the API subject that names it, so a NATS user held to one tenant can
audit that tenant's ids); the read models are used only to find related ids (the
recipients of the messages an agent sent). What is read for each kind of id:

* task / agent: the task's events, its mailbox's events (messages received,
  deliveries, reads) and the ``MessageSent`` events of the messages it sent
  (found with the ``mailbox.list`` query by sender, then read from each
  recipient's mailbox);
* workflow: its own events, and everything above for every one of its tasks
  (their ids are in ``WorkflowCreated``);
* worker: its own events, and the events of the leases it held. No read model
  keeps past leases, so this one scans task events from the worker's first
  event on (leases are granted only to a registered worker): those of the
  tenants it serves (server-side filter ``<root>.ev.<tenant>.task.*`` for its
  own tenant and each it registered for), or of every tenant
  (``<root>.ev.*.task.*``) if it ever served ``*``.

The report has four sections: ``event`` (the timeline: stream sequence, time,
type, actor, correlation and causation), ``attempt`` (per task and attempt:
lease, worker, time pending, leased and running, outcome, result or error),
``state`` (every state a task was in and for how long) and ``message`` (sent
and received). Causation ids are the ids of the commands that produced the
events (service.py); an event that names another event of the timeline is
shown as ``Type@seq``; otherwise ``caused_by`` names the other events the same
command produced (``with 12, 13``), and is empty for a command's only event.
"""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from pantheon_es.client import PantheonClient
from pantheon_es.errors import InvalidError, NotFoundError
from pantheon_es.events import Event, decode
from pantheon_es.store import EventStore, StoredEvent
from pantheon_es.subjects import check_token
from tools.events import raw_batches

FORMATS = ("table", "json", "jsonl", "csv")
#: Tasks read at once (each is a few filtered reads and one query).
READERS = 16
TERMINAL = {
    "TaskCompleted": "completed",
    "TaskFailed": "failed",
    "TaskTimedOut": "timed_out",
    "TaskSkipped": "skipped",
    "TaskCancelled": "cancelled",
}
#: Events that end an attempt and put the task back to pending.
BACK_TO_PENDING = {
    "LeaseExpired": "expired",
    "LeaseReleased": "released",
    "RetryScheduled": "failed, retry scheduled",
}
#: Columns of the flat formats (csv, and the keys every jsonl line may carry).
COLUMNS = (
    "section",
    "seq",
    "time",
    "type",
    "aggregate",
    "aggregate_id",
    "task",
    "actor",
    "correlation_id",
    "causation_id",
    "caused_by",
    "attempt",
    "lease_id",
    "worker_id",
    "state",
    "from",
    "to",
    "seconds",
    "granted_at",
    "started_at",
    "ended_at",
    "pending_s",
    "leased_s",
    "running_s",
    "outcome",
    "result",
    "error",
    "direction",
    "message_id",
    "sender",
    "recipient",
    "priority",
    "body",
    "detail",
)


@dataclass(slots=True)
class Attempt:
    task_id: str
    task: str
    attempt: int
    lease_id: str
    worker_id: str
    granted_at: datetime
    pending_since: datetime
    started_at: datetime | None = None
    ended_at: datetime | None = None
    outcome: str | None = None  # None while the attempt is live
    result: Any = None
    error: Any = None

    def row(self) -> dict[str, Any]:
        return {
            "section": "attempt",
            "aggregate": "task",
            "aggregate_id": self.task_id,
            "task": self.task,
            "attempt": self.attempt,
            "lease_id": self.lease_id,
            "worker_id": self.worker_id,
            "granted_at": _iso(self.granted_at),
            "started_at": _iso(self.started_at),
            "ended_at": _iso(self.ended_at),
            "pending_s": _secs(self.pending_since, self.granted_at),
            "leased_s": _secs(self.granted_at, self.started_at or self.ended_at),
            "running_s": _secs(self.started_at, self.ended_at),
            "outcome": self.outcome or "live",
            "result": self.result,
            "error": self.error,
        }


@dataclass(slots=True)
class StateSpan:
    task_id: str
    task: str
    state: str
    attempt: int
    since: datetime
    until: datetime | None = None

    def row(self) -> dict[str, Any]:
        return {
            "section": "state",
            "aggregate": "task",
            "aggregate_id": self.task_id,
            "task": self.task,
            "state": self.state,
            "attempt": self.attempt,
            "from": _iso(self.since),
            "to": _iso(self.until),
            "seconds": _secs(self.since, self.until),
        }


@dataclass(slots=True)
class TaskFold:
    """Attempts and states of one task, folded from its events (pure)."""

    task_id: str
    name: str = ""
    status: str = "unknown"
    attempts: list[Attempt] = field(default_factory=list)
    states: list[StateSpan] = field(default_factory=list)
    result: Any = None
    error: Any = None

    def _enter(self, state: str, at: datetime, attempt: int) -> None:
        if self.states and self.states[-1].until is None:
            self.states[-1].until = max(at, self.states[-1].since)
        self.states.append(StateSpan(self.task_id, self.name, state, attempt, at))
        self.status = state

    def _attempt(self, lease_id: str | None) -> Attempt | None:
        for a in reversed(self.attempts):
            if lease_id is None or a.lease_id == lease_id:
                return a if a.outcome is None else None
        return None

    def apply(self, ev: Event[Any]) -> None:
        d = ev.data
        at = ev.occurred_at
        t = ev.type
        number = self.attempts[-1].attempt if self.attempts else 0
        if t == "TaskSubmitted":
            self.name = d.name
            self._enter("pending", at, 0)
        elif t == "LeaseGranted":
            since = self.states[-1].since if self.states else at
            self.attempts.append(
                Attempt(self.task_id, self.name, d.attempt, d.lease_id, d.worker_id, at, since)
            )
            self._enter("leased", at, d.attempt)
        elif t == "TaskStarted":
            a = self._attempt(d.lease_id)
            if a is not None:
                a.started_at = d.started_at
            self._enter("running", d.started_at, number)
        elif t in BACK_TO_PENDING:
            a = self._attempt(d.lease_id)
            if a is not None:
                a.ended_at, a.outcome = at, BACK_TO_PENDING[t]
                if t == "RetryScheduled":
                    a.error = _json(d.error)
            self._enter("pending", at, number)
        elif t in TERMINAL:
            started = getattr(d, "started_at", None)
            if started is not None and self.status == "leased":
                self._enter("running", started, number)
            a = self._attempt(getattr(d, "lease_id", None))
            if a is not None:
                a.started_at = a.started_at or started
                a.ended_at, a.outcome = at, TERMINAL[t]
                if t == "TaskCompleted":
                    a.result = _json(d.result)
                elif t == "TaskFailed":
                    a.error = _json(d.error)
            if t == "TaskCompleted":
                self.result = _json(d.result)
            elif t == "TaskFailed":
                self.error = _json(d.error)
            self._enter(TERMINAL[t], at, number)
        elif t == "TaskRedriven":
            # Redriven (alone, or with its workflow): the last run's error is its
            # attempt's, not the task's any more; a skipped node has no attempt to keep it.
            self.error = None
            self._enter("pending", at, number)
        elif t == "TaskArchived":
            self._enter("archived", at, number)


def fold_task(task_id: str, events: Iterable[Event[Any]]) -> TaskFold:
    fold = TaskFold(task_id)
    for ev in events:
        fold.apply(ev)
    return fold


@dataclass(slots=True)
class AuditReport:
    """What ``audit`` found; :meth:`rows` flattens it for the flat formats."""

    tenant: str
    kind: str  # task | agent | workflow | worker
    entity_id: str
    events: list[StoredEvent]
    tasks: dict[str, TaskFold]
    messages: list[dict[str, Any]]
    #: where the audit had to scan the log instead of reading aggregates
    scanned: list[str] = field(default_factory=list)

    def event_rows(self) -> list[dict[str, Any]]:
        by_id = {s.event.event_id: s for s in self.events}
        by_command: dict[str, list[int]] = {}
        for s in self.events:
            if s.event.causation_id:
                by_command.setdefault(s.event.causation_id, []).append(s.seq)
        names = {tid: f.name for tid, f in self.tasks.items()}
        rows = []
        for s in self.events:
            ev = s.event
            cause = ev.causation_id
            if cause is None:
                caused_by = ""
            elif cause in by_id:
                caused_by = f"{by_id[cause].event.type}@{by_id[cause].seq}"
            else:
                others = [q for q in by_command.get(cause, []) if q != s.seq]
                caused_by = f"with {', '.join(map(str, others))}" if others else ""
            data = ev.data.model_dump(mode="json")
            rows.append(
                {
                    "section": "event",
                    "seq": s.seq,
                    "time": _iso(ev.occurred_at),
                    "type": ev.type,
                    "aggregate": ev.aggregate,
                    "aggregate_id": ev.aggregate_id,
                    "task": names.get(ev.aggregate_id, ""),
                    "actor": ev.actor,
                    "correlation_id": ev.correlation_id,
                    "causation_id": cause,
                    "caused_by": caused_by,
                    "attempt": data.get("attempt"),
                    "lease_id": data.get("lease_id"),
                    "worker_id": data.get("worker_id"),
                    "detail": data,
                }
            )
        return rows

    def task_rows(self) -> list[dict[str, Any]]:
        return [
            {
                "section": "task",
                "aggregate": "task",
                "aggregate_id": f.task_id,
                "task": f.name,
                "state": f.status,
                "attempt": len(f.attempts),
                "result": f.result,
                "error": f.error,
            }
            for f in self.tasks.values()
        ]

    def rows(self) -> list[dict[str, Any]]:
        """Every row of every section: events, tasks, attempts, states, messages."""
        out = self.event_rows() + self.task_rows()
        for f in self.tasks.values():
            out += [a.row() for a in f.attempts]
        for f in self.tasks.values():
            out += [s.row() for s in f.states]
        out += [{"section": "message", **m} for m in self.messages]
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "kind": self.kind,
            "id": self.entity_id,
            "events": self.event_rows(),
            "tasks": [
                {
                    **{k: v for k, v in t.items() if k != "section"},
                    "attempts": [a.row() for a in self.tasks[t["aggregate_id"]].attempts],
                    "states": [s.row() for s in self.tasks[t["aggregate_id"]].states],
                }
                for t in self.task_rows()
            ],
            "messages": self.messages,
            "scanned": self.scanned,
        }


# -- reading ------------------------------------------------------------------------------------

#: "to the end of the log" for a filtered read (it ends with the subject's last message)
_END = 2**63 - 1


async def read_aggregate(
    store: EventStore, tenant: str, aggregate: str, aggregate_id: str
) -> list[StoredEvent]:
    """Every event of one aggregate instance, oldest first, as
    :meth:`EventStore.read_aggregate` gives them, but read through a consumer filtered on
    the aggregate's subject and created through the API subject that names it
    (:func:`tools.events.raw_batches`): the direct gets of ``read_aggregate`` carry the
    subject in their body, where no NATS permission can see it."""
    subject = store.subjects.aggregate(tenant, aggregate, aggregate_id)
    out: list[StoredEvent] = []
    async for batch, _position in raw_batches(store, 1, _END, subject=subject):
        out += [StoredEvent(raw.seq, subject, decode(raw.data, raw.seq)) for raw in batch]
    return out


class Auditor:
    """Builds an :class:`AuditReport` from the log (and the read models for related ids)."""

    def __init__(
        self, client: PantheonClient, progress: Callable[[str], None] | None = None
    ) -> None:
        self.client = client
        self.tenant = client.tenant
        self.store = EventStore(client.nc, client.subjects)
        self.progress = progress or (lambda _msg: None)

    async def _read(self, aggregate: str, aggregate_id: str) -> list[StoredEvent]:
        return await read_aggregate(self.store, self.tenant, aggregate, aggregate_id)

    async def kind_of(self, entity_id: str) -> str:
        """``task``, ``agent``, ``workflow`` or ``worker``; ``not_found`` if none has events."""
        try:
            check_token("id", entity_id)
        except ValueError as exc:
            raise InvalidError(str(exc)) from None
        subjects = self.client.subjects
        for aggregate in ("task", "workflow", "worker"):
            subject = subjects.aggregate(self.tenant, aggregate, entity_id)
            if await self.store.subject_last_seq(subject):
                if aggregate == "task":
                    first = await self._read("task", entity_id)
                    data = first[0].event.data
                    if (
                        getattr(data, "executor", None) is not None
                        and data.executor.kind == "agent"
                    ):
                        return "agent"
                return aggregate
        raise NotFoundError(
            f"no task, agent, workflow or worker {entity_id!r} in tenant {self.tenant!r}",
            details={"id": entity_id, "tenant": self.tenant},
        )

    async def audit(self, entity_id: str) -> AuditReport:
        kind = await self.kind_of(entity_id)
        report = AuditReport(self.tenant, kind, entity_id, [], {}, [])
        if kind in ("task", "agent"):
            await self._task(report, entity_id)
        elif kind == "workflow":
            own = await self._read("workflow", entity_id)
            report.events += own
            nodes = own[0].event.data.nodes if own else []
            await self._tasks(report, [(self.tenant, n.task_id, None) for n in nodes])
        else:
            await self._worker(report, entity_id)
        report.events.sort(key=lambda s: s.seq)
        report.messages.sort(key=lambda m: int(m["seq"]))
        return report

    async def _tasks(
        self, report: AuditReport, tasks: list[tuple[str, str, set[str] | None]]
    ) -> None:
        """Read several tasks, READERS at a time; ``report.tasks`` keeps the given order."""
        for _tenant, task_id, _leases in tasks:
            report.tasks[task_id] = TaskFold(task_id)  # the slot, filled by _task
        gate = asyncio.Semaphore(READERS)
        done = 0

        async def one(tenant: str, task_id: str, lease_ids: set[str] | None) -> None:
            nonlocal done
            auditor = self if tenant == self.tenant else self._for_tenant(tenant)
            async with gate:
                await auditor._task(report, task_id, lease_ids)
            done += 1
            self.progress(f"read {done}/{len(tasks)} tasks")

        async with asyncio.TaskGroup() as group:
            for task in tasks:
                group.create_task(one(*task))

    def _for_tenant(self, tenant: str) -> Auditor:
        c = self.client
        other = PantheonClient(c.nc, tenant=tenant, subjects=c.subjects, timeout=c.timeout)
        return Auditor(other, self.progress)

    async def _task(
        self, report: AuditReport, task_id: str, lease_ids: set[str] | None = None
    ) -> None:
        history = await self._read("task", task_id)
        fold = fold_task(task_id, (s.event for s in history))
        if lease_ids is not None:  # a worker's audit: only what its leases did
            fold.attempts = [a for a in fold.attempts if a.lease_id in lease_ids]
            history = [s for s in history if getattr(s.event.data, "lease_id", None) in lease_ids]
        report.tasks[task_id] = fold
        report.events += history
        if lease_ids is not None:
            return
        mailbox = await self._read("mailbox", task_id)
        report.events += mailbox
        delivered: dict[str, tuple[str, str | None]] = {}
        for s in mailbox:
            if s.event.type in ("MessagesDelivered", "MessagesRead"):
                read = s.event.type == "MessagesRead" or s.event.data.read
                for mid in s.event.data.message_ids:
                    was = delivered.get(mid, ("", None))
                    at = _iso(s.event.occurred_at) or ""
                    delivered[mid] = (was[0] or at, at if read else was[1])
        for s in mailbox:
            if s.event.type == "MessageSent":
                report.messages.append(
                    _message(
                        s, "received", task_id, fold.name, delivered.get(s.event.data.message_id)
                    )
                )
        # Messages it sent: the read model names the recipients, their mailboxes hold the events.
        recipients: set[str] = set()
        offset = 0
        while True:
            page = await self.client.list_messages(sender=task_id, limit=1000, offset=offset)
            recipients.update(m["recipient"] for m in page["items"])
            if not page["has_more"]:
                break
            offset += len(page["items"])
        for recipient in sorted(recipients):
            for s in await self._read("mailbox", recipient):
                if s.event.type == "MessageSent" and s.event.data.sender == task_id:
                    report.events.append(s)
                    report.messages.append(_message(s, "sent", recipient, fold.name, None))

    async def _worker(self, report: AuditReport, worker_id: str) -> None:
        own = await self._read("worker", worker_id)
        report.events += own
        # Leases go only to a worker serving the task's tenant: its own, and those it
        # registered for. So the scan reads those tenants' task events (a user held to
        # this tenant may, when the worker serves no other), every tenant's if it
        # ever served "*".
        served = {self.tenant}
        for s in own:
            if s.event.type == "WorkerRegistered":
                served.update(s.event.data.tenants)
        tenants: Sequence[str | None] = [None] if "*" in served else sorted(served)
        needle = orjson.dumps(worker_id)
        found: list[tuple[int, tuple[str, str], str]] = []  # (seq, (tenant, task), lease)
        for tenant in tenants:
            subject = self.client.subjects.events(tenant, "task")
            report.scanned.append(
                f"{subject} from seq {own[0].seq} (leases granted to {worker_id})"
            )
            last = await self.store.stream_last_seq(subject)
            async for batch, position in raw_batches(self.store, own[0].seq, last, subject=subject):
                for raw in batch:
                    if b'"LeaseGranted"' in raw.data and needle in raw.data:
                        ev = orjson.loads(raw.data)
                        data = ev["data"]
                        if (
                            ev["type"] == "LeaseGranted"
                            and data["worker_id"] == worker_id
                            # the worker's tenant (when not the task's): another tenant's
                            # worker of the same id is not this one
                            and (data.get("worker_tenant") or ev["tenant"]) == self.tenant
                        ):
                            found.append((raw.seq, (ev["tenant"], ev["aggregate_id"]),
                                          data["lease_id"]))  # fmt: skip
                self.progress(f"scanned to seq {position} of {last}")
        leases: dict[tuple[str, str], set[str]] = {}
        for _seq, key, lease_id in sorted(found):  # tasks in the order of their first lease
            leases.setdefault(key, set()).add(lease_id)
        await self._tasks(report, [(t, task_id, ids) for (t, task_id), ids in leases.items()])


def _message(
    s: StoredEvent, direction: str, other: str, name: str, delivered: tuple[str, str | None] | None
) -> dict[str, Any]:
    d = s.event.data
    return {
        "direction": direction,
        "seq": s.seq,
        "time": _iso(s.event.occurred_at),
        "message_id": d.message_id,
        "sender": d.sender,
        "recipient": s.event.aggregate_id,
        "task": name,
        "priority": str(d.priority),
        "type": str(d.type),
        "body": d.body,
        "state": "read" if delivered and delivered[1] else "delivered" if delivered else "pending",
        "detail": {"delivered_at": delivered[0] if delivered else None,
                   "read_at": delivered[1] if delivered else None, "other": other},
    }  # fmt: skip


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def _secs(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start).total_seconds(), 3)


def _json(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)
    return dump(mode="json") if dump is not None else value


# -- rendering ----------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return orjson.dumps(value).decode()
    return str(value)


def to_jsonl(report: AuditReport) -> str:
    return "".join(orjson.dumps(r).decode() + "\n" for r in report.rows())


def to_csv(report: AuditReport) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="raise", lineterminator="\n")
    writer.writeheader()
    for row in report.rows():
        writer.writerow({k: _cell(row.get(k)) for k in COLUMNS})
    return buf.getvalue()


def render(report: AuditReport, fmt: str) -> str:
    """The report as text in one of the flat formats (``json``, ``jsonl``, ``csv``)."""
    if fmt == "json":
        return orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2).decode() + "\n"
    if fmt == "jsonl":
        return to_jsonl(report)
    if fmt == "csv":
        return to_csv(report)
    raise InvalidError(f"unknown format {fmt!r}: one of {', '.join(FORMATS)}")


def tables(report: AuditReport) -> list[Any]:
    """Rich tables for ``--format table``: timeline, tasks, attempts, states, messages."""
    from rich.table import Table

    def make(title: str, cols: Sequence[str], rows: list[dict[str, Any]]) -> Table:
        table = Table(title=title, title_justify="left", show_lines=False)
        for c in cols:
            table.add_column(c, overflow="fold")
        for r in rows:
            table.add_row(*(_short(r.get(c)) for c in cols))
        return table

    out = [
        make(
            f"{report.kind} {report.entity_id} (tenant {report.tenant}): timeline",
            ("seq", "time", "type", "aggregate_id", "task", "actor", "caused_by",
             "correlation_id", "attempt", "worker_id"),
            report.event_rows(),
        ),
        make("tasks", ("aggregate_id", "task", "state", "attempt", "result", "error"),
             report.task_rows()),
        make("attempts", ("task", "attempt", "lease_id", "worker_id", "pending_s", "leased_s",
                          "running_s", "outcome", "result", "error"),
             [a.row() for f in report.tasks.values() for a in f.attempts]),
        make("time in each state", ("task", "attempt", "state", "from", "to", "seconds"),
             [s.row() for f in report.tasks.values() for s in f.states]),
    ]  # fmt: skip
    if report.messages:
        out.append(
            make("messages", ("direction", "seq", "time", "sender", "recipient", "priority",
                              "type", "state", "body"), report.messages)
        )  # fmt: skip
    return out


def _short(value: Any, width: int = 60) -> str:
    text = _cell(value)
    return text if len(text) <= width else text[: width - 1] + "…"
