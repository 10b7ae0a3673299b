"""One Pantheon-ES node: what ``pantheon up`` runs in one process.

Without a NATS URL it starts the embedded nats-server (store under the data
directory), then connects, provisions the stream and buckets, and runs the
command service, the projector and the query service until asked to stop.
It writes ``<data-dir>/pantheon.json`` so client commands find it, and
removes it on the way out. Stopping goes in reverse order: stop taking
requests, finish the batch in hand, close NATS, stop the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import nats
import orjson
import structlog
from nats.aio.client import Client as NATS

from pantheon_es.client import DISCOVERY_FILE
from pantheon_es.embedded import EmbeddedNats
from pantheon_es.errors import UnavailableError
from pantheon_es.pool import WorkerPool
from pantheon_es.retention import Janitor
from pantheon_es.scheduler import Scheduler, SchedulerConfig
from pantheon_es.service import CommandService, ServiceConfig
from pantheon_es.store import EventStore, StoreConfig
from pantheon_es.subjects import Subjects
from projections.projector import Projector
from projections.query import QueryService

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class NodeConfig:
    data_dir: Path = Path(".pantheon")
    nats_url: str | None = None
    root: str = "pantheon"
    #: fsync policy of the embedded server: None keeps the shipped config's value.
    sync_interval: str | None = None
    store: StoreConfig = field(default_factory=StoreConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    projector_batch: int = 2000
    #: Worker processes the node starts and supervises (0: none; run `pantheon worker`).
    workers: int = 2
    worker_tenant: str = "default"
    worker_slots: int = 16
    #: Archive finished tasks this many seconds after they finished (None: keep).
    retention: float | None = None


def tune_gc() -> None:
    """Freeze what start-up allocated and collect the young generation less often.

    The projector and the service allocate a few objects per event; with the
    default thresholds CPython's full collections rescan every long-lived
    object (modules, models, caches) over and over. Measured on the projector
    catch-up: 14.4k events/s by default, 18.1k after this (docs/decisions.md).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


class Node:
    """Embedded server (optional) + command service + projector + query service."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.subjects = Subjects(config.root)
        self.server: EmbeddedNats | None = None
        self.nc: NATS | None = None
        self.store: EventStore | None = None
        self.service: CommandService | None = None
        self.projector: Projector | None = None
        self.query: QueryService | None = None
        self.scheduler: Scheduler | None = None
        self.janitor: Janitor | None = None
        self.pool: WorkerPool | None = None
        self.nats_url = config.nats_url or ""
        self._stop = asyncio.Event()
        self._started = False

    @property
    def discovery_path(self) -> Path:
        return self.config.data_dir / DISCOVERY_FILE

    async def __aenter__(self) -> Node:
        try:
            await self.start()
        except BaseException:
            await self.shutdown()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    async def start(self) -> None:
        cfg = self.config
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        if cfg.nats_url is None:
            self.server = EmbeddedNats(cfg.data_dir / "nats", sync_interval=cfg.sync_interval)
            await asyncio.to_thread(self.server.start)
            self.nats_url = self.server.url
            log.info("embedded nats-server started", url=self.nats_url, pid=self.server.pid)
        try:
            self.nc = await nats.connect(
                self.nats_url,
                name="pantheon-node",
                pending_size=64 * 1024 * 1024,
                max_reconnect_attempts=-1,
                error_cb=_log_nats_error,
            )
        except (OSError, nats.errors.NoServersError) as exc:
            raise UnavailableError(f"cannot reach NATS at {self.nats_url}: {exc}") from None
        self.store = EventStore(self.nc, self.subjects, cfg.store)
        await self.store.provision()
        self.projector = Projector(
            self.store, cfg.data_dir / "projections.db", batch_size=cfg.projector_batch
        )
        await self.projector.open()
        self.query = QueryService(self.nc, self.store, self.projector)
        await self.query.start()
        self.service = CommandService(self.nc, self.store, cfg.service)
        await self.service.start()
        # The scheduler starts from the read models at the projector's checkpoint and
        # then sees every batch the projector decodes (one read of the log for both).
        self.scheduler = Scheduler(self.nc, self.service, self.subjects, cfg.scheduler)
        assert self.projector.db is not None
        head = await self.store.last_seq()
        self.scheduler.bootstrap(self.projector.db, self.projector.position, head)
        self.projector.sinks.append(self.scheduler.feed)
        if cfg.retention is not None:
            self.janitor = Janitor(self.service, self.projector.db, cfg.retention)
            self.projector.sinks.append(self.janitor.feed)
        if cfg.workers > 0:
            self.pool = WorkerPool(
                self.nats_url,
                cfg.root,
                cfg.data_dir,
                size=cfg.workers,
                tenant=cfg.worker_tenant,
                slots=cfg.worker_slots,
            )
            await self.pool.start()
        self._write_discovery()
        self._started = True
        tune_gc()
        log.info("pantheon node ready", nats_url=self.nats_url, data_dir=str(cfg.data_dir))

    def _write_discovery(self) -> None:
        info = {
            "nats_url": self.nats_url,
            "root": self.config.root,
            "pid": os.getpid(),
            "embedded": self.server is not None,
            "nats_server_pid": self.server.pid if self.server else None,
            "started_at": datetime.now(UTC).isoformat(),
        }
        tmp = self.discovery_path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(info, option=orjson.OPT_INDENT_2))
        tmp.replace(self.discovery_path)

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Run every part until :meth:`request_stop`; the first failure stops them all."""
        assert self.projector and self.service and self.query
        async with asyncio.TaskGroup() as group:
            projector = group.create_task(self.projector.run(), name="projector")
            group.create_task(self.service.run(), name="command-service")
            group.create_task(self.query.run(), name="query-service")
            if self.scheduler is not None:
                group.create_task(self.scheduler.run(), name="scheduler")
            if self.janitor is not None:
                group.create_task(self.janitor.run(), name="janitor")
            if self.pool is not None:
                group.create_task(self.pool.supervise(), name="worker-pool")
            stop = group.create_task(self._stop.wait(), name="stop")
            await asyncio.wait({projector, stop}, return_when=asyncio.FIRST_COMPLETED)
            await self.shutdown()

    async def shutdown(self) -> None:
        """Stop everything in reverse order. Idempotent."""
        self._stop.set()
        if self.pool is not None:  # workers first: they hand back leases through the service
            await self.pool.stop()
        if self.janitor is not None:
            self.janitor.shutdown()
        if self.scheduler is not None:
            await self.scheduler.shutdown()
        if self.service is not None:
            await self.service.shutdown()
        if self.query is not None:
            await self.query.shutdown()
        if self.projector is not None:
            await self.projector.shutdown()
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.drain()
        if self.server is not None:
            await asyncio.to_thread(self.server.stop)
            log.info("embedded nats-server stopped")
            self.server = None
        if self._started:
            with contextlib.suppress(FileNotFoundError):
                self.discovery_path.unlink()
            self._started = False


async def _log_nats_error(exc: Exception) -> None:
    log.warning("nats error", error=repr(exc))
