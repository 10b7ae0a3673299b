"""What every request/reply endpoint shares: body parsing, routing, replies.

The command service and the query service differ only in what they do with a
validated request; both answer with ``{"ok": ...}`` and never let a bad or
failing request stop them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Mapping
from typing import Any, TypeVar

import orjson
import structlog
from nats.aio.msg import Msg
from pydantic import ValidationError

from pantheon_es.connection import Connection
from pantheon_es.errors import (
    InternalError,
    InvalidError,
    MalformedError,
    PantheonError,
    TooLargeError,
    UnknownCommandError,
)
from pantheon_es.subjects import CommandSubject, is_token

log = structlog.get_logger(__name__)

V = TypeVar("V")


def ok_reply(result: dict[str, Any]) -> bytes:
    return orjson.dumps({"ok": True, "result": result})


def error_reply(error: PantheonError) -> bytes:
    return orjson.dumps(error.to_reply())


def parse_body(data: bytes, limit: int) -> dict[str, Any]:
    """Size check and JSON object parse; an empty body is ``{}``."""
    if len(data) > limit:
        raise TooLargeError(
            f"request body is {len(data)} bytes; the limit is {limit}",
            details={"size": len(data), "limit": limit},
        )
    if not data.strip():
        return {}
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise MalformedError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise MalformedError(f"request body must be a JSON object, not {type(body).__name__}")
    return body


def route(
    parsed: CommandSubject | None, table: Mapping[tuple[str, str], V], kind: str, subject: str
) -> V:
    """The handler registered for a parsed subject, or the typed error saying why not."""
    if parsed is None or (parsed.aggregate, parsed.verb) not in table:
        raise UnknownCommandError(
            f"no {kind} on subject {subject!r}",
            details={"known": sorted(f"{a}.{v}" for a, v in table)},
        )
    if not is_token(parsed.tenant):
        raise InvalidError(f"tenant {parsed.tenant!r} is not a valid tenant name")
    return table[(parsed.aggregate, parsed.verb)]


def validation_details(exc: ValidationError) -> list[dict[str, Any]]:
    return [
        {"loc": ".".join(str(p) for p in err["loc"]), "msg": err["msg"], "type": err["type"]}
        for err in exc.errors(include_url=False, include_context=False, include_input=False)
    ]


def invalid(model: str, exc: ValidationError) -> InvalidError:
    """An ``invalid`` error naming the first bad fields in its message, all in details."""
    details = validation_details(exc)
    shown = "; ".join(f"{d['loc'] or 'body'}: {d['msg']}" for d in details[:3])
    more = f" (and {len(details) - 3} more)" if len(details) > 3 else ""
    return InvalidError(f"{model} is not valid: {shown}{more}", details=details)


async def respond(msg: Msg, work: Awaitable[dict[str, Any]]) -> None:
    """Run one request's work and reply; no failure escapes to the subscription."""
    try:
        payload = ok_reply(await work)
    except PantheonError as err:
        payload = error_reply(err)
    except Exception as exc:  # a bug must not stop the endpoint
        log.exception("request failed unexpectedly", subject=msg.subject)
        payload = error_reply(InternalError(f"internal error: {type(exc).__name__}"))
    if msg.reply:
        with contextlib.suppress(Exception):  # the requester may be gone
            nc = msg._client
            if isinstance(nc, Connection) and not msg.headers:
                nc.publish_now(msg.reply, payload)  # at once, not on the flusher's turn
            else:
                await msg.respond(payload)  # echoes the request's headers, as nats-py does
