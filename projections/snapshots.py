"""Read-model snapshots in a JetStream object store: make, list, prune, restore.

A snapshot is a consistent copy of the projector's SQLite database (the
SQLite backup API inside one read transaction, so rows and checkpoint agree)
stored as one object in the bucket ``<root>-snapshots``, named
``<projector name>-<last_seq>.sqlite``. Its description holds the metadata
as JSON: ``last_seq`` (the checkpoint the copy is at), ``digest`` (the
read-model schema digest, :func:`projections.projector.schema_digest`),
``created_at``, ``size``, and ``stream_created`` (when the event stream was
created, so a snapshot of an older incarnation of the stream is never
restored onto a new one).

Restoring replaces the local database file before the projector opens it;
the projector then applies only the tail of the log (docs/decisions.md,
"Snapshots"). Nothing here appends to the event stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import os
import shutil
import sqlite3
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats.js.errors
import orjson
import structlog
from nats.js.api import ObjectMeta, ObjectStoreConfig, StorageType
from nats.js.object_store import ObjectStore

from pantheon_es.errors import InvalidError, NotFoundError, UnavailableError
from pantheon_es.store import EventStore

log = structlog.get_logger(__name__)

#: Snapshots kept per projector name unless told otherwise.
DEFAULT_KEEP = 3
#: A local database this many events behind the newest snapshot is replaced by it
#: (a missing or empty one always is): below it, applying the tail is cheaper.
DEFAULT_RESTORE_GAP = 100_000


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """One stored snapshot (the object's metadata)."""

    object: str
    name: str
    last_seq: int
    kv_seq: int
    digest: str
    created_at: str
    size: int
    stream_created: str | None
    #: How the object is stored: "gzip" (level 1) or "raw" (snapshots made before compression).
    encoding: str = "raw"
    #: Bytes in the bucket (``size`` is the database's size).
    stored_size: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def object_name(name: str, last_seq: int) -> str:
    return f"{name}-{last_seq:015d}.sqlite"


# -- the local database ---------------------------------------------------------------------------


def read_checkpoint(db: sqlite3.Connection, name: str) -> tuple[int, int, str | None]:
    """(last_seq, kv_seq, schema digest) of projector ``name`` in ``db`` ((0, 0, None) if none)."""
    try:
        row = db.execute(
            "SELECT last_seq, kv_seq FROM projector_checkpoint WHERE name = ?", (name,)
        ).fetchone()
        digest = db.execute(
            "SELECT digest FROM projector_schema WHERE name = ?", (name,)
        ).fetchone()
    except sqlite3.OperationalError:  # not initialised
        return 0, 0, None
    last, kv = (int(row[0]), int(row[1])) if row else (0, 0)
    return last, kv, (str(digest[0]) if digest else None)


def local_position(db_path: Path, name: str, digest: str) -> int:
    """How far the local database is, counting one of another schema as empty."""
    if not db_path.exists():
        return 0
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, isolation_level=None)
    try:
        last, _kv, have = read_checkpoint(db, name)
    except sqlite3.DatabaseError:  # not a database: the projector will fail on it, not us
        return 0
    finally:
        db.close()
    return last if have == digest else 0


def copy_database(src: Path, dest: Path, name: str = "main") -> tuple[int, int, str]:
    """A consistent copy of ``src`` at its checkpoint: (last_seq, kv_seq, digest) of the copy.

    The backup API copies every page in one step, inside one read transaction of
    ``src`` (WAL: the projector keeps writing meanwhile). The copy is turned into a
    single rollback-journal file, ready to upload.
    """
    if not src.exists():
        raise NotFoundError(f"no read-model database at {src}")
    with contextlib.suppress(FileNotFoundError):
        dest.unlink()
    source = sqlite3.connect(f"file:{src}?mode=ro", uri=True, isolation_level=None)
    target = sqlite3.connect(dest, isolation_level=None)
    try:
        source.execute("PRAGMA busy_timeout=5000")
        source.backup(target)
        target.execute("PRAGMA journal_mode=DELETE")
        last, kv, digest = read_checkpoint(target, name)
    finally:
        target.close()
        source.close()
    if digest is None or last == 0:
        dest.unlink()
        raise InvalidError(f"{src} holds no read models of projector {name!r} yet")
    return last, kv, digest


def remove_database(path: Path) -> None:
    """Remove a SQLite database with its WAL, shared-memory and journal files."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            Path(f"{path}{suffix}").unlink()


# -- the object store -----------------------------------------------------------------------------


class SnapshotStore:
    """The snapshot bucket of one namespace."""

    def __init__(self, store: EventStore) -> None:
        self.store = store
        self.bucket = store.subjects.snapshot_bucket
        self._obs: ObjectStore | None = None

    async def _open(self, *, create: bool) -> ObjectStore | None:
        if self._obs is not None:
            return self._obs
        js = self.store.js
        try:
            self._obs = await js.object_store(self.bucket)
        except nats.js.errors.BucketNotFoundError:
            if not create:
                return None
            self._obs = await js.create_object_store(
                self.bucket,
                ObjectStoreConfig(
                    description="Pantheon-ES read-model snapshots",
                    storage=StorageType.FILE,
                    replicas=self.store.config.replicas,
                ),
            )
        return self._obs

    async def list_snapshots(self, name: str | None = None) -> list[SnapshotInfo]:
        """Stored snapshots (of projector ``name``, or all), newest first."""
        obs = await self._open(create=False)
        if obs is None:
            return []
        try:
            entries = await obs.list(ignore_deletes=True)
        except nats.js.errors.NotFoundError:
            return []
        out = []
        for entry in entries:
            info = _parse(entry.name, entry.description)
            if info is not None and (name is None or info.name == name):
                out.append(info)
        out.sort(key=lambda s: (s.last_seq, s.created_at), reverse=True)
        return out

    async def upload(self, path: Path, info: SnapshotInfo) -> SnapshotInfo:
        obs = await self._open(create=True)
        assert obs is not None
        meta = ObjectMeta(name=info.object, description=orjson.dumps(info.as_dict()).decode())
        with path.open("rb") as fh:
            await obs.put(info.object, fh, meta=meta)
        return info

    async def prune(self, name: str, keep: int) -> list[str]:
        """Delete all but the newest ``keep`` snapshots of ``name``; the names deleted."""
        if keep < 1:
            raise InvalidError("keep at least one snapshot")
        obs = await self._open(create=False)
        if obs is None:
            return []
        removed = []
        for info in (await self.list_snapshots(name))[keep:]:
            await obs.delete(info.object)
            removed.append(info.object)
        return removed

    async def download(self, info: SnapshotInfo, dest: Path) -> None:
        obs = await self._open(create=False)
        if obs is None:
            raise NotFoundError(f"no snapshot bucket {self.bucket}")
        with dest.open("wb") as fh:
            await obs.get(info.object, writeinto=fh)


def _parse(obj: str, description: str | None) -> SnapshotInfo | None:
    try:
        doc = orjson.loads(description or "")
        return SnapshotInfo(
            object=obj,
            name=str(doc["name"]),
            last_seq=int(doc["last_seq"]),
            kv_seq=int(doc.get("kv_seq", 0)),
            digest=str(doc["digest"]),
            created_at=str(doc["created_at"]),
            size=int(doc["size"]),
            stream_created=doc.get("stream_created"),
            encoding=str(doc.get("encoding", "raw")),
            stored_size=int(doc.get("stored_size", doc["size"])),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        log.warning("ignoring an object that is not a snapshot", object=obj)
        return None


async def _stream_created(store: EventStore) -> tuple[str | None, int]:
    try:
        info = await store.js.stream_info(store.stream)
    except nats.js.errors.NotFoundError:
        raise NotFoundError(f"no event stream {store.stream}") from None
    created = info.created.isoformat() if info.created is not None else None
    return created, int(info.state.last_seq or 0)


# -- make and restore -----------------------------------------------------------------------------


async def make_snapshot(
    store: EventStore,
    db_path: Path,
    *,
    name: str = "main",
    keep: int = DEFAULT_KEEP,
) -> tuple[SnapshotInfo, list[str]]:
    """Copy ``db_path`` at its checkpoint, upload it, keep the newest ``keep``.

    Returns the snapshot and the names of the snapshots pruned.
    """
    if keep < 1:
        raise InvalidError("keep at least one snapshot (--keep >= 1)")
    tmp = db_path.with_name(f"{db_path.name}.snapshot-{os.getpid()}")
    packed = tmp.with_name(tmp.name + ".gz")
    try:
        last, kv, digest = await asyncio.to_thread(copy_database, db_path, tmp, name)
        size = tmp.stat().st_size
        # The stream's head after the copy: the projector may have applied more meanwhile.
        stream_created, head = await _stream_created(store)
        if last > head:
            raise InvalidError(
                f"{db_path} is at sequence {last}, past the stream's last ({head}): "
                "it belongs to another stream"
            )
        await asyncio.to_thread(_gzip, tmp, packed)
        os.replace(packed, tmp)
        info = SnapshotInfo(
            object=object_name(name, last),
            name=name,
            last_seq=last,
            kv_seq=kv,
            digest=digest,
            created_at=datetime.now(UTC).isoformat(),
            size=size,
            stream_created=stream_created,
            encoding="gzip",
            stored_size=tmp.stat().st_size,
        )
        snapshots = SnapshotStore(store)
        await snapshots.upload(tmp, info)
        pruned = await snapshots.prune(name, keep)
    finally:
        for leftover in (tmp, packed):
            leftover.unlink(missing_ok=True)
    log.info("snapshot made", object=info.object, last_seq=info.last_seq, size=info.size)
    return info, pruned


async def newest_usable(store: EventStore, name: str, digest: str) -> SnapshotInfo | None:
    """The newest snapshot of ``name`` with this schema digest that fits the stream."""
    try:
        stream_created, head = await _stream_created(store)
    except NotFoundError:
        return None
    for info in await SnapshotStore(store).list_snapshots(name):
        if info.digest != digest:
            continue
        if info.last_seq > head or (
            info.stream_created is not None
            and stream_created is not None
            and info.stream_created != stream_created
        ):
            continue  # made from another incarnation of the stream
        return info
    return None


async def restore_snapshot(
    store: EventStore,
    db_path: Path,
    *,
    digest: str,
    name: str = "main",
    min_gap: int = DEFAULT_RESTORE_GAP,
) -> SnapshotInfo | None:
    """Replace a missing, other-schema or far-behind local database by the newest snapshot.

    Call it before the database is opened for writing. Returns the snapshot
    restored, or None when the local database is kept.
    """
    try:
        info = await newest_usable(store, name, digest)
    except (nats.errors.Error, OSError) as exc:
        log.warning("snapshot bucket not readable: starting without one", error=repr(exc))
        return None
    if info is None:
        return None
    position = await asyncio.to_thread(local_position, db_path, name, digest)
    if info.last_seq <= position or (position > 0 and info.last_seq - position < min_gap):
        return None
    db_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = db_path.with_name(f"{db_path.name}.restore-{os.getpid()}")
    try:
        await SnapshotStore(store).download(info, tmp)
        if info.encoding == "gzip":
            packed = tmp.with_name(tmp.name + ".gz")
            os.replace(tmp, packed)
            try:
                await asyncio.to_thread(_gunzip, packed, tmp)
            finally:
                packed.unlink(missing_ok=True)
        elif info.encoding != "raw":
            raise UnavailableError(f"snapshot {info.object}: unknown encoding {info.encoding!r}")
        last, _kv, have = await asyncio.to_thread(_checkpoint_of, tmp, name)
        if have != digest or last != info.last_seq:
            raise UnavailableError(
                f"snapshot {info.object} holds sequence {last} digest {have}, "
                f"not what its metadata says ({info.last_seq}, {info.digest})"
            )
        remove_database(db_path)
        os.replace(tmp, db_path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    log.info(
        "read models restored from a snapshot",
        object=info.object,
        last_seq=info.last_seq,
        was_at=position,
    )
    return info


def _gzip(src: Path, dest: Path) -> None:
    """Compress ``src`` into ``dest`` (level 1: a read-model copy shrinks about 4x, fast)."""
    with src.open("rb") as fin, gzip.open(dest, "wb", compresslevel=1) as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)


def _gunzip(src: Path, dest: Path) -> None:
    try:
        with gzip.open(src, "rb") as fin, dest.open("wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise UnavailableError(f"snapshot download {src.name} is not valid gzip: {exc}") from None


def _checkpoint_of(path: Path, name: str) -> tuple[int, int, str | None]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    try:
        return read_checkpoint(db, name)
    finally:
        db.close()
