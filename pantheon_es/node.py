"""One Pantheon-ES node: what ``pantheon up`` runs.

Without a NATS URL it starts the embedded nats-server (store under the data
directory); then it connects, provisions the stream and buckets, and runs the
command service and the scheduler in this process, with the read side
(projector, query service, janitor) either in a child process of its own
(``read_side="process"``, what ``pantheon up`` does, so projection work never
delays a command) or in this process (``"inline"``: tests, the demo). Local
worker processes are started and supervised beside it.

It writes ``<data-dir>/pantheon.json`` so client commands find it, and removes
it on the way out. Stopping goes in reverse order: workers hand back their
leases, the scheduler and the service stop, the read side finishes its batch,
NATS is closed and the embedded server stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import nats
import orjson
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from pydantic import ValidationError

from pantheon_es import connection
from pantheon_es.client import DISCOVERY_FILE, PantheonClient, close_connection
from pantheon_es.embedded import EmbeddedNats
from pantheon_es.endpoint import invalid, parse_body, respond
from pantheon_es.errors import PantheonError, UnavailableError
from pantheon_es.events import decode_record
from pantheon_es.gc_tuning import tune_gc
from pantheon_es.leader import Leadership
from pantheon_es.pool import Supervisor, read_side_child, worker_children
from pantheon_es.scheduler import Scheduler, SchedulerConfig
from pantheon_es.schema import WhyTask
from pantheon_es.service import CommandService, ServiceConfig
from pantheon_es.store import EventFeed, EventStore, StoreConfig
from pantheon_es.subjects import Subjects
from projections.projector import Projector, current_digest
from projections.runner import ReadSide
from projections.snapshots import restore_snapshot

log = structlog.get_logger(__name__)

DB_NAME = "projections.db"


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
    #: Where the read side runs: a child process, or this process.
    read_side: Literal["process", "inline"] = "inline"
    #: Worker processes the node starts and supervises (0: none; run `pantheon worker`).
    workers: int = 2
    worker_tenant: str = "default"
    worker_slots: int = 16
    #: Other tenants the local workers also serve ('*': every tenant; `--serve-tenant`).
    worker_serve_tenants: tuple[str, ...] = ()
    #: Archive finished tasks this many seconds after they finished (None: keep).
    retention: float | None = None
    #: The read side snapshots its read models every this many events (None: never).
    snapshot_every: int | None = None
    #: With the read side in its own process: seconds a small batch waits for more events
    #: unless a query waits (None: that process's default, `pantheon projector --linger`).
    read_linger: float | None = None
    #: Scheduler leadership lease, seconds (0: no election; this node always schedules).
    leader_ttl: float = 5.0


class Node:
    """Embedded server (optional), command service, scheduler, read side, local workers."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.subjects = Subjects(config.root)
        self.server: EmbeddedNats | None = None
        self.nc: NATS | None = None
        self.store: EventStore | None = None
        self.service: CommandService | None = None
        self.scheduler: Scheduler | None = None
        self.read: ReadSide | None = None  # inline read side
        self.children: Supervisor | None = None
        self.nats_url = config.nats_url or ""
        self._feed: EventFeed | None = None  # the scheduler's own, with a read side elsewhere
        self._why_sub: Any = None
        self.leadership: Leadership | None = None
        self._stop = asyncio.Event()
        self._started = False
        self._shutting_down: asyncio.Future[None] | None = None  # the one shutdown

    @property
    def projector(self) -> Projector | None:
        return self.read.projector if self.read is not None else None

    @property
    def db_path(self) -> Path:
        return self.config.data_dir / DB_NAME

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
            self.nc = await connection.connect(
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
        self.service = CommandService(self.nc, self.store, cfg.service)
        await self.service.start()
        self.scheduler = Scheduler(self.nc, self.service, self.subjects, cfg.scheduler)
        self.service.admission = self.scheduler.admit
        self.service.placer = self.scheduler
        if cfg.leader_ttl > 0:
            self.leadership = Leadership(
                self.nc.jetstream(),
                self.subjects,
                ttl=cfg.leader_ttl,
                replicas=cfg.store.replicas,
                on_change=self.scheduler.on_leadership,
            )
            await self.leadership.start()
            self.scheduler.leadership = self.leadership
            self.service.leadership = self.leadership
        self._why_sub = await self.nc.subscribe(
            self.subjects.all_scheduler, queue="pantheon-scheduler", cb=self._on_why
        )
        self.children = Supervisor(cfg.data_dir / "logs")
        if cfg.read_side == "inline":
            # The scheduler starts from the read models at the projector's checkpoint and then
            # sees every batch the projector decodes: one read of the log for both.
            self.read = ReadSide(
                self.store,
                self.db_path,
                batch_size=cfg.projector_batch,
                retention=cfg.retention,
                commands=self.service,
                snapshot_every=cfg.snapshot_every,
            )
            await self.read.start()
            projector = self.read.projector
            assert projector.db is not None
            self.scheduler.bootstrap(projector.db, projector.position, await self.store.last_seq())
            projector.sinks.append(self.scheduler.feed)
        else:
            # Restore a snapshot here, before the read side starts, so that the scheduler
            # below bootstraps from it too (the child then finds the database current).
            await restore_snapshot(self.store, self.db_path, digest=current_digest())
            await self.children.add(
                read_side_child(
                    self.nats_url,
                    cfg.root,
                    cfg.data_dir,
                    cfg.retention,
                    cfg.snapshot_every,
                    linger=cfg.read_linger,
                )
            )
            position = await asyncio.to_thread(
                self._bootstrap_from_disk, await self.store.last_seq()
            )
            # Started by run(): nothing drains it before, and a long log would pile up
            # in the client (slow consumer) while the read side catches up.
            self._feed = self.store.feed(from_seq=position + 1)
            await self._wait_for_queries()
        for child in worker_children(
            self.nats_url,
            cfg.root,
            cfg.data_dir,
            size=cfg.workers,
            tenant=cfg.worker_tenant,
            slots=cfg.worker_slots,
            serve_tenants=cfg.worker_serve_tenants,
        ):
            await self.children.add(child)
        self._write_discovery()
        self._started = True
        tune_gc()
        log.info("pantheon node ready", nats_url=self.nats_url, data_dir=str(cfg.data_dir))

    def _bootstrap_from_disk(self, head: int) -> int:
        """Load the scheduler from one read snapshot of the read models; their checkpoint."""
        assert self.scheduler is not None
        if not self.db_path.exists():
            self.scheduler.bootstrap(None, 0, head)
            return 0
        db = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, isolation_level=None)
        try:
            db.execute("BEGIN")  # one snapshot: checkpoint and rows agree
            try:
                row = db.execute(
                    "SELECT last_seq FROM projector_checkpoint WHERE name = 'main'"
                ).fetchone()
            except sqlite3.OperationalError:  # created but not initialised yet
                row = None
            position = int(row[0]) if row else 0
            self.scheduler.bootstrap(db if row else None, position, head)
            db.execute("COMMIT")
            return position
        finally:
            db.close()

    async def _wait_for_queries(self, timeout: float = 60.0) -> None:
        """The read side answers queries (so clients never meet "no responders").

        ``min_seq=0``: an answer from read models still catching up counts (a node on a
        long log without a snapshot serves commands meanwhile).
        """
        assert self.nc is not None
        client = PantheonClient(self.nc, subjects=self.subjects, timeout=2)
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                await client.list_tasks(limit=1, min_seq=0)
                return
            except UnavailableError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.05)
            except PantheonError:
                return  # it answered

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

    async def _on_why(self, msg: Msg) -> None:
        """``<root>.sched.<tenant>.why``: the scheduler's live view of one task."""

        async def answer() -> dict[str, Any]:
            assert self.scheduler is not None
            tenant = msg.subject.split(".")[-2]
            body = parse_body(msg.data, 4096)
            try:
                question = WhyTask.model_validate(body)
            except ValidationError as exc:
                raise invalid(WhyTask.__name__, exc) from None
            return self.scheduler.why(tenant, question.task_id)

        await respond(msg, answer())

    def request_stop(self) -> None:
        self._stop.set()

    async def _tail_for_scheduler(self) -> None:
        assert self._feed is not None and self.scheduler is not None
        await self._feed.start()
        while True:
            batch = await self._feed.next_batch(2000)
            if not batch:
                return  # the feed was stopped
            records = []
            for raw in batch:
                try:
                    records.append(decode_record(raw.data, raw.seq))
                except (ValueError, PantheonError) as err:  # not ours to judge: skip
                    log.warning(
                        "scheduler skips an event it cannot read", seq=raw.seq, error=str(err)
                    )
            self.scheduler.feed(records)

    async def run(self) -> None:
        """Run every part until :meth:`request_stop`; the first failure stops them all."""
        assert self.service and self.scheduler and self.children
        async with asyncio.TaskGroup() as group:
            parts = [
                group.create_task(self.service.run(), name="command-service"),
                group.create_task(self.scheduler.run(), name="scheduler"),
                group.create_task(self.children.supervise(), name="children"),
            ]
            if self.leadership is not None:
                parts.append(group.create_task(self.leadership.run(), name="leadership"))
            if self.read is not None:
                parts.append(group.create_task(self.read.run(), name="read-side"))
            if self._feed is not None:
                parts.append(group.create_task(self._tail_for_scheduler(), name="scheduler-feed"))
            stop = group.create_task(self._stop.wait(), name="stop")
            await asyncio.wait({*parts, stop}, return_when=asyncio.FIRST_COMPLETED)
            await self.shutdown()

    async def shutdown(self) -> None:
        """Stop everything in reverse order. Idempotent and safe to call concurrently
        (``run()`` shuts down when stopped, and its owner may too): every caller waits
        for the one shutdown, which a cancelled caller does not cut short."""
        self._stop.set()
        if self._shutting_down is None:
            self._shutting_down = asyncio.ensure_future(self._shutdown())
            self._shutting_down.add_done_callback(_log_shutdown_error)
        await asyncio.shield(self._shutting_down)

    async def _shutdown(self) -> None:
        if self.children is not None:  # workers first: they hand back leases through the service
            workers = [n for n in self.children.procs if n != "read-side"]
            await self.children.stop(workers)
        if self.leadership is not None:  # a standby takes over at once
            await self.leadership.shutdown()
        if self.scheduler is not None:
            await self.scheduler.shutdown()
        if self._feed is not None:
            await self._feed.stop()
        if self.service is not None:
            await self.service.shutdown()
        if self.children is not None:
            await self.children.stop()
        if self.read is not None:
            await self.read.shutdown()
        if self.nc is not None and not self.nc.is_closed:
            await close_connection(self.nc)
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


def _log_shutdown_error(task: asyncio.Future[None]) -> None:
    """Log a failed shutdown (also retrieves it when every caller was cancelled)."""
    if not task.cancelled() and task.exception() is not None:
        log.error("node shutdown failed", error=repr(task.exception()))
