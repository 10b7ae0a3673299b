"""A Python client: commands and queries over NATS, typed errors back.

Any language can do the same with a NATS client: publish a JSON body to the
subject, read ``{"ok": ...}`` from the reply (see docs/protocol.md).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import nats
import nats.errors
import orjson
from nats.aio.client import Client as NATS

from pantheon_es.errors import PantheonError, UnavailableError, error_from_reply
from pantheon_es.subjects import Subjects

DISCOVERY_FILE = "pantheon.json"


def discover(data_dir: Path | str) -> dict[str, Any]:
    """The NATS URL and namespace of the ``pantheon up`` running on ``data_dir``."""
    path = Path(data_dir) / DISCOVERY_FILE
    try:
        info = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise UnavailableError(
            f"no running `pantheon up` found in {Path(data_dir).resolve()}: start one with "
            "`pantheon up`, or pass --nats-url (env PANTHEON_NATS_URL)"
        ) from None
    except orjson.JSONDecodeError as exc:
        raise UnavailableError(f"{path} is not readable: {exc}") from None
    pid = int(info.get("pid", 0))
    if pid and not _alive(pid):
        raise UnavailableError(
            f"the `pantheon up` recorded in {path} (pid {pid}) is not running; start it again"
        )
    return dict(info)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class PantheonClient:
    """Sends commands and queries for one tenant."""

    def __init__(
        self,
        nc: NATS,
        *,
        tenant: str = "default",
        subjects: Subjects | None = None,
        timeout: float = 10.0,
        actor: str | None = None,
    ) -> None:
        self.nc = nc
        self.tenant = tenant
        self.subjects = subjects or Subjects()
        self.timeout = timeout
        self.actor = actor

    @classmethod
    async def connect(
        cls, url: str, *, tenant: str = "default", root: str = "pantheon", **kwargs: Any
    ) -> PantheonClient:
        try:
            nc = await nats.connect(
                url, max_reconnect_attempts=3, connect_timeout=3, allow_reconnect=True
            )
        except (OSError, nats.errors.NoServersError, TimeoutError) as exc:
            raise UnavailableError(f"cannot reach NATS at {url}: {exc}") from None
        return cls(nc, tenant=tenant, subjects=Subjects(root), **kwargs)

    async def close(self) -> None:
        await self.nc.close()

    async def __aenter__(self) -> PantheonClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def request(self, subject: str, body: dict[str, Any] | bytes) -> dict[str, Any]:
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        try:
            msg = await self.nc.request(subject, data, timeout=self.timeout)
        except nats.errors.NoRespondersError:
            raise UnavailableError(f"nothing serves {subject}: is `pantheon up` running?") from None
        except nats.errors.TimeoutError:
            raise UnavailableError(f"no reply on {subject} within {self.timeout}s") from None
        reply = orjson.loads(msg.data)
        if reply.get("ok"):
            return dict(reply.get("result") or {})
        raise error_from_reply(reply.get("error") or {})

    async def command(self, aggregate: str, verb: str, body: dict[str, Any]) -> dict[str, Any]:
        if self.actor and "actor" not in body:
            body = {**body, "actor": self.actor}
        return await self.request(self.subjects.command(self.tenant, aggregate, verb), body)

    async def query(
        self, model: str, verb: str, body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        return await self.request(self.subjects.query(self.tenant, model, verb), body or {})

    # -- tasks ------------------------------------------------------------------------------------
    async def submit_task(
        self,
        name: str,
        executor: dict[str, Any],
        *,
        priority: str | int = "medium",
        resources: dict[str, Any] | None = None,
        labels: dict[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "executor": executor, "priority": priority}
        if resources:
            body["resources"] = resources
        if labels:
            body["labels"] = labels
        if idempotency_key:
            body["idempotency_key"] = idempotency_key
        return await self.command("task", "submit", body)

    async def cancel_task(self, task_id: str, reason: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"task_id": task_id}
        if reason:
            body["reason"] = reason
        return await self.command("task", "cancel", body)

    async def get_task(self, task_id: str) -> dict[str, Any]:
        return await self.query("task", "get", {"task_id": task_id})

    async def list_tasks(self, **filters: Any) -> dict[str, Any]:
        return await self.query("task", "list", {k: v for k, v in filters.items() if v is not None})


__all__ = ["PantheonClient", "PantheonError", "discover"]
