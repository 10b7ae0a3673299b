"""Every NATS subject, stream, bucket and key name Pantheon-ES uses.

Nothing else in the code base formats a subject. The root token defaults to
``pantheon``; a different root gives a fully separate namespace on the same
server (the test-suite uses one per test, and so can a staging deployment).

Layout (root ``pantheon``)::

    pantheon.cmd.<tenant>.<aggregate>.<verb>    commands (core request/reply)
    pantheon.q.<tenant>.<model>.<verb>          read-model queries (request/reply)
    pantheon.ev.<tenant>.<aggregate>.<id>       events, stream PANTHEON_EVENTS
    pantheon.changed.<tenant>.<aggregate>.<id>  committed-event notices (the stream republishes)
    pantheon.work.<tenant>.<worker_id>          work offers
    KV pantheon-state   key <tenant>.<model>.<id>
    KV pantheon-idem    key <tenant>.<digest>   idempotency claims
    object store pantheon-snapshots            read-model snapshots (<name>-<last_seq>.sqlite)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

#: Aggregates that own a subject in the event stream.
AGGREGATES: Final = frozenset({"task", "workflow", "worker", "mailbox", "tenant"})

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_ROOT = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


def is_token(value: str) -> bool:
    """True if ``value`` is safe as one subject token and one KV key token."""
    return bool(_TOKEN.match(value))


def check_token(kind: str, value: str) -> str:
    """Return ``value`` or raise ``ValueError`` naming what was wrong."""
    if not isinstance(value, str) or not _TOKEN.match(value):
        raise ValueError(
            f"{kind} {value!r} is not subject-safe: use 1-128 characters of "
            "letters, digits, '_' or '-'"
        )
    return value


@dataclass(frozen=True, slots=True)
class CommandSubject:
    """A parsed command subject."""

    tenant: str
    aggregate: str
    verb: str


@dataclass(frozen=True, slots=True)
class Subjects:
    """Builds and parses the subjects of one namespace (one root token)."""

    root: str = "pantheon"

    def __post_init__(self) -> None:
        if not _ROOT.match(self.root):
            raise ValueError(f"namespace root {self.root!r} must match {_ROOT.pattern}")

    # -- streams and buckets -------------------------------------------------
    @property
    def stream(self) -> str:
        """The event stream (``PANTHEON_EVENTS`` for the default root)."""
        return f"{self.root.upper().replace('-', '_')}_EVENTS"

    @property
    def state_bucket(self) -> str:
        """KV bucket holding the current state of every entity."""
        return f"{self.root}-state"

    @property
    def snapshot_bucket(self) -> str:
        """Object store holding read-model snapshots (``pantheon snapshot``)."""
        return f"{self.root}-snapshots"

    @property
    def idempotency_bucket(self) -> str:
        """KV bucket holding idempotency claims of the command service."""
        return f"{self.root}-idem"

    # -- events ----------------------------------------------------------------
    @property
    def all_events(self) -> str:
        return f"{self.root}.ev.>"

    def events(
        self,
        tenant: str | None = None,
        aggregate: str | None = None,
        aggregate_id: str | None = None,
    ) -> str:
        """Filter subject for events; ``None`` parts are wildcards."""
        if tenant is None and aggregate is None and aggregate_id is None:
            return self.all_events
        t = "*" if tenant is None else check_token("tenant", tenant)
        a = "*" if aggregate is None else aggregate
        i = "*" if aggregate_id is None else check_token("id", aggregate_id)
        if aggregate_id is None and aggregate is None:
            return f"{self.root}.ev.{t}.>"
        return f"{self.root}.ev.{t}.{a}.{i}"

    def aggregate(self, tenant: str, aggregate: str, aggregate_id: str) -> str:
        """The subject of one aggregate instance."""
        if aggregate not in AGGREGATES:
            raise ValueError(f"unknown aggregate {aggregate!r}")
        return (
            f"{self.root}.ev.{check_token('tenant', tenant)}.{aggregate}."
            f"{check_token('id', aggregate_id)}"
        )

    def parse_aggregate(self, subject: str) -> tuple[str, str, str]:
        """``pantheon.ev.t.task.X`` -> ``("t", "task", "X")``."""
        parts = subject.split(".")
        if len(parts) != 5 or parts[0] != self.root or parts[1] != "ev":
            raise ValueError(f"not an event subject of {self.root!r}: {subject!r}")
        return parts[2], parts[3], parts[4]

    def changed(
        self,
        tenant: str | None = None,
        aggregate: str | None = None,
        aggregate_id: str | None = None,
    ) -> str:
        """Notices of appended events (after the ack); ``None`` parts are wildcards."""
        t = "*" if tenant is None else check_token("tenant", tenant)
        a = "*" if aggregate is None else aggregate
        i = "*" if aggregate_id is None else check_token("id", aggregate_id)
        return f"{self.root}.changed.{t}.{a}.{i}"

    @property
    def changed_pattern(self) -> str:
        """Where the stream republishes each stored event: ``<root>.changed.<t>.<a>.<id>``."""
        return f"{self.root}.changed.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}.{{{{wildcard(3)}}}}"

    # -- commands and queries ----------------------------------------------------
    def command(self, tenant: str, aggregate: str, verb: str) -> str:
        return f"{self.root}.cmd.{check_token('tenant', tenant)}.{aggregate}.{verb}"

    @property
    def all_commands(self) -> str:
        return f"{self.root}.cmd.>"

    def parse_command(self, subject: str) -> CommandSubject | None:
        """Parse a command subject; ``None`` if it does not have the command shape."""
        parts = subject.split(".")
        if len(parts) != 5 or parts[0] != self.root or parts[1] != "cmd":
            return None
        return CommandSubject(parts[2], parts[3], parts[4])

    def query(self, tenant: str, model: str, verb: str) -> str:
        return f"{self.root}.q.{check_token('tenant', tenant)}.{model}.{verb}"

    @property
    def all_queries(self) -> str:
        return f"{self.root}.q.>"

    def parse_query(self, subject: str) -> CommandSubject | None:
        parts = subject.split(".")
        if len(parts) != 5 or parts[0] != self.root or parts[1] != "q":
            return None
        return CommandSubject(parts[2], parts[3], parts[4])

    # -- the scheduler's own questions (why) ---------------------------------------
    def scheduler(self, tenant: str, verb: str) -> str:
        return f"{self.root}.sched.{check_token('tenant', tenant)}.{verb}"

    @property
    def all_scheduler(self) -> str:
        return f"{self.root}.sched.*.*"

    # -- work offers -----------------------------------------------------------
    def work(self, tenant: str, worker_id: str) -> str:
        return (
            f"{self.root}.work.{check_token('tenant', tenant)}.{check_token('worker', worker_id)}"
        )

    def work_any(self, worker_id: str) -> str:
        """A worker's offers from every tenant (a worker that serves them all)."""
        return f"{self.root}.work.*.{check_token('worker', worker_id)}"

    # -- KV keys -----------------------------------------------------------------
    @staticmethod
    def state_key(tenant: str, model: str, entity_id: str) -> str:
        return f"{tenant}.{model}.{entity_id}"

    @staticmethod
    def parse_state_key(key: str) -> tuple[str, str, str]:
        tenant, model, entity_id = key.split(".", 2)
        return tenant, model, entity_id

    def state_bucket_subject(self, key: str) -> str:
        """The stream subject a KV put of ``key`` is published to."""
        return f"$KV.{self.state_bucket}.{key}"

    @staticmethod
    def idempotency_key(tenant: str, digest: str) -> str:
        return f"{tenant}.{digest}"


DEFAULT = Subjects()
