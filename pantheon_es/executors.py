"""Executors: how a worker runs a task of each kind (``shell``, ``python``, ``agent``).

The worker holds the lease; an executor only runs the work. The contract:

* ``await executor.run(spec, ctx)`` returns the task's result (any JSON value)
  or raises :class:`ExecutionError` (a failure with a type, message, details).
* The worker cancels the asyncio task running ``run`` to stop it (cancel,
  timeout, stale lease, shutdown); an executor must then stop what it started
  (kill the process group) and re-raise ``CancelledError``.
* ``ctx`` gives progress, heartbeat (activity), inbox and send, and lets the
  executor register the pids it starts (the worker samples their CPU and
  memory with psutil) and mark activity (output counts as activity).

The ``shell`` and ``agent`` executors share one :class:`ProcessRunner`: the
process runs in its own process group (session), its output streams to
``stdout.log``/``stderr.log`` in the attempt's output directory with only a
bounded tail kept in memory, and when it ends (or the run is cancelled) the
whole group is stopped, so no child outlives the attempt. A grandchild that
starts a session of its own (``setsid``) leaves the group and is out of reach.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import importlib
import inspect
import os
import queue
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from concurrent.futures import CancelledError as FutureCancelledError
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final, Protocol, TypeVar

import orjson
import psutil
from pydantic import BaseModel, ValidationError

from pantheon_es.specs import AgentSpec, PythonSpec, ShellSpec

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

#: In-memory tail of each output stream, bytes (the files keep everything).
DEFAULT_TAIL_BYTES: Final = 64 * 1024
#: Seconds between SIGTERM and SIGKILL when a process group is stopped.
DEFAULT_KILL_GRACE: Final = 5.0
#: Longest ``PANTHEON_RESULT`` line an agent may print, bytes.
DEFAULT_MAX_RESULT_BYTES: Final = 16 * 1024 * 1024
#: Tracebacks and messages in failures are capped (ErrorInfo.message allows 20,000).
MAX_ERROR_CHARS: Final = 20_000
#: A dependency's result up to this many characters also goes in an environment variable.
MAX_INPUT_ENV: Final = 8192
#: An agent's result: the last stdout line starting with this, followed by JSON.
RESULT_MARKER: Final = "PANTHEON_RESULT "

_CHUNK = 64 * 1024
_POLL = 0.02
# How long the pipes may stay open after the whole group is gone: only a process
# that escaped the group (setsid) can hold them, and we will not wait for it.
_DRAIN_TIMEOUT = 2.0


class ExecutionError(Exception):
    """The task failed: reported as ``TaskFailed`` with this type, message and details."""

    def __init__(self, type: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.type = type
        self.message = message
        self.details = details or {}


@dataclass
class TaskContext:
    """What an executor may use while it runs one attempt of one task."""

    task_id: str
    tenant: str
    attempt: int
    lease_id: str
    fencing_token: int
    name: str
    #: Where this attempt's files go (captured output); created by the worker.
    output_dir: Path
    #: For processes that talk back (``pantheon inbox``, ``pantheon send``): handed
    #: over as PANTHEON_NATS_URL, PANTHEON_NAMESPACE, PANTHEON_TENANT, PANTHEON_TASK_ID,
    #: PANTHEON_LEASE_ID, PANTHEON_FENCING_TOKEN.
    nats_url: str
    namespace: str
    # -- callbacks provided by the worker ---------------------------------------------------
    progress: Callable[[float | None, str, str], Awaitable[None]]  # (fraction, message, state)
    heartbeat: Callable[[], Awaitable[None]]  # explicit activity
    inbox: Callable[[int, float | None], Awaitable[list[dict[str, Any]]]]  # (max, wait seconds)
    send: Callable[[str, str, str, str], Awaitable[str]]  # (to, body, priority, type) -> message id
    mark_activity: Callable[[], None]
    add_pid: Callable[[int], None]
    extra_env: dict[str, str] = field(default_factory=dict)
    #: A workflow task's dependencies' results by node name (None outside workflows).
    inputs: dict[str, Any] | None = None

    def env(self) -> dict[str, str]:
        """Environment variables a child process gets so it can talk to Pantheon.

        A workflow task's process also gets its inputs: ``PANTHEON_INPUTS_FILE`` (all
        of them, a JSON file written now in the output directory) and
        ``PANTHEON_INPUT_<NODE>`` for each result up to 8 KiB. Only processes need
        the file: python functions get ``inputs`` as an argument.
        """
        env = {
            "PANTHEON_NATS_URL": self.nats_url,
            "PANTHEON_NAMESPACE": self.namespace,
            "PANTHEON_TENANT": self.tenant,
            "PANTHEON_TASK_ID": self.task_id,
            "PANTHEON_LEASE_ID": self.lease_id,
            "PANTHEON_FENCING_TOKEN": str(self.fencing_token),
        }
        if self.inputs is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            path = self.output_dir / "inputs.json"
            path.write_bytes(orjson.dumps(self.inputs))
            env["PANTHEON_INPUTS_FILE"] = str(path)
            for node, value in self.inputs.items():
                text = orjson.dumps(value).decode()
                if len(text) <= MAX_INPUT_ENV:
                    env[f"PANTHEON_INPUT_{re.sub(r'[^A-Za-z0-9]', '_', node).upper()}"] = text
        env.update(self.extra_env)
        return env


class Executor(Protocol):
    kind: str

    async def run(self, spec: Any, ctx: TaskContext) -> Any: ...


def _coerce(spec: Any, model: type[M]) -> M:
    """The spec as its model: the worker may hand over the model or its JSON form."""
    if isinstance(spec, model):
        return spec
    try:
        return model.model_validate(spec)
    except ValidationError as exc:
        raise ExecutionError(
            "InvalidSpec",
            f"not a valid {model.__name__}: {exc.error_count()} error(s)",
            {"errors": exc.errors(include_url=False, include_context=False)},
        ) from None


# -- processes ------------------------------------------------------------------------------------


class _Tail:
    """The last ``limit`` bytes of a stream."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.truncated = False

    def add(self, chunk: bytes) -> None:
        self.data += chunk
        excess = len(self.data) - self.limit
        if excess > 0:
            del self.data[:excess]
            self.truncated = True

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


class _LastMarkedLine:
    """Finds the last line starting with ``marker`` in a byte stream.

    Only a line that can still turn out to be marked is buffered, so a process
    may print gigabytes of other output; a marked line longer than ``limit``
    is remembered as too large rather than kept.
    """

    def __init__(self, marker: bytes, limit: int) -> None:
        self.marker = marker
        self.limit = limit
        self.last: bytes | None = None
        self.too_large = False
        self._line = bytearray()
        self._candidate = True  # the current line may still start with the marker
        self._oversized = False  # the current line is marked and over the limit

    def feed(self, chunk: bytes) -> None:
        start = 0
        while start < len(chunk):
            newline = chunk.find(b"\n", start)
            end = len(chunk) if newline < 0 else newline
            if self._candidate and not self._oversized:
                self._line += chunk[start:end]
                if not self.marker.startswith(bytes(self._line[: len(self.marker)])):
                    self._candidate = False
                    self._line.clear()
                elif len(self._line) > self.limit:
                    self._oversized = True
                    self._line.clear()
            if newline < 0:
                return
            self._end_line()
            start = newline + 1

    def finish(self) -> None:
        """The stream ended: a last line without a newline counts too."""
        if self._line or self._oversized:
            self._end_line()

    def _end_line(self) -> None:
        if self._oversized:
            self.last, self.too_large = None, True
        elif self._candidate and self._line.startswith(self.marker):
            self.last, self.too_large = bytes(self._line).rstrip(b"\r"), False
        self._line.clear()
        self._candidate, self._oversized = True, False


@dataclass(frozen=True)
class ProcessOutcome:
    """How a process run by :class:`ProcessRunner` ended (it exited; it was not cancelled)."""

    exit_code: int
    stdout_tail: str
    stderr_tail: str
    stdout_path: Path
    stderr_path: Path
    #: Either tail lost bytes (the files still hold everything).
    truncated: bool
    duration_s: float
    #: The last stdout line starting with the marker given to ``run`` (marker included).
    marked_line: bytes | None = None
    #: The last marked line was longer than the runner's ``max_marked_line``.
    marked_line_too_large: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The JSON result of a ``shell`` task (and the details of its failure)."""
        return {
            "exit_code": self.exit_code,
            "stdout_tail": self.stdout_tail,
            "stderr_tail": self.stderr_tail,
            "stdout_path": str(self.stdout_path),
            "stderr_path": str(self.stderr_path),
            "truncated": self.truncated,
            "duration_s": self.duration_s,
        }

    def check(self) -> None:
        """Raise ``ExitCode`` unless the process exited with 0."""
        if self.exit_code == 0:
            return
        message = f"exited with code {self.exit_code}"
        if self.exit_code < 0:
            with contextlib.suppress(ValueError):
                message += f" (killed by {signal.Signals(-self.exit_code).name})"
        raise ExecutionError("ExitCode", message, details=self.to_dict())


class ProcessRunner:
    """Runs one argv to its end in a process group of its own, capturing its output.

    Args:
        tail_bytes: How much of each of stdout and stderr to keep in memory.
        kill_grace: Seconds between SIGTERM and SIGKILL when the group is stopped.
        max_marked_line: Longest marked stdout line (see ``run``) to keep, bytes.
    """

    def __init__(
        self,
        *,
        tail_bytes: int = DEFAULT_TAIL_BYTES,
        kill_grace: float = DEFAULT_KILL_GRACE,
        max_marked_line: int = DEFAULT_MAX_RESULT_BYTES,
    ) -> None:
        if tail_bytes < 0 or kill_grace < 0 or max_marked_line < 0:
            raise ValueError("tail_bytes, kill_grace and max_marked_line must be >= 0")
        self.tail_bytes = tail_bytes
        self.kill_grace = kill_grace
        self.max_marked_line = max_marked_line

    async def run(
        self,
        argv: Sequence[str],
        ctx: TaskContext,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        marker: bytes | None = None,
    ) -> ProcessOutcome:
        """Run ``argv`` (no shell) until it exits; stop its whole group if cancelled.

        Args:
            argv: The program and its arguments.
            ctx: The attempt: output goes to ``ctx.output_dir``; the pid is
                registered with ``ctx.add_pid``; each chunk of output marks activity.
            env: Added to this process's environment (together with ``ctx.env()``).
            cwd: Working directory; default: this process's.
            marker: Remember the last stdout line starting with these bytes.

        Returns:
            How the process ended, whatever its exit code.

        Raises:
            ExecutionError: ``ExecutableNotFound``, ``PermissionDenied``,
                ``InvalidWorkingDirectory`` or ``SpawnFailed`` if it cannot
                start; ``OutputCaptureFailed`` if its output cannot be written.
            asyncio.CancelledError: after the group has been stopped.
        """
        ctx.output_dir.mkdir(parents=True, exist_ok=True)
        stdout_path = ctx.output_dir / "stdout.log"
        stderr_path = ctx.output_dir / "stderr.log"
        full_env = {**os.environ, **ctx.env(), **(env or {})}
        out_tail, err_tail = _Tail(self.tail_bytes), _Tail(self.tail_bytes)
        scanner = _LastMarkedLine(marker, self.max_marked_line) if marker else None
        with contextlib.ExitStack() as files:
            out_file = files.enter_context(stdout_path.open("wb"))
            err_file = files.enter_context(stderr_path.open("wb"))
            # Our own pipes rather than asyncio's PIPE: there, proc.wait() waits
            # for the pipes to close too, so a leftover child holding them would
            # keep us from learning that the command has exited.
            out_reader, out_fd = await _open_pipe(files)
            err_reader, err_fd = await _open_pipe(files)
            started = time.monotonic()
            try:
                proc = await _spawn(argv, full_env, cwd, stdout=out_fd, stderr=err_fd)
            finally:
                os.close(out_fd)  # the child has its copies; ours would keep EOF away
                os.close(err_fd)
            try:
                async with asyncio.TaskGroup() as tg:
                    pumps = [
                        tg.create_task(_pump(out_reader, out_file, out_tail, ctx, scanner)),
                        tg.create_task(_pump(err_reader, err_file, err_tail, ctx, None)),
                    ]
                    try:
                        ctx.add_pid(proc.pid)
                        exit_code = await proc.wait()
                    finally:
                        # Runs when the leader exits (leftover children are stopped
                        # too) and when we are cancelled: nothing outlives the attempt.
                        await _stop_group(proc, self.kill_grace)
                    duration = time.monotonic() - started
                    _, late = await asyncio.wait(pumps, timeout=_DRAIN_TIMEOUT)
                    for pump in late:
                        pump.cancel()
            except* OSError as group:
                raise ExecutionError(
                    "OutputCaptureFailed", f"cannot write the output: {group.exceptions[0]}"
                ) from None
        return ProcessOutcome(
            exit_code=exit_code,
            stdout_tail=out_tail.text(),
            stderr_tail=err_tail.text(),
            stdout_path=stdout_path,
            stderr_path=stderr_path,
            truncated=out_tail.truncated or err_tail.truncated,
            duration_s=round(duration, 3),
            marked_line=scanner.last if scanner else None,
            marked_line_too_large=scanner.too_large if scanner else False,
        )


async def _open_pipe(closing: contextlib.ExitStack) -> tuple[asyncio.StreamReader, int]:
    """A pipe: its read end as a stream (closed by ``closing``), its write end as an fd."""
    read_fd, write_fd = os.pipe()
    try:
        reader = asyncio.StreamReader()
        transport, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", buffering=0)
        )
    except BaseException:
        os.close(write_fd)
        raise
    closing.callback(transport.close)
    return reader, write_fd


async def _spawn(
    argv: Sequence[str], env: dict[str, str], cwd: str | None, *, stdout: int, stderr: int
) -> asyncio.subprocess.Process:
    try:
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env=env,
            cwd=cwd,
            # Its own session and process group, so that one killpg reaches
            # everything it starts, and a Ctrl-C meant for the worker does not.
            start_new_session=True,
        )
    except OSError as exc:
        details = {"argv0": argv[0], "cwd": cwd, "errno": exc.errno}
        if cwd is not None and exc.filename == cwd:
            raise ExecutionError(
                "InvalidWorkingDirectory", f"cannot run in {cwd}: {exc.strerror}", details
            ) from None
        if isinstance(exc, FileNotFoundError):
            raise ExecutionError(
                "ExecutableNotFound", f"executable not found: {argv[0]}", details
            ) from None
        if isinstance(exc, PermissionError):
            raise ExecutionError(
                "PermissionDenied", f"not permitted to run {argv[0]}: {exc.strerror}", details
            ) from None
        raise ExecutionError("SpawnFailed", f"cannot start {argv[0]}: {exc}", details) from None


async def _pump(
    stream: asyncio.StreamReader,
    sink: IO[bytes],
    tail: _Tail,
    ctx: TaskContext,
    scanner: _LastMarkedLine | None,
) -> None:
    while chunk := await stream.read(_CHUNK):
        # At most 64 KiB to a local file: cheaper inline than a thread hop per
        # chunk. Flushed so that the log can be followed while the task runs.
        sink.write(chunk)
        sink.flush()
        tail.add(chunk)
        if scanner is not None:
            scanner.feed(chunk)
        ctx.mark_activity()
    if scanner is not None:
        scanner.finish()


def _signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to the group; False if the group no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # a member changed its uid (setuid program): it exists, we cannot reach it
    return True


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs.

    Zombies do not count: they are dead, just not reaped by their parent (an
    orphan's new parent may be an init that never reaps).
    """
    if not _signal_group(pgid, 0):
        return False
    for proc in psutil.process_iter():
        with contextlib.suppress(OSError, psutil.Error):
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                return True
    return False


async def _stop_group(proc: asyncio.subprocess.Process, grace: float) -> None:
    """SIGTERM the process group of ``proc``, wait up to ``grace`` seconds, then SIGKILL it."""
    pgid = proc.pid  # start_new_session: the leader's pid is the group id
    loop = asyncio.get_running_loop()
    try:
        if _signal_group(pgid, signal.SIGTERM):
            deadline = loop.time() + grace
            # Bounded polling: processes that are not our children (orphaned
            # grandchildren) give no event to wait on.
            while _group_alive(pgid) and loop.time() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(_POLL)
    finally:
        # Also when cancelled again during the grace period.
        if _group_alive(pgid):
            _signal_group(pgid, signal.SIGKILL)
    await proc.wait()


# -- shell --------------------------------------------------------------------------------------


class ShellExecutor:
    """Runs a ``shell`` task: an argv (no shell), its environment and working directory.

    The child gets this process's environment, then ``ctx.env()``, then
    ``spec.env``, and stdin from /dev/null. Its result is the dict of
    :meth:`ProcessOutcome.to_dict`; a non-zero exit fails with ``ExitCode``
    and that dict as details.

    Args:
        tail_bytes: How much of each of stdout and stderr to keep in the result.
        kill_grace: Seconds between SIGTERM and SIGKILL when the task is stopped.
    """

    kind: str = "shell"

    def __init__(
        self, *, tail_bytes: int = DEFAULT_TAIL_BYTES, kill_grace: float = DEFAULT_KILL_GRACE
    ) -> None:
        self.runner = ProcessRunner(tail_bytes=tail_bytes, kill_grace=kill_grace)

    async def run(self, spec: ShellSpec | Mapping[str, Any], ctx: TaskContext) -> dict[str, Any]:
        """Run the command to its end; see the class docstring."""
        shell = _coerce(spec, ShellSpec)
        outcome = await self.runner.run(shell.argv, ctx, env=shell.env, cwd=shell.cwd)
        outcome.check()
        return outcome.to_dict()


# -- python -------------------------------------------------------------------------------------


class ContextClosedError(RuntimeError):
    """The attempt a :class:`PythonTaskContext` belongs to is over (cancelled or finished)."""


class PythonTaskContext:
    """The ``ctx`` a ``python`` task's function gets if it has a parameter named ``ctx``.

    Async functions await :meth:`progress`, :meth:`heartbeat`, :meth:`inbox`
    and :meth:`send`. Sync functions run in a thread of their own and call the
    ``*_sync`` twins, which run the same coroutine on the worker's event loop
    and block until it is done.

    A sync function cannot be stopped from outside: when the attempt is
    cancelled it keeps running and its result is discarded. It can notice:
    :attr:`cancelled` turns true and every call on the context raises
    :class:`ContextClosedError` (also one blocked in a ``*_sync`` call).

    Args:
        ctx: The attempt's executor context.
        loop: The worker's event loop; default: the running one.
    """

    def __init__(self, ctx: TaskContext, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._ctx = ctx
        self._loop = loop or asyncio.get_running_loop()
        self._lock = threading.Lock()
        self._closed = False
        self._pending: set[Future[Any]] = set()

    @property
    def task_id(self) -> str:
        return self._ctx.task_id

    @property
    def inputs(self) -> dict[str, Any]:
        """A workflow task's dependencies' results by node name (empty outside workflows)."""
        return dict(self._ctx.inputs or {})

    @property
    def attempt(self) -> int:
        return self._ctx.attempt

    @property
    def tenant(self) -> str:
        return self._ctx.tenant

    @property
    def cancelled(self) -> bool:
        """True once the attempt is over: a function still running should return."""
        return self._closed

    async def progress(
        self, fraction: float | None = None, message: str = "", state: str = "active"
    ) -> None:
        """Report progress.

        Args:
            fraction: 0.0..1.0, or None to leave it as it is.
            message: What is happening now.
            state: ``active``, or e.g. ``waiting_for_input``.
        """
        self._check_open()
        await self._ctx.progress(fraction, message, state)

    async def heartbeat(self) -> None:
        """Report activity (keeps the inactivity timeout away)."""
        self._check_open()
        await self._ctx.heartbeat()

    async def inbox(self, max: int = 10, wait: float | None = None) -> list[dict[str, Any]]:
        """Take up to ``max`` pending messages for this task, waiting up to ``wait`` seconds."""
        self._check_open()
        return await self._ctx.inbox(max, wait)

    async def send(self, to: str, body: str, priority: str = "medium", type: str = "update") -> str:
        """Send a message to agent ``to``; returns the message id."""
        self._check_open()
        return await self._ctx.send(to, body, priority, type)

    def progress_sync(
        self, fraction: float | None = None, message: str = "", state: str = "active"
    ) -> None:
        """:meth:`progress` for sync code running in a thread."""
        self._call_sync(lambda: self.progress(fraction, message, state))

    def heartbeat_sync(self) -> None:
        """:meth:`heartbeat` for sync code running in a thread."""
        self._call_sync(self.heartbeat)

    def inbox_sync(self, max: int = 10, wait: float | None = None) -> list[dict[str, Any]]:
        """:meth:`inbox` for sync code running in a thread."""
        return self._call_sync(lambda: self.inbox(max, wait))

    def send_sync(self, to: str, body: str, priority: str = "medium", type: str = "update") -> str:
        """:meth:`send` for sync code running in a thread."""
        return self._call_sync(lambda: self.send(to, body, priority, type))

    def close(self) -> None:
        """End the attempt for the function: refuse new calls, abandon pending ones."""
        with self._lock:
            self._closed = True
            pending = list(self._pending)
        for future in pending:
            future.cancel()

    def _check_open(self) -> None:
        if self._closed:
            raise ContextClosedError(f"attempt {self.attempt} of task {self.task_id} is over")

    def _call_sync(self, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # the usual case: a thread without a loop
            running = None
        if running is self._loop:
            # Blocking the loop's thread on a coroutine that needs that loop never returns.
            raise RuntimeError("in async code, await ctx.progress(...) etc. instead of *_sync")
        with self._lock:
            self._check_open()
            future = asyncio.run_coroutine_threadsafe(make(), self._loop)
            self._pending.add(future)
        try:
            return future.result()
        except FutureCancelledError:
            raise ContextClosedError(
                f"attempt {self.attempt} of task {self.task_id} is over"
            ) from None
        finally:
            with self._lock:
                self._pending.discard(future)


def resolve_target(target: str) -> Callable[..., Any]:
    """The function named ``package.module:function``.

    Raises:
        ExecutionError: ``ImportError`` (also when importing the module raises
            anything else), ``AttributeError``, or ``TypeError`` if it is not callable.
    """
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ExecutionError(
            "ImportError",
            _cap(f"cannot import {module_name}: {type(exc).__name__}: {exc}"),
            {"target": target, "cause": type(exc).__name__, "traceback": _traceback(exc)},
        ) from None
    try:
        func = getattr(module, attr)
    except AttributeError:
        raise ExecutionError(
            "AttributeError", f"module {module_name} has no attribute {attr}", {"target": target}
        ) from None
    if not callable(func):
        raise ExecutionError("TypeError", f"{target} is not callable", {"target": target})
    return func  # type: ignore[no-any-return]


def _wants_ctx(func: Callable[..., Any]) -> bool:
    return _accepts(func, "ctx")


def _accepts(func: Callable[..., Any], name: str) -> bool:
    try:
        return _accepts_cached(func, name)
    except TypeError:  # an unhashable callable: ask every time
        return _signature_accepts(func, name)


@functools.lru_cache(maxsize=1024)  # targets are resolved once; their signatures do not change
def _accepts_cached(func: Callable[..., Any], name: str) -> bool:
    return _signature_accepts(func, name)


def _signature_accepts(func: Callable[..., Any], name: str) -> bool:
    try:
        parameter = inspect.signature(func).parameters.get(name)
    except (TypeError, ValueError):  # no signature (some builtins)
        return False
    return parameter is not None and parameter.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
    )


def _cap(text: str) -> str:
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


def _traceback(exc: BaseException) -> str:
    # The end of a traceback names the failing line and the error: keep that part.
    text = "".join(traceback.format_exception(exc))
    return text if len(text) <= MAX_ERROR_CHARS else "…" + text[-(MAX_ERROR_CHARS - 1) :]


class _DaemonThreads:
    """Reusable daemon threads for sync task functions.

    Not ``asyncio.to_thread``: a sync task may run for hours, and in the
    default executor it would hold one of a few shared threads (starving the
    worker's other ``to_thread`` calls), and keep the loop's and the
    interpreter's shutdown waiting for it if it never returns after a cancel.
    Not a thread per call either: starting one costs more than a short task.
    Idle threads wait for the next call; a call that finds none starts one.
    """

    def __init__(self) -> None:
        self._work: queue.SimpleQueue[tuple[Callable[[], Any], Callable[[Any], None]]] = (
            queue.SimpleQueue()
        )
        self._idle = 0
        self._lock = threading.Lock()

    def submit(self, work: Callable[[], Any], done: Callable[[Any], None]) -> None:
        """Run ``work`` on a thread, then ``done(its return value)`` on the same thread."""
        with self._lock:
            if self._idle > 0:
                self._idle -= 1
                start = False
            else:
                start = True
        self._work.put((work, done))
        if start:
            threading.Thread(target=self._serve, name="pantheon-task", daemon=True).start()

    def _serve(self) -> None:
        while True:
            work, done = self._work.get()
            outcome = work()
            # Idle before telling the caller: its next call then finds this thread.
            with self._lock:
                self._idle += 1
            done(outcome)


_THREADS = _DaemonThreads()


async def _in_daemon_thread(func: Callable[[], T], name: str) -> T:
    """Run ``func`` on a daemon thread; if cancelled, leave it running and drop its result."""
    loop = asyncio.get_running_loop()
    result: asyncio.Future[T] = loop.create_future()
    context = contextvars.copy_context()  # as to_thread: structlog bindings come along

    def settle(value: T | None, error: BaseException | None) -> None:
        if result.done():  # cancelled: nobody wants the result any more
            return
        if error is not None:
            result.set_exception(error)
        else:
            result.set_result(value)  # type: ignore[arg-type]

    def work() -> tuple[Any, BaseException | None]:
        threading.current_thread().name = name  # a pooled thread carries its task's name
        try:
            return context.run(func), None
        except BaseException as exc:  # handed to the awaiting task, which decides
            return None, exc

    def done(outcome: tuple[Any, BaseException | None]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            loop.call_soon_threadsafe(settle, *outcome)

    _THREADS.submit(work, done)
    return await result


class PythonExecutor:
    """Runs a ``python`` task: calls ``package.module:function(**kwargs)``.

    The module is imported in a thread (its import may be slow) and the
    function called with ``spec.kwargs``, plus a :class:`PythonTaskContext`
    as ``ctx`` if it has a parameter of that name. An async function runs on
    the worker's loop and is cancelled like any coroutine. A sync function
    runs in a daemon thread of its own; it cannot be stopped, so on cancel it
    runs to completion in the background, its result is discarded, and its
    context refuses further calls (see :class:`PythonTaskContext`).

    Whatever the function raises fails the task with the exception's class
    name as type and its traceback in the details; an :class:`ExecutionError`
    it raises is reported as it is. The result must be JSON (checked with
    orjson; types orjson knows, like tuples or dataclasses, become plain JSON).
    """

    kind: str = "python"

    def __init__(self) -> None:
        # Resolved once per target: the first import runs in a thread (it may be slow).
        self._targets: dict[str, Callable[..., Any]] = {}

    async def run(self, spec: PythonSpec | Mapping[str, Any], ctx: TaskContext) -> Any:
        """Call the function and return its JSON result; see the class docstring."""
        python = _coerce(spec, PythonSpec)
        func = self._targets.get(python.target)
        if func is None:
            func = self._targets[python.target] = await asyncio.to_thread(
                resolve_target, python.target
            )
        kwargs = dict(python.kwargs)
        task_ctx = PythonTaskContext(ctx)
        if _wants_ctx(func):
            if "ctx" in kwargs:
                raise ExecutionError(
                    "InvalidSpec", "kwargs may not contain 'ctx': the function takes the context"
                )
            kwargs["ctx"] = task_ctx
        if ctx.inputs is not None and "inputs" not in kwargs and _accepts(func, "inputs"):
            kwargs["inputs"] = dict(ctx.inputs)  # a workflow's results of the dependencies
        try:
            if inspect.iscoroutinefunction(func):
                value = await func(**kwargs)
            else:
                value = await _in_daemon_thread(
                    functools.partial(func, **kwargs), name=f"pantheon-task-{ctx.task_id}"
                )
                if inspect.isawaitable(value):  # e.g. a partial of an async function
                    value = await value
        except asyncio.CancelledError as exc:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
            # Raised by the function itself, not a cancel of this task: a failure.
            raise ExecutionError(
                "CancelledError",
                "the function raised CancelledError",
                {"traceback": _traceback(exc)},
            ) from None
        except ExecutionError:
            raise
        except (Exception, SystemExit) as exc:
            raise ExecutionError(
                type(exc).__name__, _cap(str(exc)), {"traceback": _traceback(exc)}
            ) from None
        finally:
            task_ctx.close()
        try:
            return orjson.loads(orjson.dumps(value))
        except orjson.JSONEncodeError as exc:
            raise ExecutionError(
                "ResultNotJSON",
                f"the result of {python.target} is not JSON: {exc}",
                {"result_type": type(value).__name__},
            ) from None


# -- agent --------------------------------------------------------------------------------------

#: The built-in agent (:mod:`pantheon_es.offline_agent`): no LLM, for tests and demos.
OFFLINE_TEMPLATE: Final[tuple[str, ...]] = (
    "{python}",
    "-m",
    "pantheon_es.offline_agent",
    "--prompt",
    "{prompt}",
    "--files",
    "{files}",
    "--delegates",
    "{delegates}",
)
DEFAULT_TEMPLATE: Final = "offline"

_PLACEHOLDER = re.compile(r"\{(prompt|files|delegates|task_id|python)\}")


def expand_template(
    template: Sequence[str],
    *,
    prompt: str,
    files: Sequence[str] = (),
    delegates: Sequence[str] = (),
    task_id: str = "",
    python: str | None = None,
) -> list[str]:
    """The argv of an agent command template.

    Placeholders: ``{prompt}``, ``{files}``, ``{delegates}``, ``{task_id}`` and
    ``{python}`` (default ``sys.executable``). An item that is exactly
    ``{files}`` or ``{delegates}`` becomes one item per file or delegate (none
    if there are none); inside a longer item they are joined with commas.
    Substitution is one pass, so a placeholder inside a value (a prompt that
    mentions ``{files}``) stays as it is; other braces are left alone.
    """
    lists = {"files": list(files), "delegates": list(delegates)}
    values = {
        "prompt": prompt,
        "files": ",".join(files),
        "delegates": ",".join(delegates),
        "task_id": task_id,
        "python": python or sys.executable,
    }
    argv: list[str] = []
    for item in template:
        whole = _PLACEHOLDER.fullmatch(item)
        if whole and whole[1] in lists:
            argv.extend(lists[whole[1]])
        else:
            argv.append(_PLACEHOLDER.sub(lambda m: values[m[1]], item))
    return argv


class AgentExecutor:
    """Runs an ``agent`` task: a coding-agent CLI from a named command template.

    The process runs like a ``shell`` task (same runner, environment with
    ``ctx.env()`` so the agent can talk to Pantheon, working directory of the
    worker). If it prints lines ``PANTHEON_RESULT <json>`` on stdout, the
    last one's JSON is the result; otherwise the result is the shell-style
    dict. A non-zero exit fails with ``ExitCode`` like a shell task.

    Args:
        templates: Named argv templates (see :func:`expand_template`), added to
            the built-in ``offline`` one (which they may replace).
        tail_bytes: How much of each of stdout and stderr to keep in memory.
        kill_grace: Seconds between SIGTERM and SIGKILL when the task is stopped.
        max_result_bytes: Longest ``PANTHEON_RESULT`` line accepted.
    """

    kind: str = "agent"

    def __init__(
        self,
        templates: Mapping[str, Sequence[str]] | None = None,
        *,
        tail_bytes: int = DEFAULT_TAIL_BYTES,
        kill_grace: float = DEFAULT_KILL_GRACE,
        max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES,
    ) -> None:
        merged = {DEFAULT_TEMPLATE: list(OFFLINE_TEMPLATE)}
        for name, template in (templates or {}).items():
            if isinstance(template, str) or not template:
                raise ValueError(f"agent template {name!r} must be a non-empty list of strings")
            merged[name] = [str(item) for item in template]
        self.templates: dict[str, list[str]] = merged
        self.runner = ProcessRunner(
            tail_bytes=tail_bytes, kill_grace=kill_grace, max_marked_line=max_result_bytes
        )

    def argv(self, spec: AgentSpec, task_id: str) -> list[str]:
        """The command line for ``spec``.

        Raises:
            ExecutionError: ``UnknownTemplate``, or ``InvalidTemplate`` if it expands to nothing.
        """
        name = spec.template or DEFAULT_TEMPLATE
        template = self.templates.get(name)
        if template is None:
            raise ExecutionError(
                "UnknownTemplate",
                f"no agent template named {name!r}",
                {"template": name, "known": sorted(self.templates)},
            )
        argv = expand_template(
            template,
            prompt=spec.prompt,
            files=spec.files,
            delegates=spec.delegates,
            task_id=task_id,
        )
        if not argv:
            raise ExecutionError(
                "InvalidTemplate", f"agent template {name!r} expands to no command"
            )
        return argv

    async def run(self, spec: AgentSpec | Mapping[str, Any], ctx: TaskContext) -> Any:
        """Run the agent to its end and return its result; see the class docstring."""
        agent = _coerce(spec, AgentSpec)
        argv = self.argv(agent, ctx.task_id)
        outcome = await self.runner.run(argv, ctx, marker=RESULT_MARKER.encode())
        outcome.check()
        if outcome.marked_line_too_large:
            raise ExecutionError(
                "ResultTooLarge",
                f"the {RESULT_MARKER.strip()} line is over {self.runner.max_marked_line} bytes",
                outcome.to_dict(),
            )
        if outcome.marked_line is None:
            return outcome.to_dict()
        try:
            return orjson.loads(outcome.marked_line[len(RESULT_MARKER) :])
        except orjson.JSONDecodeError as exc:
            raise ExecutionError(
                "ResultNotJSON",
                f"the {RESULT_MARKER.strip()} line is not JSON: {exc}",
                outcome.to_dict(),
            ) from None


def default_executors(templates: Mapping[str, Sequence[str]] | None = None) -> dict[str, Executor]:
    """One executor of each kind, by kind, with ``templates`` for the agent executor."""
    executors: list[Executor] = [ShellExecutor(), PythonExecutor(), AgentExecutor(templates)]
    return {executor.kind: executor for executor in executors}
