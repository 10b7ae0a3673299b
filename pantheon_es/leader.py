"""Scheduler leadership: one active scheduler per namespace, a lease in JetStream KV.

The lease is key ``scheduler`` of bucket ``<root>-leader``, whose entries age
out after ``ttl`` seconds. The leader renews it every ``ttl / 3`` (compare and
set on the revision it holds); a node that cannot renew before its lease
would run out steps down at once. Standbys watch the key: when it is deleted
or ages out (the server writes a marker), each tries to create it, and one
wins. The **epoch** is the revision of that create: it only grows, it goes
into every decision of the scheduler, and the command service refuses a
decision whose epoch is not the one it last saw (``forbidden``), so a deposed
leader that wakes up late cannot act.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import nats.errors
import nats.js.errors
import orjson
import structlog
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from pantheon_es import ids
from pantheon_es.subjects import Subjects

log = structlog.get_logger(__name__)

KEY = "scheduler"


class Leadership:
    """Campaigns for the scheduler lease and keeps it; see the module docstring."""

    def __init__(
        self,
        js: JetStreamContext,
        subjects: Subjects,
        *,
        ttl: float = 5.0,
        node_id: str | None = None,
        replicas: int = 1,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.js = js
        self.bucket = f"{subjects.root}-leader"
        self.ttl = ttl
        self.node_id = node_id or f"{socket.gethostname()}-{os.getpid()}-{ids.new_id()[-6:]}"
        self.replicas = replicas
        self.on_change = on_change
        #: Our epoch while we lead, else None.
        self.epoch: int | None = None
        #: The newest epoch seen in the bucket (ours or another node's).
        self.current_epoch = 0
        self.leader: str | None = None
        self._revision = 0  # of our last write, for compare-and-set
        self._valid_until = 0.0  # monotonic: our lease surely holds until then
        self._kv: KeyValue | None = None
        self._changed = asyncio.Event()
        self._stopped = asyncio.Event()
        self._stopping = False

    @property
    def is_leader(self) -> bool:
        return self.epoch is not None and time.monotonic() < self._valid_until

    def is_current(self, epoch: int | None) -> bool:
        """May a decision taken under ``epoch`` be appended now?"""
        return epoch is not None and epoch == self.epoch == self.current_epoch and self.is_leader

    async def start(self) -> None:
        try:
            self._kv = await self.js.key_value(self.bucket)
        except nats.js.errors.BucketNotFoundError:
            self._kv = await self.js.create_key_value(
                KeyValueConfig(
                    bucket=self.bucket,
                    description="Pantheon-ES scheduler leadership lease",
                    history=1,
                    ttl=self.ttl,
                    storage=StorageType.FILE,
                    replicas=self.replicas,
                    limit_marker_ttl=max(self.ttl, 1.0),
                )
            )

    async def run(self) -> None:
        """Campaign, lead, or stand by until :meth:`shutdown`."""
        assert self._kv is not None, "start() first"
        watcher: Any = await self._kv.watch(KEY)
        watch = asyncio.create_task(self._watch(watcher))
        try:
            while not self._stopping:
                if self.epoch is None:
                    await self._campaign()
                else:
                    await self._renew()
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watch
            with contextlib.suppress(Exception):
                await watcher.stop()

    async def shutdown(self) -> None:
        """Stop; a leader gives the lease up so a standby takes over at once."""
        self._stopping = True
        self._changed.set()
        self._stopped.set()
        if self.epoch is not None and self._kv is not None:
            with contextlib.suppress(Exception):
                await self._kv.delete(KEY, last=self._revision)
        self._set(None)

    # -- internals ---------------------------------------------------------------------------
    def _value(self, epoch: int | None) -> bytes:
        return orjson.dumps({"node": self.node_id, "epoch": epoch, "at": time.time()})

    def _set(self, epoch: int | None) -> None:
        was = self.epoch is not None
        self.epoch = epoch
        if epoch is not None:
            self.current_epoch = max(self.current_epoch, epoch)
            self.leader = self.node_id
        if was != (epoch is not None):
            log.info(
                "scheduler leadership " + ("gained" if epoch is not None else "lost"),
                node=self.node_id,
                epoch=epoch,
            )
            if self.on_change is not None:
                self.on_change(epoch is not None)

    async def _campaign(self) -> None:
        assert self._kv is not None
        started = time.monotonic()
        try:
            revision = await self._kv.create(KEY, self._value(None))
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.BadRequestError):
            # Someone leads: wait for a change of the key, or for its lease to run out.
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), self.ttl)
            return
        except (nats.errors.Error, OSError) as exc:
            log.warning("leadership campaign failed", error=repr(exc))
            await asyncio.sleep(min(1.0, self.ttl / 3))
            return
        self._revision = revision
        self._valid_until = started + self.ttl * 0.9
        self._set(revision)  # the epoch is the create's revision
        with contextlib.suppress(Exception):  # write the epoch into the value
            self._revision = await self._kv.update(KEY, self._value(revision), last=revision)

    async def _renew(self) -> None:
        assert self._kv is not None
        with contextlib.suppress(TimeoutError):  # woken early by shutdown()
            await asyncio.wait_for(self._stopped.wait(), self.ttl / 3)
        if self._stopping or self.epoch is None:
            return
        started = time.monotonic()
        try:
            self._revision = await asyncio.wait_for(
                self._kv.update(KEY, self._value(self.epoch), last=self._revision), self.ttl / 3
            )
            self._valid_until = started + self.ttl * 0.9
        except Exception as exc:  # lost it (someone else holds it) or cannot reach NATS
            log.warning("leadership not renewed: stepping down", error=repr(exc))
            self._set(None)

    async def _watch(self, watcher: Any) -> None:
        async for entry in watcher:
            if entry is None:
                continue  # the end of the initial values
            if entry.operation in ("DEL", "PURGE") or entry.value in (None, b""):
                self.leader = None
            else:
                info = orjson.loads(entry.value)
                epoch = info.get("epoch") or entry.revision
                self.current_epoch = max(self.current_epoch, int(epoch))
                self.leader = info.get("node")
                if self.epoch is not None and self.current_epoch > self.epoch:
                    self._set(None)  # a newer leader exists: we were deposed
            self._changed.set()
