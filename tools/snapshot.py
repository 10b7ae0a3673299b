"""`pantheon snapshot`: store a copy of the read models in JetStream, list them, prune them.

    pantheon snapshot [--keep 3] [--from-log] [--list] [--json]

Without ``--from-log`` it copies the read-model database of the node on
``--data-dir`` (``projections.db``) at its checkpoint, consistently, while the
node keeps running. With ``--from-log`` it first rebuilds the read models from
the log into a temporary file (for a machine that has no node). Either way it
uploads the copy to the object store ``<root>-snapshots`` and keeps the newest
``--keep``. Read-only against the event log: it never appends.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats

from pantheon_es import connection
from pantheon_es.client import close_connection, discover
from pantheon_es.errors import UnavailableError
from pantheon_es.node import DB_NAME
from pantheon_es.store import EventStore
from pantheon_es.subjects import Subjects
from projections.projector import rebuild
from projections.snapshots import SnapshotStore, make_snapshot

Progress = Callable[[str], None]


async def connect_store(nats_url: str | None, data_dir: Path, root: str) -> EventStore:
    """The event store of the deployment on ``nats_url``, or of the node on ``data_dir``."""
    if nats_url is None:
        info = discover(data_dir)
        nats_url, root = info["nats_url"], info.get("root", root)
    try:
        nc = await connection.connect(
            nats_url, pending_size=256 * 1024 * 1024, max_reconnect_attempts=2
        )
    except (OSError, nats.errors.NoServersError) as exc:
        raise UnavailableError(f"cannot reach NATS at {nats_url}: {exc}") from None
    return EventStore(nc, Subjects(root))


async def snapshot(
    nats_url: str | None,
    data_dir: Path,
    root: str,
    *,
    keep: int,
    from_log: bool = False,
    list_only: bool = False,
    step: Progress | None = None,
) -> dict[str, Any]:
    """Make a snapshot (unless ``list_only``) and describe the bucket afterwards."""
    say = step or (lambda _what: None)
    store = await connect_store(nats_url, data_dir, root)
    try:
        result: dict[str, Any] = {"bucket": store.subjects.snapshot_bucket}
        if not list_only:
            if from_log:
                with tempfile.TemporaryDirectory(prefix="pantheon-snapshot-") as tmp:
                    db = Path(tmp) / DB_NAME
                    say("rebuilding the read models from the log")
                    await rebuild(store, db)
                    say("copying and uploading")
                    info, pruned = await make_snapshot(store, db, keep=keep)
            else:
                say("copying and uploading the read models")
                info, pruned = await make_snapshot(store, data_dir / DB_NAME, keep=keep)
            result["snapshot"] = info.as_dict()
            result["pruned"] = pruned
        result["snapshots"] = [s.as_dict() for s in await SnapshotStore(store).list_snapshots()]
        return result
    finally:
        await close_connection(store.nc)
