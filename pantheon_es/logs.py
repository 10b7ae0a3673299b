"""structlog set-up: pretty on a terminal, JSON lines otherwise.

Context travels through ``structlog.contextvars``: the command service binds
``tenant``, ``correlation_id`` and ``command`` per request and ``stream_seq``
after an append; the projector binds ``stream_seq`` per batch. Each request
runs in its own asyncio task, so bindings never leak between requests.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import orjson
import structlog
import structlog.tracebacks


def _orjson_dumps(obj: Any, default: Any = None) -> str:
    return orjson.dumps(obj, default=default).decode()


def configure(
    level: str = "info", *, stream: TextIO | None = None, json: bool | None = None
) -> None:
    """Configure structlog (and stdlib logging) once per process."""
    out = stream or sys.stderr
    as_json = (not out.isatty()) if json is None else json
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    if as_json:
        processors += [
            # No locals in logged tracebacks: they would carry environments and payloads.
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            ),
            structlog.processors.JSONRenderer(serializer=_orjson_dumps),
        ]
    else:
        processors += [structlog.dev.ConsoleRenderer(colors=True)]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(
        level=logging.WARNING, stream=out, format="%(levelname)s %(name)s: %(message)s"
    )
