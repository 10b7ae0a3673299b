"""Cleanup of finished tasks: on request, and automatically by a retention setting.

Archiving appends ``TaskArchived`` to each task; the read models drop the task
(and the agent's messages); the log keeps the whole history, so an audit or a
replay still sees it. (The orchestrator this replaces only forgot finished
agents in memory and loaded them again on restart.)

* ``CleanupTasks`` (``pantheon.cmd.<tenant>.task.cleanup``, ``pantheon cleanup``)
  archives every task of the tenant finished more than N minutes ago.
* :class:`Janitor` does the same on its own, for every tenant, with the node's
  retention: one timer at the earliest moment a finished task becomes due,
  re-armed from the event feed; it never scans on an interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from pydantic import Field

from pantheon_es.client import PantheonClient
from pantheon_es.commands import BulkCommand
from pantheon_es.errors import ConflictError, NotFoundError
from pantheon_es.events import EventRecord
from pantheon_es.tasks import ArchiveTask
from projections.tasks import FINISHED_ROWS

log = structlog.get_logger(__name__)

FINISHED = ("completed", "failed", "cancelled", "timed_out", "skipped")
FINISHING_EVENTS = frozenset({"TaskCompleted", "TaskFailed", "TaskTimedOut", "TaskCancelled"})


class CleanupTasks(BulkCommand, aggregate="task", verb="cleanup"):
    """Archive the tenant's tasks that finished more than ``older_than_minutes`` ago."""

    older_than_minutes: float = Field(ge=0, le=10 * 365 * 24 * 60)
    limit: int = Field(100_000, ge=1, le=1_000_000, description="Archive at most this many.")

    async def run(self, service: Any, tenant: str) -> dict[str, Any]:
        cutoff = datetime.now(UTC) - timedelta(minutes=self.older_than_minutes)
        reason = f"cleanup: finished more than {self.older_than_minutes:g} min ago"
        archived = await archive_finished(service, tenant, cutoff, reason, self.limit)
        return {
            "archived": len(archived),
            "task_ids": archived[:1000],
            "cutoff": cutoff.isoformat(),
        }


async def archive_finished(
    service: Any, tenant: str, cutoff: datetime, reason: str, limit: int
) -> list[str]:
    """Archive tasks of ``tenant`` finished before ``cutoff``, oldest first."""
    client = PantheonClient(service.nc, tenant=tenant, subjects=service.subjects, timeout=30)
    archived: list[str] = []
    while len(archived) < limit:
        found = await client.list_tasks(
            status=list(FINISHED),
            finished_before=cutoff.isoformat(),
            order="oldest",
            limit=min(500, limit - len(archived)),
        )
        batch = [t["id"] for t in found["items"]]
        if not batch:
            break
        done = await asyncio.gather(
            *(_archive(service, tenant, task_id, reason) for task_id in batch)
        )
        archived += [task_id for task_id, ok in zip(batch, done, strict=True) if ok]
        if not any(done):
            break  # nothing could be archived: do not loop on the same page
    return archived


async def _archive(service: Any, tenant: str, task_id: str, reason: str) -> bool:
    try:
        await service.execute(tenant, ArchiveTask(task_id=task_id, reason=reason))
        return True
    except (NotFoundError, ConflictError):  # archived or changed meanwhile
        return False


class Janitor:
    """Archives finished tasks once they are older than ``retention`` seconds."""

    def __init__(
        self,
        service: Any,
        db: sqlite3.Connection,
        retention: float,
        applied: Callable[[int], Awaitable[Any]] | None = None,
    ) -> None:
        self.service = service
        self.db = db  # the projector's connection (same thread, read only here)
        self.retention = retention
        #: Waits until the projector has applied events up to a sequence (its wait_for).
        self.applied = applied
        self._due: datetime | None = None
        self._wake = asyncio.Event()
        self._woken_by = 0  # the sequence of the finishing event that woke it
        self._stopping = False

    def feed(self, records: list[EventRecord]) -> None:
        """Projector sink: the first task to finish arms the timer when none is armed."""
        if self._due is None:
            finishing = [r.seq for r in records if r.type in FINISHING_EVENTS]
            if finishing:
                # Sinks see a batch before it is written: run() waits for it first.
                self._woken_by = max(self._woken_by, finishing[-1])
                self._wake.set()

    def _next_due(self) -> datetime | None:
        row = self.db.execute(
            f"SELECT min(finished_at) FROM {FINISHED_ROWS} WHERE finished_at IS NOT NULL"
        ).fetchone()
        if not row or row[0] is None:
            return None
        return datetime.fromisoformat(row[0]) + timedelta(seconds=self.retention)

    async def run(self) -> None:
        while not self._stopping:
            if self._woken_by and self.applied is not None:
                await self.applied(self._woken_by)
            self._due = self._next_due()
            timeout = None
            if self._due is not None:
                timeout = max(0.0, (self._due - datetime.now(UTC)).total_seconds())
            self._wake.clear()
            if timeout is None or timeout > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
                continue
            if await self._sweep() == 0:
                # Due tasks that would not archive: do not spin on them.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._wake.wait(), min(60.0, max(1.0, self.retention / 10))
                    )

    async def _sweep(self) -> int:
        """Archive what is due; the last listing waits for the read models to show it."""
        cutoff = datetime.now(UTC) - timedelta(seconds=self.retention)
        stamp = cutoff.isoformat().replace("+00:00", "Z")
        tenants = [
            r[0]
            for r in self.db.execute(
                f"SELECT DISTINCT tenant FROM {FINISHED_ROWS} "
                "WHERE finished_at IS NOT NULL AND finished_at < ?",
                (stamp,),
            ).fetchall()
        ]
        reason = f"retention: finished more than {self.retention:g} s ago"
        total = 0
        for tenant in tenants:
            archived = await archive_finished(self.service, tenant, cutoff, reason, 10_000)
            log.info("retention archived finished tasks", tenant=tenant, count=len(archived))
            total += len(archived)
        return total

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
