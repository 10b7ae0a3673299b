"""Functions the python executor tests call as ``tests.executor_targets:<name>``."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from pantheon_es.executors import ContextClosedError, ExecutionError, PythonTaskContext

not_callable = 42

#: Set by ``runs_until_cancelled`` when it starts, and when it sees the cancel.
SYNC_STARTED = threading.Event()
SYNC_NOTICED = threading.Event()
SYNC_REFUSED = threading.Event()


def add(a: int, b: int) -> int:
    return a + b


async def async_add(a: int, b: int) -> int:
    await asyncio.sleep(0)
    return a + b


def as_tuple(a: int) -> tuple[int, int]:
    return (a, a)


def not_json() -> Any:
    return {1, 2}


def boom(message: str) -> None:
    raise ValueError(message)


async def async_boom(message: str) -> None:
    await asyncio.sleep(0)
    raise KeyError(message)


def raises_execution_error() -> None:
    raise ExecutionError("Custom", "chosen by the task", {"k": 1})


def exits() -> None:
    raise SystemExit(3)


def thread_name() -> str:
    return threading.current_thread().name


def thread_info() -> dict[str, object]:
    current = threading.current_thread()
    return {"name": current.name, "daemon": current.daemon, "ident": current.ident}


def sync_with_ctx(ctx: PythonTaskContext, to: str) -> dict[str, Any]:
    ctx.progress_sync(0.5, "half way")
    ctx.heartbeat_sync()
    messages = ctx.inbox_sync(5, 1.5)
    message_id = ctx.send_sync(to, "hello", "high", "query")
    return {
        "task_id": ctx.task_id,
        "attempt": ctx.attempt,
        "tenant": ctx.tenant,
        "messages": messages,
        "sent": message_id,
    }


async def async_with_ctx(ctx: PythonTaskContext, to: str) -> dict[str, Any]:
    await ctx.progress(0.25, "quarter", "waiting_for_input")
    await ctx.heartbeat()
    messages = await ctx.inbox()
    message_id = await ctx.send(to, "hi")
    return {"messages": messages, "sent": message_id, "task_id": ctx.task_id}


def sync_calls_async_api_wrongly(ctx: PythonTaskContext) -> str:
    return type(ctx).__name__


async def async_calls_sync_twin(ctx: PythonTaskContext) -> None:
    ctx.heartbeat_sync()  # blocks the loop it needs: refused


async def sleeps(seconds: float) -> None:
    await asyncio.sleep(seconds)


def runs_until_cancelled(ctx: PythonTaskContext) -> str:
    SYNC_STARTED.set()
    deadline = time.monotonic() + 10
    while not ctx.cancelled and time.monotonic() < deadline:
        time.sleep(0.01)
    if ctx.cancelled:
        SYNC_NOTICED.set()
        try:
            ctx.heartbeat_sync()
        except ContextClosedError:
            SYNC_REFUSED.set()
    return "discarded"


async def raises_cancelled() -> None:
    raise asyncio.CancelledError  # not a cancel of the task running it


def echo_inputs(inputs: dict[str, object]) -> dict[str, object]:
    return inputs
