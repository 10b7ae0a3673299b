"""Idempotency claims that outlive JetStream's duplicate window.

``Nats-Msg-Id`` only de-duplicates within the stream's window (2 minutes) and
only the very same event ids. A client retrying a command sends a new request
that decides anew, so the service keeps its own record per key in the KV
bucket ``<root>-idem`` (key ``<tenant>.<sha256(key)>``, TTL configurable):

1. before appending, *claim* the key: the command's fingerprint, the subject,
   the expected sequence, the planned event ids and the reply (``pending``);
2. append; 3. mark the claim ``done`` with the final reply.

A request that finds a ``done`` claim gets its reply. One that finds a
``pending`` claim asks the log whether the planned events landed (a crash
between 2 and 3): if so the claim is completed and its reply returned; if not
and the claim is fresh, another request is in flight (``conflict`` with
``retry_after``); a stale claim is taken over with a compare-and-set.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import nats.js.errors
import orjson
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from pantheon_es.commands import Command
from pantheon_es.subjects import Subjects

_META_FIELDS = {"idempotency_key", "correlation_id", "actor"}


def fingerprint(command: Command) -> str:
    """What makes two commands "the same": type and body, without meta fields."""
    body = command.model_dump(mode="json", exclude=_META_FIELDS)
    raw = orjson.dumps([command.aggregate, command.verb, body], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(raw).hexdigest()[:32]


@dataclass(slots=True)
class Claim:
    fingerprint: str
    state: str  # "pending" | "done"
    at: float
    reply: dict[str, Any]
    subject: str = ""
    expected_seq: int = 0
    event_ids: list[str] = field(default_factory=list)

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "fp": self.fingerprint,
                "state": self.state,
                "at": self.at,
                "reply": self.reply,
                "subject": self.subject,
                "expected_seq": self.expected_seq,
                "event_ids": self.event_ids,
            }
        )

    @classmethod
    def decode(cls, raw: bytes) -> Claim:
        d = orjson.loads(raw)
        return cls(
            d["fp"],
            d["state"],
            d["at"],
            d["reply"],
            d["subject"],
            d["expected_seq"],
            d["event_ids"],
        )


class ClaimTaken(Exception):
    """Another request created or changed the claim first."""


class IdempotencyIndex:
    """The KV bucket of claims."""

    def __init__(self, js: JetStreamContext, subjects: Subjects, ttl: float, replicas: int = 1):
        self._js = js
        self._subjects = subjects
        self._ttl = ttl
        self._replicas = replicas
        self._kv: KeyValue | None = None

    async def provision(self) -> None:
        bucket = self._subjects.idempotency_bucket
        try:
            self._kv = await self._js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            self._kv = await self._js.create_key_value(
                KeyValueConfig(
                    bucket=bucket,
                    description="Pantheon-ES idempotency claims",
                    history=1,
                    ttl=self._ttl,
                    storage=StorageType.FILE,
                    replicas=self._replicas,
                )
            )

    @property
    def kv(self) -> KeyValue:
        if self._kv is None:
            raise RuntimeError("IdempotencyIndex.provision() was not awaited")
        return self._kv

    def key(self, tenant: str, idempotency_key: str) -> str:
        digest = hashlib.sha256(idempotency_key.encode()).hexdigest()[:40]
        return self._subjects.idempotency_key(tenant, digest)

    async def get(self, key: str) -> tuple[Claim, int] | None:
        try:
            entry = await self.kv.get(key)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        if entry.value is None:
            return None
        return Claim.decode(entry.value), int(entry.revision or 0)

    async def create(self, key: str, claim: Claim) -> int:
        try:
            return int(await self.kv.create(key, claim.encode()))
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            raise ClaimTaken(key) from exc

    async def update(self, key: str, claim: Claim, revision: int) -> int:
        try:
            return int(await self.kv.update(key, claim.encode(), last=revision))
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            raise ClaimTaken(key) from exc

    async def release(self, key: str, revision: int) -> None:
        """Drop a claim whose command failed, so a retry decides afresh."""
        with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError):
            await self.kv.delete(key, last=revision)  # unless someone already moved it on

    @staticmethod
    def now() -> float:
        return time.time()
