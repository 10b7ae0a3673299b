"""The read side as one unit: projector, query service and (optionally) the janitor.

``pantheon up`` runs it in a process of its own (``pantheon projector``), so
folding the log into SQLite and the KV bucket never delays a command; a node
built in-process (tests, the demo) runs the same unit inside the node.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import structlog
from nats.aio.client import Client as NATS

from pantheon_es import connection
from pantheon_es.client import PantheonClient, close_connection
from pantheon_es.gc_tuning import tune_gc
from pantheon_es.retention import Janitor
from pantheon_es.store import EventStore, StoreConfig
from pantheon_es.subjects import Subjects
from pantheon_es.tasks import ArchiveTask
from projections.projector import Projector
from projections.query import QueryService
from projections.snapshots import make_snapshot

log = structlog.get_logger(__name__)


class RemoteCommands:
    """What the janitor needs of a command service, over NATS (for a read side of its own)."""

    def __init__(self, nc: NATS, subjects: Subjects) -> None:
        self.nc = nc
        self.subjects = subjects

    async def execute(self, tenant: str, command: ArchiveTask) -> dict[str, Any]:
        client = PantheonClient(self.nc, tenant=tenant, subjects=self.subjects, timeout=30)
        return await client.archive_task(command.task_id, command.reason)


class ReadSide:
    """Projector + query service (+ janitor with a retention) on one connection."""

    def __init__(
        self,
        store: EventStore,
        db_path: Path,
        *,
        batch_size: int = 2000,
        retention: float | None = None,
        commands: Any = None,
        snapshot_every: int | None = None,
        linger: float = 0.0,
    ) -> None:
        self.store = store
        #: Make a snapshot each time this many more events are applied (None: never).
        self.snapshot_every = snapshot_every
        self._snapshotter: asyncio.Task[None] | None = None
        self.projector = Projector(
            store, db_path, batch_size=batch_size, snapshots=True, linger=linger
        )
        self.query = QueryService(store.nc, store, self.projector)
        self.retention = retention
        self.commands = commands
        self.janitor: Janitor | None = None

    async def start(self) -> None:
        await self.projector.open()
        await self.query.start()
        if self.retention is not None:
            assert self.projector.db is not None
            commands = self.commands or RemoteCommands(self.store.nc, self.store.subjects)
            self.janitor = Janitor(
                commands, self.projector.db, self.retention, applied=self.projector.wait_for
            )
            self.projector.sinks.append(self.janitor.feed)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self.projector.run(), name="projector")
            group.create_task(self.query.run(), name="query-service")
            if self.janitor is not None:
                group.create_task(self.janitor.run(), name="janitor")
            if self.snapshot_every:
                self._snapshotter = group.create_task(
                    self._snapshots(self.snapshot_every), name="snapshots"
                )

    async def _snapshots(self, every: int) -> None:
        """A snapshot each ``every`` events applied, made beside the projector (docs/decisions.md).

        The copy runs in a thread on a connection of its own (WAL: the projector keeps
        writing); the upload interleaves with the projector on this loop. A failure is
        logged and the next one tried ``every`` events later.
        """
        projector = self.projector
        done = projector.position
        while True:
            while not await projector.wait_for(done + every, timeout=3600, hurry=False):
                pass
            try:
                info, _pruned = await make_snapshot(self.store, projector.db_path)
                done = info.last_seq
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("periodic snapshot failed", error=repr(exc))
                done = projector.position

    async def shutdown(self) -> None:
        if self._snapshotter is not None:
            self._snapshotter.cancel()
        if self.janitor is not None:
            self.janitor.shutdown()
        await self.query.shutdown()
        await self.projector.shutdown()


async def run_read_side(
    nats_url: str,
    root: str,
    data_dir: Path,
    retention: float | None,
    stop: asyncio.Event,
    grace: float = 15.0,
    snapshot_every: int | None = None,
    linger: float = 0.0,
) -> None:
    """The `pantheon projector` process: the read side until ``stop`` is set.

    Once ``stop`` is set, it has ``grace`` seconds to finish (also when stop comes during
    start-up, or the NATS server is gone and would be reconnected to for ever).
    """
    running = asyncio.Event()
    main = asyncio.create_task(
        _read_side(nats_url, root, data_dir, retention, stop, running, snapshot_every, linger)
    )
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({main, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if not main.done() and not running.is_set():  # still starting: nothing to flush
        main.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await main
        return
    if not main.done():
        try:
            await asyncio.wait_for(main, grace)
        except TimeoutError:
            log.warning("read side did not stop in time; exiting", grace_s=grace)
            return
    main.result()  # the first failure of the read side, if any


async def _read_side(
    nats_url: str,
    root: str,
    data_dir: Path,
    retention: float | None,
    stop: asyncio.Event,
    running: asyncio.Event,
    snapshot_every: int | None = None,
    linger: float = 0.0,
) -> None:
    nc = await connection.connect(
        nats_url,
        name="pantheon-projector",
        pending_size=256 * 1024 * 1024,
        max_reconnect_attempts=-1,
    )
    store = EventStore(nc, Subjects(root), StoreConfig())
    await store.provision()
    side = ReadSide(
        store,
        data_dir / "projections.db",
        retention=retention,
        snapshot_every=snapshot_every,
        linger=linger,
    )
    await side.start()
    tune_gc()  # a process of its own: the node's GC settings (docs/decisions.md)
    log.info("read side running", db=str(data_dir / "projections.db"))
    running.set()
    runner = asyncio.create_task(side.run())
    waiter = asyncio.create_task(stop.wait())
    await asyncio.wait({runner, waiter}, return_when=asyncio.FIRST_COMPLETED)
    await side.shutdown()
    with contextlib.suppress(asyncio.CancelledError):
        await runner  # re-raises the first failure of the read side, if any
    waiter.cancel()
    await close_connection(nc)
