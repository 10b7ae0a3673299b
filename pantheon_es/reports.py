"""Task commands in bulk: lease reports (``task.report``) and submissions (``task.submit_many``).

Under load a worker finishes many tasks in the same turn of its event loop;
sending each ``complete`` (or ``start``, ``heartbeat``, ...) as its own request
costs a request, a reply and their handling on every side. :class:`ReportTasks`
carries several, each decided as if it had come alone (:mod:`pantheon_es.bulk`);
:func:`report_batcher` is the worker's side. docs/decisions.md, "Lease reports
in bulk". :class:`SubmitTasks` does the same for submissions; a
:class:`~pantheon_es.client.PantheonClient` sends the submits of one loop turn
with it (docs/decisions.md, "Submissions in bulk").
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pantheon_es.bulk import (
    MAX_ITEMS,
    CommandBatcher,
    execute_each,
    execute_one,
    item_reply,
    unexpected,
)
from pantheon_es.commands import BulkCommand
from pantheon_es.endpoint import invalid
from pantheon_es.errors import PantheonError
from pantheon_es.tasks import (
    CompleteTask,
    FailTask,
    Heartbeat,
    ReleaseTask,
    ReportProgress,
    StartTask,
    SubmitTask,
    _LeaseReport,
)

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

    reports: list[LeaseReportItem] = Field(min_length=1, max_length=MAX_ITEMS)

    async def run(self, service: Any, tenant: str) -> dict[str, Any]:
        items = [(REPORTS[item.verb], item.body) for item in self.reports]
        return {"replies": await execute_each(service, tenant, items)}


def report_batcher() -> CommandBatcher:
    """The worker's side: reports sent in one loop turn leave as one request per client."""
    return CommandBatcher(
        "task", "report", "reports", lambda verb, body: {"verb": verb, "body": body}
    )


class SubmitTasks(BulkCommand, aggregate="task", verb="submit_many"):
    """Several task submissions in one request. Each item is the body of
    `task.submit` and is decided on its own (its idempotency key included);
    ``replies`` answers them in order, each as ``{"ok": true, "result": ...}`` or
    ``{"ok": false, "error": ...}`` like `task.submit`'s reply. The items that
    name neither a ``task_id`` nor an idempotency key are appended together, in
    their order, as atomic batches; the others as single submits."""

    submits: list[dict[str, Any]] = Field(
        min_length=1, max_length=MAX_ITEMS, description="Bodies of `task.submit`."
    )

    async def run(self, service: Any, tenant: str) -> dict[str, Any]:
        replies: list[dict[str, Any]] = [{} for _ in self.submits]
        fresh: list[tuple[int, SubmitTask]] = []  # new ids, no keys: one atomic append
        alone: list[tuple[int, SubmitTask]] = []  # chosen ids or keys: the single path
        for i, body in enumerate(self.submits):
            try:
                command = SubmitTask.model_validate(body)
            except ValidationError as exc:
                replies[i] = invalid(SubmitTask.__name__, exc).to_reply()
                continue
            if command.task_id is None and command.idempotency_key is None:
                fresh.append((i, command))
            else:
                alone.append((i, command))

        async def together() -> None:
            outcomes: list[dict[str, Any] | PantheonError]
            try:
                outcomes = await service.create_each(tenant, [c for _, c in fresh])
            except PantheonError as err:
                outcomes = [err] * len(fresh)
            except Exception as exc:  # a bug must not cost the other items their answers
                outcomes = [unexpected(exc, SubmitTask.__name__)] * len(fresh)
            for (i, _), outcome in zip(fresh, outcomes, strict=True):
                replies[i] = item_reply(outcome)

        async def single(i: int, command: SubmitTask) -> None:
            replies[i] = await execute_one(service, tenant, command)

        await asyncio.gather(*([together()] if fresh else []), *(single(i, c) for i, c in alone))
        return {"replies": replies}
