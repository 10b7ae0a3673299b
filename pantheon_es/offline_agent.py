"""The built-in offline agent: a stand-in for a coding-agent CLI, for tests and demos.

Run as ``python -m pantheon_es.offline_agent --prompt TEXT [--files F ...]
[--delegates D ...]`` (the ``offline`` template of the agent executor). It
uses no LLM and no network besides NATS. Its identity comes from the
environment the worker sets: ``PANTHEON_NATS_URL``, ``PANTHEON_NAMESPACE``
(subject root, default ``pantheon``), ``PANTHEON_TENANT`` (default
``default``), ``PANTHEON_TASK_ID``, ``PANTHEON_LEASE_ID`` and
``PANTHEON_FENCING_TOKEN``.

The prompt is a script. A line whose first word is ``/name`` (letters only)
is a directive, run in order; every other line is just text (so a path like
``/etc/hosts`` is text):

``/progress <percent 0-100> <message...>``
    report progress.
``/send <agent_id|@delegates> <priority> <type> <text...>``
    send a message (``@delegates``: to each delegate).
``/recv <n> [timeout_seconds=30]``
    read ``n`` messages, waiting up to the timeout (state ``waiting_for_input``
    meanwhile); fewer by then fails the run.
``/sleep <seconds>``
    do nothing for a while (produces no activity).
``/fail <message...>``
    print the message on stderr and exit 1.
``/result <json>``
    the result of the run.

Without directives it analyses its files: progress 0.1 "reading", one
progress report per file (lines and bytes), reads the messages already
waiting, progress 1.0 "done"; its result is ``{"prompt_words", "files",
"delegates", "messages"}``. With directives and no ``/result`` the result is
``{"messages": [received], "sent": [message ids]}``.

Every message received is printed as a line ``MESSAGE <json>``; at the end the
result is printed as ``PANTHEON_RESULT <json>`` and the exit code is 0. A
failure (a ``/fail``, a ``/recv`` timeout, an error from Pantheon) prints its
reason on stderr and exits 1; a prompt that does not parse exits 2. NATS is
only connected to when something needs it, so ``/result`` alone runs anywhere.

Retryable errors (``unavailable``, ``overloaded``, anything with a
``retry_after``) are retried for up to a minute, so a restart of the command
service does not fail the agent. Sends and message takes carry an idempotency
key, the same on every try: a retry after a lost reply gets that reply instead
of sending twice or losing the messages the first try took.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson

from pantheon_es.client import PantheonClient
from pantheon_es.errors import PantheonError
from pantheon_es.executors import RESULT_MARKER
from pantheon_es.mailbox import MessagePriority, MessageType

#: ``/send @delegates ...`` sends to each of the agent's delegates.
DELEGATES: Final = "@delegates"
DEFAULT_RECV_TIMEOUT: Final = 30.0
#: How long an unavailable or overloaded Pantheon (e.g. a restarting command
#: service) is ridden out before the run fails, seconds.
DEFAULT_RETRY_FOR: Final = 60.0
MESSAGE_MARKER: Final = "MESSAGE "

_DIRECTIVE = re.compile(r"^/([A-Za-z]+)$")
_READ_BATCH = 100


# -- the prompt ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    fraction: float
    message: str


@dataclass(frozen=True)
class Send:
    to: str
    priority: str
    type: str
    text: str


@dataclass(frozen=True)
class Recv:
    count: int
    timeout: float = DEFAULT_RECV_TIMEOUT


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Fail:
    message: str


@dataclass(frozen=True)
class SetResult:
    value: Any


Directive = Progress | Send | Recv | Sleep | Fail | SetResult


class DirectiveError(ValueError):
    """A directive in the prompt does not parse."""

    def __init__(self, line_number: int, line: str, problem: str) -> None:
        super().__init__(f"prompt line {line_number} ({line.strip()!r}): {problem}")
        self.line_number = line_number


def _number(text: str, what: str, low: float, high: float | None = None) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{what} must be a number, not {text!r}") from None
    if not (low <= value and (high is None or value <= high)):
        bounds = f"{low:g}..{high:g}" if high is not None else f">= {low:g}"
        raise ValueError(f"{what} must be {bounds}, not {text}")
    return value


def _parse_directive(name: str, rest: str) -> Directive:
    words = rest.split()
    match name:
        case "progress":
            if not words:
                raise ValueError("usage: /progress <percent 0-100> <message...>")
            percent = _number(words[0], "percent", 0, 100)
            return Progress(percent / 100, " ".join(words[1:]))
        case "send":
            parts = rest.split(maxsplit=3)
            if len(parts) < 4:
                raise ValueError("usage: /send <agent_id|@delegates> <priority> <type> <text...>")
            to, priority, type_, text = parts
            if priority not in {p.value for p in MessagePriority}:
                raise ValueError(f"priority must be one of {', '.join(MessagePriority)}")
            if type_ not in {t.value for t in MessageType}:
                raise ValueError(f"type must be one of {', '.join(MessageType)}")
            return Send(to, priority, type_, text)
        case "recv":
            if not 1 <= len(words) <= 2:
                raise ValueError("usage: /recv <n> [timeout_seconds]")
            if not words[0].isdigit() or int(words[0]) < 1:
                raise ValueError(f"n must be a whole number >= 1, not {words[0]!r}")
            timeout = _number(words[1], "timeout", 0) if len(words) == 2 else DEFAULT_RECV_TIMEOUT
            return Recv(int(words[0]), timeout)
        case "sleep":
            if len(words) != 1:
                raise ValueError("usage: /sleep <seconds>")
            return Sleep(_number(words[0], "seconds", 0))
        case "fail":
            return Fail(rest.strip() or "failed on purpose")
        case "result":
            try:
                return SetResult(orjson.loads(rest))
            except orjson.JSONDecodeError as exc:
                raise ValueError(f"not JSON: {exc}") from None
    raise ValueError(
        f"unknown directive /{name}; known: /progress /send /recv /sleep /fail /result"
    )


def parse_prompt(prompt: str) -> list[Directive]:
    """The directives of ``prompt``, in order (text lines are skipped).

    Raises:
        DirectiveError: for the first directive that does not parse.
    """
    directives: list[Directive] = []
    for number, line in enumerate(prompt.splitlines(), start=1):
        first, _, rest = line.strip().partition(" ")
        match = _DIRECTIVE.match(first)
        if match is None:
            continue
        try:
            directives.append(_parse_directive(match[1].lower(), rest))
        except ValueError as exc:
            raise DirectiveError(number, line, str(exc)) from None
    return directives


def needs_nats(directives: Sequence[Directive]) -> bool:
    """Whether running ``directives`` talks to Pantheon (no directives: the default run does)."""
    if not directives:
        return True
    return any(isinstance(d, Progress | Send | Recv) for d in directives)


# -- the default run: file analysis ------------------------------------------------------------


def analyze_file(path: str | Path) -> dict[str, Any]:
    """``{"lines", "bytes"}`` of a file, ``{"missing": True}``, or ``{"error": reason}``.

    A last line without a newline counts as a line, as in an editor.
    """
    newlines = size = 0
    last = b""
    try:
        with open(path, "rb") as file:
            while chunk := file.read(1024 * 1024):
                newlines += chunk.count(b"\n")
                size += len(chunk)
                last = chunk[-1:]
    except FileNotFoundError:
        return {"missing": True}
    except OSError as exc:  # a directory, no permission, ...
        return {"error": exc.strerror or str(exc)}
    return {"lines": newlines + (1 if size and last != b"\n" else 0), "bytes": size}


def analyze_files(paths: Sequence[str]) -> dict[str, dict[str, Any]]:
    """:func:`analyze_file` of each path, by path."""
    return {path: analyze_file(path) for path in paths}


def describe(path: str, info: Mapping[str, Any]) -> str:
    """One line about a file, for a progress message."""
    if info.get("missing"):
        return f"{path}: missing"
    if "error" in info:
        return f"{path}: {info['error']}"
    return f"{path}: {info['lines']} lines, {info['bytes']} bytes"


def default_result(
    prompt: str,
    files: Mapping[str, Any],
    delegates: Sequence[str],
    messages: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """The result of a run without directives."""
    return {
        "prompt_words": len(prompt.split()),
        "files": dict(files),
        "delegates": list(delegates),
        "messages": list(messages),
    }


# -- the run ------------------------------------------------------------------------------------


class AgentFailure(Exception):
    """The run fails: the message goes to stderr, the exit code is 1."""


@dataclass(frozen=True)
class Identity:
    """Who the agent is and where Pantheon is, as the worker's environment says."""

    nats_url: str | None = None
    namespace: str = "pantheon"
    tenant: str = "default"
    task_id: str | None = None
    lease_id: str | None = None
    fencing_token: int | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Identity:
        token = environ.get("PANTHEON_FENCING_TOKEN") or None
        if token is not None and not token.isdigit():
            raise AgentFailure(f"PANTHEON_FENCING_TOKEN must be a whole number, not {token!r}")
        return cls(
            nats_url=environ.get("PANTHEON_NATS_URL") or None,
            namespace=environ.get("PANTHEON_NAMESPACE") or "pantheon",
            tenant=environ.get("PANTHEON_TENANT") or "default",
            task_id=environ.get("PANTHEON_TASK_ID") or None,
            lease_id=environ.get("PANTHEON_LEASE_ID") or None,
            fencing_token=int(token) if token is not None else None,
        )


def _required(value: str | None, variable: str, purpose: str) -> str:
    if value is None:
        raise AgentFailure(f"{variable} is not set: {purpose} needs it")
    return value


def _emit(marker: str, value: Any) -> None:
    sys.stdout.write(marker + orjson.dumps(value).decode() + "\n")
    sys.stdout.flush()


class OfflineAgent:
    """One run of the offline agent.

    Args:
        prompt: The prompt (directives and text).
        directives: ``parse_prompt(prompt)``.
        files: The files to analyse (default run).
        delegates: The agents ``/send @delegates`` reaches.
        identity: Who it is and where Pantheon is.
        retry_for: Seconds to keep retrying a retryable error from Pantheon.
    """

    def __init__(
        self,
        prompt: str,
        directives: Sequence[Directive],
        *,
        files: Sequence[str] = (),
        delegates: Sequence[str] = (),
        identity: Identity,
        retry_for: float = DEFAULT_RETRY_FOR,
    ) -> None:
        self.prompt = prompt
        self.directives = list(directives)
        self.files = list(files)
        self.delegates = list(delegates)
        self.identity = identity
        self.retry_for = retry_for
        self.received: list[dict[str, Any]] = []
        self.sent: list[str] = []
        self._client: PantheonClient | None = None

    async def run(self) -> Any:
        """Run the directives (or the default analysis); returns the result.

        Raises:
            AgentFailure: ``/fail``, a ``/recv`` timeout, missing identity.
            PantheonError: Pantheon refused, or could not be reached in time.
        """
        try:
            if not self.directives:
                return await self._default()
            result: Any = None
            has_result = False
            for directive in self.directives:
                if isinstance(directive, SetResult):
                    result, has_result = directive.value, True
                else:
                    await self._do(directive)
            return result if has_result else {"messages": self.received, "sent": self.sent}
        finally:
            if self._client is not None:
                await self._client.close()

    async def _default(self) -> dict[str, Any]:
        await self._progress(0.1, "reading")
        files = analyze_files(self.files)
        for index, (path, info) in enumerate(files.items(), start=1):
            await self._progress(0.1 + 0.8 * index / len(files), describe(path, info))
        while len(await self._receive(_READ_BATCH, None)) == _READ_BATCH:
            pass  # a full batch: there may be more waiting
        await self._progress(1.0, "done")
        return default_result(self.prompt, files, self.delegates, self.received)

    async def _do(self, directive: Directive) -> None:
        match directive:
            case Progress(fraction, message):
                await self._progress(fraction, message)
            case Send(to, priority, type_, text):
                for recipient in self.delegates if to == DELEGATES else [to]:
                    await self._send(recipient, text, priority, type_)
            case Recv(count, timeout):
                await self._recv(count, timeout)
            case Sleep(seconds):
                await asyncio.sleep(seconds)
            case Fail(message):
                raise AgentFailure(message)

    async def _connected(self) -> PantheonClient:
        if self._client is None:
            url = _required(self.identity.nats_url, "PANTHEON_NATS_URL", "talking to Pantheon")
            # The client retries retryable errors with one idempotency key per command,
            # so a service restart neither fails the agent nor sends a message twice.
            self._client = await PantheonClient.connect(
                url,
                tenant=self.identity.tenant,
                root=self.identity.namespace,
                retry_for=self.retry_for,
                on_retry=_say_retrying,
            )
        return self._client

    async def _progress(self, fraction: float | None, message: str, state: str = "active") -> None:
        purpose = "reporting progress"
        task_id = _required(self.identity.task_id, "PANTHEON_TASK_ID", purpose)
        lease_id = _required(self.identity.lease_id, "PANTHEON_LEASE_ID", purpose)
        token = self.identity.fencing_token
        if token is None:
            raise AgentFailure(f"PANTHEON_FENCING_TOKEN is not set: {purpose} needs it")
        client = await self._connected()
        await client.report_progress(
            task_id, lease_id, token, progress=fraction, message=message, state=state
        )

    async def _send(self, to: str, text: str, priority: str, type_: str) -> None:
        client = await self._connected()
        reply = await client.send_message(
            to, text, priority=priority, type=type_, sender=self.identity.task_id
        )
        self.sent.append(str(reply["message_id"]))

    async def _receive(self, limit: int, wait: float | None) -> list[dict[str, Any]]:
        """Take up to ``limit`` messages (read on receipt), waiting up to ``wait`` seconds."""
        agent_id = _required(self.identity.task_id, "PANTHEON_TASK_ID", "reading messages")
        client = await self._connected()
        messages = await client.receive_messages(agent_id, max=limit, ack=True, wait=wait)
        for message in messages:
            _emit(MESSAGE_MARKER, message)
        self.received.extend(messages)
        return messages

    async def _recv(self, count: int, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        got = 0
        await self._progress(None, f"waiting for {count} message(s)", "waiting_for_input")
        while True:
            remaining = max(0.0, deadline - loop.time())
            got += len(await self._receive(count - got, remaining or None))
            if got >= count or remaining <= 0:
                break
        if got < count:
            raise AgentFailure(f"received {got} of {count} message(s) within {timeout:g}s")
        await self._progress(None, f"received {count} message(s)", "active")


def _say_retrying(exc: PantheonError) -> None:
    print(f"offline agent: {exc.code.value}: {exc.message}; retrying", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    """The command line (the ``offline`` agent template passes exactly these)."""
    parser = argparse.ArgumentParser(
        prog="python -m pantheon_es.offline_agent",
        description="Pantheon's built-in offline agent (no LLM): runs the prompt's directives.",
    )
    parser.add_argument("--prompt", required=True, help="the prompt: text and /directives")
    parser.add_argument("--files", nargs="*", default=[], metavar="FILE")
    parser.add_argument("--delegates", nargs="*", default=[], metavar="AGENT_ID")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the agent; returns the exit code (0 done, 1 failed, 2 bad prompt or usage)."""
    args = build_parser().parse_args(argv)
    # nats-py logs every failed connect attempt with a traceback; the one line
    # we print about the failure says it all.
    logging.getLogger("nats").setLevel(logging.CRITICAL)
    try:
        directives = parse_prompt(args.prompt)
    except DirectiveError as exc:
        print(f"offline agent: {exc}", file=sys.stderr)
        return 2
    try:
        agent = OfflineAgent(
            args.prompt,
            directives,
            files=args.files,
            delegates=args.delegates,
            identity=Identity.from_environ(os.environ),
        )
        result = asyncio.run(agent.run())
    except AgentFailure as exc:
        print(f"offline agent: {exc}", file=sys.stderr)
        return 1
    except PantheonError as exc:
        print(f"offline agent: {exc.code.value}: {exc.message}", file=sys.stderr)
        return 1
    _emit(RESULT_MARKER, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
