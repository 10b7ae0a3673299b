"""Lease reports in bulk: one request carries what a worker has ready (``task.report``).

Under load a worker finishes many tasks in the same turn of its event loop;
sending each ``complete`` (or ``start``, ``heartbeat``, ...) as its own request
costs a request, a reply and their handling on every side. :class:`ReportTasks`
carries several: each item is the body of the single command of its verb,
validated, decided and appended on its own exactly as if it had come alone,
and answered in order with the reply that command would have had. One bad item
is refused alone; the others go on. :class:`ReportBatcher` is the worker's side:
reports handed to it in one loop turn leave as one request (a lone report as
its ordinary single command). docs/decisions.md, "Lease reports in bulk".
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pantheon_es.commands import BulkCommand
from pantheon_es.endpoint import invalid
from pantheon_es.errors import InternalError, PantheonError, error_from_reply
from pantheon_es.tasks import (
    CompleteTask,
    FailTask,
    Heartbeat,
    ReleaseTask,
    ReportProgress,
    StartTask,
    _LeaseReport,
)

log = structlog.get_logger(__name__)

#: Reports one request may carry.
MAX_REPORTS = 256

ReportVerb = Literal["start", "heartbeat", "progress", "complete", "fail", "release"]
REPORTS: dict[str, type[_LeaseReport]] = {
    "start": StartTask,
    "heartbeat": Heartbeat,
    "progress": ReportProgress,
    "complete": CompleteTask,
    "fail": FailTask,
    "release": ReleaseTask,
}


class LeaseReportItem(BaseModel):
    """One report: the verb of its single command and that command's body."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    verb: ReportVerb
    body: dict[str, Any] = Field(
        description="The body of `task.<verb>` (task_id, lease_id, fencing_token, ...)."
    )


class ReportTasks(BulkCommand, aggregate="task", verb="report"):
    """Several lease reports (start, heartbeat, progress, complete, fail, release) in one
    request. Each is decided on its own; ``replies`` answers them in order, each as
    ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": ...}`` like its single
    command's reply."""

    reports: list[LeaseReportItem] = Field(min_length=1, max_length=MAX_REPORTS)

    async def run(self, service: Any, tenant: str) -> dict[str, Any]:
        replies = await asyncio.gather(*(_one(service, tenant, item) for item in self.reports))
        return {"replies": replies}


async def _one(service: Any, tenant: str, item: LeaseReportItem) -> dict[str, Any]:
    cls = REPORTS[item.verb]
    try:
        command = cls.model_validate(item.body)
    except ValidationError as exc:
        return invalid(cls.__name__, exc).to_reply()
    try:
        return {"ok": True, "result": await service.execute(tenant, command)}
    except PantheonError as err:
        return err.to_reply()
    except Exception as exc:  # a bug must not cost the other reports their answers
        log.exception("report failed unexpectedly", verb=item.verb)
        return InternalError(f"internal error: {type(exc).__name__}").to_reply()


_Queued = tuple[str, dict[str, Any], "asyncio.Future[Any]"]


class ReportBatcher:
    """The worker's side: reports sent in one loop turn leave as one request per client.

    :meth:`send` returns what the single command would (its result, or raises its
    typed error); a failure of the whole request (no reply) raises for every
    report in it.
    """

    def __init__(self, max_reports: int = MAX_REPORTS) -> None:
        self.max_reports = max_reports
        #: id(client) -> (client, [(verb, body, future)]): this loop turn's reports.
        self._queued: dict[int, tuple[Any, list[_Queued]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def send(self, client: Any, verb: str, body: dict[str, Any]) -> dict[str, Any]:
        """Report through ``client`` (a :class:`~pantheon_es.client.PantheonClient`)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        if not self._queued:
            loop.call_soon(self._flush)
        self._queued.setdefault(id(client), (client, []))[1].append((verb, body, future))
        return await future

    def _flush(self) -> None:
        queued, self._queued = self._queued, {}
        for client, items in queued.values():
            for i in range(0, len(items), self.max_reports):
                task = asyncio.create_task(self._request(client, items[i : i + self.max_reports]))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _request(self, client: Any, items: list[_Queued]) -> None:
        if len(items) == 1:  # alone: the ordinary command, no bulk envelope
            verb, body, future = items[0]
            try:
                _settle(future, await client.command("task", verb, body))
            except asyncio.CancelledError:
                future.cancel()
                raise
            except Exception as exc:
                _settle(future, exc)
            return
        reports = [{"verb": verb, "body": client.command_body(body)} for verb, body, _ in items]
        try:
            replies = (await client.command("task", "report", {"reports": reports}))["replies"]
            if len(replies) != len(items):
                raise InternalError(f"{len(replies)} replies to {len(items)} reports")
        except asyncio.CancelledError:
            for _, _, future in items:
                future.cancel()
            raise
        except Exception as exc:
            for _, _, future in items:
                _settle(future, exc)
            return
        for (_, _, future), reply in zip(items, replies, strict=True):
            if reply.get("ok"):
                _settle(future, dict(reply.get("result") or {}))
            else:
                _settle(future, error_from_reply(reply.get("error") or {}))


def _settle(future: asyncio.Future[Any], outcome: Any) -> None:
    if future.done():  # the reporter was cancelled meanwhile
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
