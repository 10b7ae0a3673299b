"""Commands in bulk: one request carries several single commands of one aggregate kind.

Under load a client sends many commands in the same turn of its event loop (a
worker finishing many tasks, a program submitting many); each sent as its own
request costs a request, a reply and their handling on every side. A bulk
command carries several: each item is the body of a single command, validated
and decided on its own exactly as if it had come alone, and answered in order
with the reply that command would have had (``task.submit_many`` appends the
new tasks of its items together, each the events its own submit would append).
One bad item is refused alone; the others go on. A malformed bulk request as a
whole (empty, too many items) is ``invalid`` and appends nothing.

:class:`CommandBatcher` is the sending side: commands handed to it in one loop
turn leave as one bulk request per client (a lone one as its ordinary single
command, so an idle system's latency does not change).

Two bulk commands use this (:mod:`pantheon_es.reports`): ``task.report`` (lease
reports) and ``task.submit_many`` (submissions). docs/decisions.md, "Lease reports
in bulk" and "Submissions in bulk".
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import structlog
from pydantic import ValidationError

from pantheon_es.commands import Command
from pantheon_es.endpoint import invalid
from pantheon_es.errors import InternalError, PantheonError, error_from_reply

log = structlog.get_logger(__name__)

#: Items one bulk request may carry.
MAX_ITEMS = 256


async def execute_each(
    service: Any, tenant: str, items: Sequence[tuple[type[Command], dict[str, Any]]]
) -> list[dict[str, Any]]:
    """Validate and execute every (command class, body) on its own, concurrently;
    the replies in order, each ``{"ok": true, "result": ...}`` or ``{"ok": false,
    "error": ...}`` as the single command's reply would be."""
    return await asyncio.gather(*(_one(service, tenant, cls, body) for cls, body in items))


async def _one(
    service: Any, tenant: str, cls: type[Command], body: dict[str, Any]
) -> dict[str, Any]:
    try:
        command = cls.model_validate(body)
    except ValidationError as exc:
        return invalid(cls.__name__, exc).to_reply()
    return await execute_one(service, tenant, command)


async def execute_one(service: Any, tenant: str, command: Command) -> dict[str, Any]:
    """One validated command executed; its reply as the single command would get it."""
    try:
        outcome: dict[str, Any] | PantheonError = await service.execute(tenant, command)
    except PantheonError as err:
        outcome = err
    except Exception as exc:  # a bug must not cost the other items their answers
        outcome = unexpected(exc, type(command).__name__)
    return item_reply(outcome)


def item_reply(outcome: dict[str, Any] | PantheonError) -> dict[str, Any]:
    """A bulk item's reply: its result, or its typed error, as its single command's reply."""
    if isinstance(outcome, PantheonError):
        return outcome.to_reply()
    return {"ok": True, "result": outcome}


def unexpected(exc: Exception, command: str) -> InternalError:
    """What an item gets for a bug (logged with its traceback) instead of its reply."""
    log.error("bulk item failed unexpectedly", command=command, exc_info=exc)
    return InternalError(f"internal error: {type(exc).__name__}")


_Queued = tuple[str, dict[str, Any], "asyncio.Future[Any]"]


class CommandBatcher:
    """Commands sent in one loop turn leave as one bulk request per client.

    ``bulk_verb`` and ``field`` name the bulk command and its list of items;
    ``item(verb, body)`` makes one item of a single command's verb and body.
    :meth:`send` returns what the single command would (its result, or raises its
    typed error). A failure of the whole request (no reply, after the client's own
    retries) raises for every command in it. With ``retry``, an item refused with a
    retryable error (e.g. ``overloaded``) goes again on its own through the
    client's :meth:`command`, which retries it for ``retry_for`` seconds with the
    same idempotency key.
    """

    def __init__(
        self,
        aggregate: str,
        bulk_verb: str,
        field: str,
        item: Callable[[str, dict[str, Any]], Any],
        *,
        max_items: int = MAX_ITEMS,
        retry: bool = False,
    ) -> None:
        self.aggregate = aggregate
        self.bulk_verb = bulk_verb
        self.field = field
        self.item = item
        self.max_items = max_items
        self.retry = retry
        #: id(client) -> (client, [(verb, body, future)]): this loop turn's commands.
        self._queued: dict[int, tuple[Any, list[_Queued]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def send(self, client: Any, verb: str, body: dict[str, Any]) -> dict[str, Any]:
        """Send through ``client`` (a :class:`~pantheon_es.client.PantheonClient`)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        if not self._queued:
            loop.call_soon(self._flush)
        self._queued.setdefault(id(client), (client, []))[1].append((verb, body, future))
        return await future

    def _flush(self) -> None:
        queued, self._queued = self._queued, {}
        for client, items in queued.values():
            for i in range(0, len(items), self.max_items):
                task = asyncio.create_task(self._request(client, items[i : i + self.max_items]))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _request(self, client: Any, items: list[_Queued]) -> None:
        if len(items) == 1:  # alone: the ordinary command, no bulk envelope
            verb, body, future = items[0]
            await self._single(client, verb, body, future)
            return
        bodies = [client.command_body(body) for _, body, _ in items]
        payload = [self.item(verb, body) for (verb, _, _), body in zip(items, bodies, strict=True)]
        try:
            replies = (await client.command(self.aggregate, self.bulk_verb, {self.field: payload}))[
                "replies"
            ]
            if len(replies) != len(items):
                raise InternalError(f"{len(replies)} replies to {len(items)} commands")
        except asyncio.CancelledError:
            for _, _, future in items:
                future.cancel()
            raise
        except Exception as exc:  # the client's own retries (``retry_for``) are spent
            for _, _, future in items:
                _settle(future, exc)
            return
        again = []
        for (verb, _, future), body, reply in zip(items, bodies, replies, strict=True):
            if reply.get("ok"):
                _settle(future, dict(reply.get("result") or {}))
                continue
            error = error_from_reply(reply.get("error") or {})
            if self._again(client, error):
                again.append(self._single(client, verb, body, future))
            else:
                _settle(future, error)
        if again:
            await asyncio.gather(*again)

    def _again(self, client: Any, exc: Exception) -> bool:
        """Whether a failed command goes again on its own (the client's retry path)."""
        return (
            self.retry
            and client.retry_for > 0
            and isinstance(exc, PantheonError)
            and (exc.retryable or exc.retry_after is not None)
        )

    async def _single(
        self, client: Any, verb: str, body: dict[str, Any], future: asyncio.Future[Any]
    ) -> None:
        try:
            _settle(future, await client.command(self.aggregate, verb, body))
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            _settle(future, exc)


def _settle(future: asyncio.Future[Any], outcome: Any) -> None:
    if future.done():  # the sender was cancelled meanwhile
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
