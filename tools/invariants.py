"""The invariants of a Pantheon-ES history, checked by one pure fold over the log.

:class:`InvariantChecker` takes decoded :class:`~pantheon_es.events.EventRecord`
objects in stream order (``feed`` has the signature of a projector sink) and
records a :class:`Violation` for every event that breaks one of
:data:`INVARIANTS`, naming its stream sequence, event id and type. It does no
I/O but one private temporary SQLite file (see below), so it is tested without
a server; ``tools.verify`` streams the log through it. What each invariant
means exactly is written in docs/operations.md ("Replay and verify") and
docs/decisions.md.

Memory does not grow with the number of finished tasks or of undelivered
messages. A task in flight has a full record; a finished one shrinks to one int
(terminal event and sequence, whether it ever completed, its resources as an
index into a table of the distinct vectors) under its id decoded to an int, and
the newest ``keep_finished`` to ``2 * keep_finished`` of those stay in dicts
while older ones go to a private temporary SQLite file, deleted when it is
closed. Undelivered messages go to the same file: a finished agent's at once,
the others once ``keep_messages`` to ``2 * keep_messages`` newer ones were sent
(a delivered message is dropped). What is left in memory is what is in flight
(tasks, workers), the newest finished tasks and undelivered messages, and the
violations found (docs/decisions.md, "The invariant check's memory").
"""

from __future__ import annotations

import heapq
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

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
#: Task events that check or change a task's record; any other (TaskArchived, TaskBlocked)
#: leaves a finished task's compact record where it is.
TASK_STATE_EVENTS = frozenset({*REPORTS, *LEASE_ENDS, "LeaseGranted", "TaskRedriven"})
MESSAGE_RANK = {"low": 0, "medium": 1, "high": 2, "urgent": 3}
_PRIORITY_NAMES = {name: name for name in MESSAGE_RANK}
#: The scheduler's own retry of an attempt that ran too long: not a worker's report,
#: decided without looking at the lease's expiry.
SCHEDULER_RETRY_ERRORS = frozenset({"StartToCloseTimeout"})
EPS = 1e-9

TaskKey = tuple[str, str]  # (tenant, task id)
WorkerKey = tuple[str, str]  # (tenant, worker id)

#: Finished tasks kept in memory: between this many and twice as many, the newest.
KEEP_FINISHED = 100_000
#: Distinct resource vectors given an index (12 bits); past that a task keeps its own.
MAX_VECTORS = 4096
#: Undelivered messages kept in memory: at most twice this many, the newest.
KEEP_MESSAGES = 50_000
#: Bits of the map of mailboxes written to the file (1 MiB).
_WRITTEN_BITS = 1 << 23

# A finished task's compact record is one int: bits 0-2 its terminal event (a position in
# _TERMINAL_TYPES), bit 3 set if it ever completed, bits 4-15 the index of its resource
# vector, the rest the terminal event's sequence; or, when it also keeps dependencies not
# yet met or resources of its own, (that int, those resources or None, dependencies).
_TERMINAL_TYPES = tuple(TERMINAL_EVENTS)
_TERMINAL_CODE = {name: code for code, name in enumerate(_TERMINAL_TYPES)}
_EVER_COMPLETED = 8
_VECTOR_SHIFT, _SEQ_SHIFT, _LOW_BITS = 4, 16, 0xFFFF
_INT64_MAX = (1 << 63) - 1
Record = int | tuple[int, dict[str, float] | None, tuple[str, ...]]
#: A task id as a key: a 26-character Crockford id decoded to its int (48 bytes, the
#: string is 80), any other id as it is.
IdKey = int | str
_BASE32 = bytearray(b"!" * 256)  # "!": int() refuses the id, which stays a string
for _i, _c in enumerate(b"0123456789ABCDEFGHJKMNPQRSTVWXYZ"):
    _BASE32[_c] = b"0123456789abcdefghijklmnopqrstuv"[_i]
_BASE32_TABLE = bytes(_BASE32)


def id_key(task_id: str) -> IdKey:
    """The compact key of a task id (one-to-one: a decoded id is an int, others strings)."""
    if len(task_id) == 26:
        try:
            return int(task_id.encode("ascii").translate(_BASE32_TABLE), 32)
        except ValueError:  # UnicodeEncodeError included
            pass
    return task_id


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


#: The resources of a task seen before its TaskSubmitted (never changed: needs are shared).
_NO_NEED: dict[str, float] = {}


@dataclass(slots=True)
class _Task:
    """A task in flight (or a finished one an event is about to touch)."""

    status: str = "unknown"  # before its TaskSubmitted (a forged or truncated log)
    #: shared with every task of the same vector, so never changed in place
    need: dict[str, float] = field(default_factory=lambda: _NO_NEED)
    vector: int = -1  # need's index in the checker's table (-1: a vector of its own)
    #: the dependencies not met at its last grant (met ones stay met: completion is for good)
    depends_on: tuple[str, ...] = ()
    lease: _Lease | None = None
    terminal_seq: int = 0
    terminal_type: str = ""
    completed: bool = False  # a TaskCompleted was recorded for it (a dependent may start)


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
    seq: int  # of its MessageSent: the send order
    priority: str


#: A mailbox's undelivered messages by id (a mailbox with none is not kept).
_Mailbox = dict[str, _Message]
#: A mailbox: (tenant, the agent's task id).
BoxKey = tuple[str, str]


class _SpillFile:
    """The private temporary SQLite database that old records go to, opened when first
    needed: ``sqlite3.connect("")`` makes a file unlinked on Unix as soon as it is opened,
    gone when closed."""

    def __init__(self) -> None:
        self.db: sqlite3.Connection | None = None

    def open(self) -> sqlite3.Connection:
        if self.db is not None:
            return self.db
        db = self.db = sqlite3.connect("", check_same_thread=False)
        db.execute("PRAGMA journal_mode = OFF")
        db.execute("PRAGMA synchronous = OFF")
        db.execute("PRAGMA cache_size = -16384")  # 16 MiB
        # key: the tenant, NUL, the id (17 bytes of a decoded one, or 0xFF and the id);
        # record: the int of the record, or its low 16 bits when the sequence does not fit
        # (then in extra, with the resources and dependencies of a tuple record, as JSON).
        db.execute(
            "CREATE TABLE finished (key BLOB PRIMARY KEY, record INTEGER NOT NULL, extra BLOB) "
            "WITHOUT ROWID"
        )
        # box: the mailbox's key as above; id: as sent (no type: a forged int stays one);
        # seq: an integer, or past 2^63 a blob (blobs sort after integers); priority: NULL
        # for the name of its rank.
        db.execute(
            "CREATE TABLE messages (box BLOB NOT NULL, id NOT NULL, rank INTEGER NOT NULL, "
            "seq NOT NULL, priority TEXT, PRIMARY KEY (box, id)) WITHOUT ROWID"
        )
        db.execute("CREATE INDEX messages_due ON messages (box, rank DESC, seq)")
        return db

    def bytes(self) -> int:
        """The size of the file (0 before the first spill)."""
        if self.db is None:
            return 0
        pages = self.db.execute("PRAGMA page_count").fetchone()[0]
        return int(pages * self.db.execute("PRAGMA page_size").fetchone()[0])

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None


class _FinishedTasks:
    """Compact records of finished tasks by tenant and id (:data:`Record`).

    New records go to the young dict; when ``keep`` have been put there, the old dict
    is written to the spill file (table ``finished``) and the young one becomes the old.
    So memory holds the newest ``keep`` to ``2 * keep`` records, the ones the next
    dependency checks most likely ask for. Once bit 3 (ever completed) is set for a task
    in any generation it stays set.
    """

    def __init__(self, keep: int, file: _SpillFile) -> None:
        self.keep = max(1, keep)
        self._young: dict[str, dict[IdKey, Record]] = {}
        self._old: dict[str, dict[IdKey, Record]] = {}
        self._puts = 0
        self._file = file
        #: records written to the file so far
        self.spilled = 0

    def put(self, tenant: str, key: IdKey, record: Record) -> None:
        young = self._young.get(tenant)
        if young is None:
            young = self._young[tenant] = {}
        before = young.get(key)  # put again (revived, finished again): keep bit 3
        if before is not None and _packed(before) & _EVER_COMPLETED:
            record = _with_packed(record, _packed(record) | _EVER_COMPLETED)
        young[key] = record
        self._puts += 1
        if self._puts >= self.keep:
            self._spill()

    def get(self, tenant: str, key: IdKey) -> Record | None:
        for generation in (self._young, self._old):
            records = generation.get(tenant)
            if records is not None:
                record = records.get(key)
                if record is not None:
                    return record
        if not self.spilled:
            return None
        db = self._file.open()
        row = db.execute(
            "SELECT record, extra FROM finished WHERE key = ?", (_db_key(tenant, key),)
        ).fetchone()
        return None if row is None else _from_row(*row)

    def ever_completed(self, tenant: str, key: IdKey) -> bool:
        """Whether any generation records a TaskCompleted of the task."""
        for generation in (self._young, self._old):
            record = generation.get(tenant, {}).get(key)
            if record is not None and _packed(record) & _EVER_COMPLETED:
                return True
        if not self.spilled:
            return False
        db = self._file.open()
        row = db.execute(
            "SELECT record FROM finished WHERE key = ?", (_db_key(tenant, key),)
        ).fetchone()
        return row is not None and bool(row[0] & _EVER_COMPLETED)

    def __len__(self) -> int:
        """Records in memory (a task put twice counts twice until its older one is spilled)."""
        return sum(len(r) for g in (self._young, self._old) for r in g.values())

    def _spill(self) -> None:
        if self._old:
            db = self._file.open()
            with db:
                # A task finished again after its record was written (redriven, or submitted
                # twice) keeps bit 3 of the older record.
                db.executemany(
                    "INSERT INTO finished VALUES (?, ?, ?) ON CONFLICT DO UPDATE SET "
                    "record = excluded.record | (record & 8), extra = excluded.extra",
                    _rows(self._old),
                )
            self.spilled += sum(len(r) for r in self._old.values())
        self._old, self._young, self._puts = self._young, {}, 0


class _Mailboxes:
    """Undelivered messages by mailbox: the newest in memory, the others in the spill file.

    As :class:`_FinishedTasks`: a message goes into the young generation; when ``keep``
    have been sent, the old generation's messages still undelivered are written to the
    file (table ``messages``) and the young one becomes the old. A finished agent's
    messages are written at once (:meth:`retire`). A delivery reads the file only for a
    mailbox that may be in it (a bitmap of the mailboxes written, one bit a hash). A
    message is in one place: a generation, or the file. The one exception is an id sent
    again to the same mailbox (the service never does) while its first message is in the
    file: the new one in memory hides the row, the next write replaces it, and a delivery
    of the id deletes it.
    """

    def __init__(self, keep: int, file: _SpillFile) -> None:
        self.keep = max(1, keep)
        self._young: dict[BoxKey, _Mailbox] = {}
        self._old: dict[BoxKey, _Mailbox] = {}
        self._sent = 0
        self._file = file
        #: rows in the file, at most (a row written twice counts twice)
        self.on_file = 0
        #: one bit a hash of a mailbox written to the file (from the first write on): a
        #: clear bit spares a delivery the read (a set bit of another mailbox costs one)
        self._written = bytearray()
        #: messages written to the file so far
        self.spilled = 0

    def send(self, key: BoxKey, message_id: str, message: _Message) -> None:
        old = self._old.get(key)
        if old is not None and old.pop(message_id, None) is not None and not old:
            del self._old[key]
        box = self._young.get(key)
        if box is None:
            box = self._young[key] = {}
        box[message_id] = message
        self._sent += 1
        if self._sent >= self.keep:
            self._write(self._old)
            self._old, self._young, self._sent = self._young, {}, 0

    def pending(self, key: BoxKey, first: int) -> tuple[_Mailbox, bool]:
        """The mailbox's messages in memory and its ``first`` due in the file (what the
        first ``first`` due of the whole mailbox are among), and whether the file holds
        any of its messages. Not a copy when the file holds none and one generation does."""
        young, old = self._young.get(key), self._old.get(key)
        if not self.on_file or not self._maybe_written(key):
            if old is None:
                return (young if young is not None else {}), False
            return ({**old, **young} if young is not None else old), False
        box = {**(old or {}), **(young or {})}
        db = self._file.open()
        rows = db.execute(
            "SELECT id, rank, seq, priority FROM messages WHERE box = ? ORDER BY rank DESC, seq",
            (_box_key(key),),
        )
        on_file, taken = False, 0
        for message_id, rank, seq, priority in rows:
            on_file = True
            if taken >= first:
                break
            if message_id not in box:  # else hidden by the same id sent again
                box[message_id] = _message_from_row(rank, seq, priority)
                taken += 1
        rows.close()
        return box, on_file

    def look_up(self, key: BoxKey, ids: list[str], box: _Mailbox) -> None:
        """Add to ``box`` (from :meth:`pending`, the file holding some of the mailbox) the
        messages of ``ids`` that are in the file only."""
        db = self._file.open()
        for message_id in ids:
            if message_id not in box:
                row = db.execute(
                    "SELECT rank, seq, priority FROM messages WHERE box = ? AND id = ?",
                    (_box_key(key), message_id),
                ).fetchone()
                if row is not None:
                    box[message_id] = _message_from_row(*row)

    def remove(self, key: BoxKey, ids: list[str], on_file: bool) -> None:
        """Delivered: no longer pending, no longer kept (``on_file``: from :meth:`pending`)."""
        for generation in (self._young, self._old):
            box = generation.get(key)
            if box is not None:
                for message_id in ids:
                    box.pop(message_id, None)
                if not box:
                    del generation[key]
        if on_file:
            box_key = _box_key(key)
            deleted = self._file.open().executemany(
                "DELETE FROM messages WHERE box = ? AND id = ?", [(box_key, i) for i in ids]
            )
            self.on_file -= deleted.rowcount

    def retire(self, key: BoxKey) -> None:
        """The agent finished: its undelivered messages go to the file now (the service
        refuses to send to a finished agent; it may still take them, or be redriven)."""
        old, young = self._old.pop(key, None), self._young.pop(key, None)
        if old is not None or young is not None:
            # Not committed: the file is private and never rolled back (journal off), so
            # a commit per agent would only write pages out sooner; the next spill commits.
            self._write({key: {**(old or {}), **(young or {})}}, commit=False)

    def in_memory(self) -> tuple[int, int]:
        """Mailboxes and messages in memory."""
        keys = self._young.keys() | self._old.keys()
        messages = sum(len(b) for g in (self._young, self._old) for b in g.values())
        return len(keys), messages

    def in_file(self) -> int:
        if not self.on_file:
            return 0
        return int(self._file.open().execute("SELECT count(*) FROM messages").fetchone()[0])

    def _maybe_written(self, key: BoxKey) -> bool:
        bit = hash(key) & (_WRITTEN_BITS - 1)
        return bool(self._written[bit >> 3] & 1 << (bit & 7))

    def _write(self, boxes: dict[BoxKey, _Mailbox], commit: bool = True) -> None:
        if not boxes:
            return
        if not self._written:
            self._written = bytearray(_WRITTEN_BITS // 8)
        rows = []
        for key, box in boxes.items():
            bit = hash(key) & (_WRITTEN_BITS - 1)
            self._written[bit >> 3] |= 1 << (bit & 7)
            box_key = _box_key(key)
            for message_id, m in box.items():
                seq = m.seq if m.seq <= _INT64_MAX else _seq_value(m.seq)
                priority = None if m.priority in MESSAGE_RANK else m.priority
                rows.append((box_key, message_id, m.rank, seq, priority))
        db = self._file.open()
        db.executemany("INSERT OR REPLACE INTO messages VALUES (?, ?, ?, ?, ?)", rows)
        if commit:
            db.commit()
        self.on_file += len(rows)
        self.spilled += len(rows)


_RANK_NAMES = {rank: name for name, rank in MESSAGE_RANK.items()}


def _message_from_row(rank: int, seq: int | bytes, priority: str | None) -> _Message:
    return _Message(rank, _seq_from(seq), priority or _RANK_NAMES[rank])


def _seq_value(seq: int) -> int | bytes:
    """A sequence as SQLite orders it: an integer, or past 2^63 a blob of its length and
    big-endian bytes (every blob sorts after every integer, and among themselves by size)."""
    if seq <= _INT64_MAX:
        return seq
    size = (seq.bit_length() + 7) // 8
    return bytes([size]) + seq.to_bytes(size, "big")


def _seq_from(value: int | bytes) -> int:
    return value if isinstance(value, int) else int.from_bytes(value[1:], "big")


def _box_key(key: BoxKey) -> bytes:
    return _db_key(key[0], id_key(key[1]))


def _packed(record: Record) -> int:
    return record if isinstance(record, int) else record[0]


def _with_packed(record: Record, packed: int) -> Record:
    return packed if isinstance(record, int) else (packed, record[1], record[2])


def _db_key(tenant: str, key: IdKey) -> bytes:
    if isinstance(key, int):  # a decoded id has 130 bits: its first byte is 0-3
        return b"%s\0%s" % (tenant.encode(), key.to_bytes(17, "big"))
    return b"%s\0\xff%s" % (tenant.encode(), key.encode())


def _rows(generation: dict[str, dict[IdKey, Record]]) -> Iterator[tuple[Any, ...]]:
    for tenant, records in generation.items():
        for key, record in records.items():
            if isinstance(record, int) and record <= _INT64_MAX:
                yield _db_key(tenant, key), record, None
                continue
            packed, need, deps = (record, None, ()) if isinstance(record, int) else record
            seq = str(packed >> _SEQ_SHIFT) if packed > _INT64_MAX else None
            low = packed & _LOW_BITS if seq else packed
            yield _db_key(tenant, key), low, orjson.dumps([seq, need, deps])


def _from_row(record: int, extra: bytes | None) -> Record:
    if extra is None:
        return record
    seq, need, deps = orjson.loads(extra)
    packed = record if seq is None else int(seq) << _SEQ_SHIFT | (record & _LOW_BITS)
    return (packed, need, tuple(deps)) if need is not None or deps else packed


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
    """Folds a history, event by event, recording every violation.

    Args:
        keep_finished: finished tasks' records kept in memory (between this many and
            twice as many); older ones go to a temporary SQLite file. Only how fast a
            check of an old record is depends on it, never a result.
        keep_messages: undelivered messages kept in memory, but for a finished
            agent's (at most twice this many, the newest); the others go to the same
            file. Only speed depends on it, never a result.
    """

    def __init__(
        self, keep_finished: int = KEEP_FINISHED, keep_messages: int = KEEP_MESSAGES
    ) -> None:
        self.violations: list[Violation] = []
        self.events = 0
        self.last_seq = 0
        #: tasks in flight; a finished task's record moves to ``_finished``
        self._tasks: dict[TaskKey, _Task] = {}
        self._file = _SpillFile()
        self._finished = _FinishedTasks(keep_finished, self._file)
        self._workers: dict[WorkerKey, _Worker] = {}
        self._mailboxes = _Mailboxes(keep_messages, self._file)
        #: the distinct resource vectors, shared by the tasks that need them
        self._vectors: list[dict[str, float]] = []
        self._vector_index: dict[tuple[tuple[str, float], ...], int] = {}
        #: dependencies a WorkflowCreated recorded for a task id not yet submitted (its
        #: TaskSubmitted repeats them)
        self._workflow_deps: dict[TaskKey, tuple[str, ...]] = {}

    def close(self) -> None:
        """Delete the temporary file of old records, if there is one (idempotent)."""
        self._file.close()

    def record_counts(self) -> dict[str, int]:
        """How many records of each kind the checker holds (what its memory grows with)."""
        mailboxes, messages = self._mailboxes.in_memory()
        return {
            "tasks_in_flight": len(self._tasks),
            "finished_in_memory": len(self._finished),
            "finished_spilled": self._finished.spilled,
            "mailboxes": mailboxes,
            "undelivered_messages": messages,
            "undelivered_in_file": self._mailboxes.in_file(),
            "spill_file_bytes": self._file.bytes(),
            "workers": len(self._workers),
            "resource_vectors": len(self._vectors),
        }

    # -- feeding ---------------------------------------------------------------------------------
    def feed(self, events: Iterable[EventRecord]) -> None:
        """Apply events in stream order (usable as a projector sink)."""
        for event in events:
            self.apply(event)

    def apply(self, ev: EventRecord) -> None:
        self.events += 1
        if ev.seq > self.last_seq:
            self.last_seq = ev.seq
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
            workflow_deps = self._workflow_deps.pop(key, ())
            deps = tuple(data.get("depends_on") or ()) or workflow_deps
            vector, need = self._intern(resource_vector(data.get("resources"), 1.0))
            again = self._tasks.get(key)  # a second TaskSubmitted: completion counts for good
            self._tasks[key] = _Task(
                "pending", need, vector, deps, completed=bool(again and again.completed)
            )
            return
        task = self._tasks.get(key)
        if task is None:
            if ev.type not in TASK_STATE_EVENTS:
                return
            task = self._tasks[key] = self._revive(key)
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
        finished = task.terminal_seq and task.lease is None
        if finished and task.status == TERMINAL_EVENTS[task.terminal_type]:
            self._compact(key, task)

    def _intern(self, vector: dict[str, float]) -> tuple[int, dict[str, float]]:
        items = tuple(vector.items())
        index = self._vector_index.get(items)
        if index is None:
            if len(self._vectors) >= MAX_VECTORS:
                return -1, vector
            index = self._vector_index[items] = len(self._vectors)
            self._vectors.append(vector)
        return index, self._vectors[index]

    def _compact(self, key: TaskKey, task: _Task) -> None:
        """A finished task without a lease: its record shrinks to what later checks need."""
        del self._tasks[key]
        flags = _TERMINAL_CODE[task.terminal_type] | (_EVER_COMPLETED if task.completed else 0)
        packed = task.terminal_seq << _SEQ_SHIFT | max(task.vector, 0) << _VECTOR_SHIFT | flags
        record: Record = packed
        if task.depends_on or task.vector < 0:
            record = (packed, None if task.vector >= 0 else task.need, task.depends_on)
        self._finished.put(key[0], id_key(key[1]), record)
        self._mailboxes.retire(key)

    def _revive(self, key: TaskKey) -> _Task:
        """The full record of a task not in flight: its compact one expanded, or a new one."""
        record = self._finished.get(key[0], id_key(key[1]))
        if record is None:
            return _Task()
        packed, need, deps = (record, None, ()) if isinstance(record, int) else record
        vector = (packed & _LOW_BITS) >> _VECTOR_SHIFT if need is None else -1
        terminal_type = _TERMINAL_TYPES[packed & 7]
        return _Task(
            status=TERMINAL_EVENTS[terminal_type],
            need=self._vectors[vector] if need is None else need,
            vector=vector,
            depends_on=deps,
            terminal_seq=packed >> _SEQ_SHIFT,
            terminal_type=terminal_type,
            completed=bool(packed & _EVER_COMPLETED),
        )

    def _ever_completed(self, tenant: str, task_id: str) -> bool:
        task = self._tasks.get((tenant, task_id))
        if task is not None and task.completed:
            return True
        # A record in flight that never completed may shadow an older one that did (a
        # second TaskSubmitted of one id): completion counts for good, as it did in a set.
        return self._finished.ever_completed(tenant, id_key(task_id))

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
        if task.depends_on:
            unmet = [d for d in task.depends_on if not self._ever_completed(ev.tenant, d)]
            task.depends_on = tuple(unmet)  # the met ones can never be unmet again
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
            task.completed = True

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
        key = (ev.tenant, ev.aggregate_id)
        if ev.type == "MessageSent":
            priority = str(ev.data.get("priority", "medium"))
            priority = _PRIORITY_NAMES.get(priority, priority)  # one string a name, not a message
            message = _Message(MESSAGE_RANK.get(priority, 1), ev.seq, priority)
            self._mailboxes.send(key, ev.data["message_id"], message)
        elif ev.type == "MessagesDelivered":
            self._delivered(ev, key, list(ev.data.get("message_ids") or ()))

    def _delivered(self, ev: EventRecord, key: BoxKey, ids: list[str]) -> None:
        box, on_file = self._mailboxes.pending(key, len(ids))
        waiting = heapq.nsmallest(
            len(ids), box.items(), key=lambda item: (-item[1].rank, item[1].seq)
        )
        expected = [message_id for message_id, _ in waiting]
        if ids != expected:
            if on_file:
                self._mailboxes.look_up(key, ids, box)
            problem = self._order_problem(box, ids, expected)
            self._violate("message_order", ev, problem)
        self._mailboxes.remove(key, ids, on_file)

    @staticmethod
    def _order_problem(box: _Mailbox, ids: list[str], expected: list[str]) -> str:
        for i, message_id in enumerate(ids):
            if message_id in ids[:i]:
                return f"delivered {message_id} a second time"
            message = box.get(message_id)
            if message is None:
                return (
                    f"delivered {message_id}, which is not pending in this mailbox "
                    "(never sent to it, or delivered before)"
                )
            if i >= len(expected):
                return f"delivered {len(ids)} messages, {len(expected)} were pending"
            if message_id != expected[i]:
                ahead = box[expected[i]]
                return (
                    f"delivered {message_id} ({message.priority}, sent at seq {message.seq}) "
                    f"while {expected[i]} ({ahead.priority}, sent at seq {ahead.seq}) "
                    "was due first"
                )
        return "delivery order differs from priority order"

    # -- the report --------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """Violations per invariant (every invariant named, zero included)."""
        out = dict.fromkeys(INVARIANTS, 0)
        for v in self.violations:
            out[v.invariant] += 1
        return out
