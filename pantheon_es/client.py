"""A Python client: commands and queries over NATS, typed errors back.

Any language can do the same with a NATS client: publish a JSON body to the
subject, read ``{"ok": ...}`` from the reply (see docs/protocol.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import orjson
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from pantheon_es import connection, ids
from pantheon_es.bulk import CommandBatcher
from pantheon_es.errors import (
    ForbiddenError,
    InvalidError,
    PantheonError,
    UnavailableError,
    error_from_reply,
)
from pantheon_es.subjects import Subjects

log = structlog.get_logger(__name__)

_INBOX_PREFIX = re.compile(r"^[^.*>\s]+(\.[^.*>\s]+)*$")
_USERINFO = re.compile(r"//([^@/]*)@")


def redact_url(url: str) -> str:
    """``url`` without its password or token (``nats://user:***@host``)."""

    def hide(m: re.Match[str]) -> str:
        user, colon, _secret = m.group(1).partition(":")
        return f"//{user}:***@" if colon else "//***@"

    return _USERINFO.sub(hide, url)


DISCOVERY_FILE = "pantheon.json"
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled", "timed_out", "skipped"})


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


async def close_connection(nc: NATS, timeout: float = 5.0) -> None:
    """Drain ``nc`` (flush what is pending) without waiting for ever on a server that is
    gone (nats-py would reconnect indefinitely): after ``timeout``, just close."""
    try:
        await asyncio.wait_for(nc.drain(), timeout)
    except Exception:  # TimeoutError included
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 1.0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _submit_item(_verb: str, body: dict[str, Any]) -> dict[str, Any]:
    return body


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
        retry_for: float = 0.0,
        on_retry: Callable[[PantheonError], None] | None = None,
        batch_submits: bool = True,
    ) -> None:
        """``retry_for`` > 0: retry retryable errors (unavailable, in flight, overloaded)
        for up to that many seconds; each command then carries one idempotency key
        across its tries, so a retry after a lost reply never acts twice. ``on_retry``
        hears of each retried error (default: a structlog warning).

        ``batch_submits``: :meth:`submit_task` calls made in one turn of the event
        loop leave as one ``task.submit_many`` request (a lone one as ``task.submit``);
        each still gets its own reply or typed error."""
        self.nc = nc
        self.tenant = tenant
        self.subjects = subjects or Subjects()
        self.timeout = timeout
        self.actor = actor
        self.retry_for = retry_for
        self.on_retry = on_retry
        self._submits = (
            CommandBatcher("task", "submit_many", "submits", _submit_item, retry=True)
            if batch_submits
            else None
        )

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        tenant: str = "default",
        root: str = "pantheon",
        inbox_prefix: str | None = None,
        **kwargs: Any,
    ) -> PantheonClient:
        """Connect to NATS at ``url``; credentials go in it (``nats://user:password@host``
        or ``nats://token@host``), as nats-py reads them.

        ``inbox_prefix`` (default: ``PANTHEON_INBOX_PREFIX``, else nats-py's ``_INBOX``)
        starts every reply and deliver subject of this connection: a user whose NATS
        permissions let it subscribe only to ``<prefix>.>`` sees no other user's replies
        or event deliveries (docs/operations.md, "NATS permissions for one tenant").

        Raises:
            ForbiddenError: the server refused the credentials.
            UnavailableError: no server answered.
            InvalidError: ``inbox_prefix`` is no subject prefix.
        """
        prefix = inbox_prefix or os.environ.get("PANTHEON_INBOX_PREFIX") or None
        options: dict[str, Any] = {}
        if prefix is not None:
            if not _INBOX_PREFIX.match(prefix):
                raise InvalidError(
                    f"inbox prefix {prefix!r} (PANTHEON_INBOX_PREFIX): subject tokens "
                    "separated by dots, without *, > or spaces"
                )
            options["inbox_prefix"] = prefix
        refused: list[str] = []

        async def on_error(exc: Exception) -> None:
            text = str(exc)
            lowered = text.lower()
            # A refused publish or subscription is not logged: it becomes a forbidden
            # error where it matters (Connection.request_checked).
            if "authorization violation" in lowered:
                refused.append(text)
            elif "permissions violation" not in lowered:
                log.warning("NATS error", error=text)

        try:
            nc = await connection.connect(
                url, max_reconnect_attempts=3, connect_timeout=3, allow_reconnect=True,
                error_cb=on_error, **options,
            )  # fmt: skip
        except (OSError, nats.errors.NoServersError, TimeoutError) as exc:
            if refused:
                raise ForbiddenError(
                    f"NATS at {redact_url(url)} refused the credentials (authorization violation)"
                ) from None
            raise UnavailableError(f"cannot reach NATS at {redact_url(url)}: {exc}") from None
        return cls(nc, tenant=tenant, subjects=Subjects(root), **kwargs)

    async def close(self) -> None:
        await self.nc.close()

    async def __aenter__(self) -> PantheonClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def request(self, subject: str, body: dict[str, Any] | bytes) -> dict[str, Any]:
        """Send a command or query and return its result.

        Raises:
            PantheonError: the reply's typed error; ``unavailable`` without a reply;
                ``forbidden`` at once when NATS permissions refuse the request.
        """
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        try:
            msg = await self._request(subject, data, self.timeout)
        except nats.errors.NoRespondersError:
            raise UnavailableError(f"nothing serves {subject}: is `pantheon up` running?") from None
        except nats.errors.TimeoutError:
            raise UnavailableError(f"no reply on {subject} within {self.timeout}s") from None
        reply = orjson.loads(msg.data)
        if reply.get("ok"):
            return dict(reply.get("result") or {})
        raise error_from_reply(reply.get("error") or {})

    async def _request(self, subject: str, data: bytes, timeout: float) -> Msg:
        """``nc.request``, but a refusal by the server's permissions is ``forbidden`` as soon
        as the server says so, not a timeout (on a :class:`~pantheon_es.connection.Connection`;
        docs/operations.md, "NATS permissions for one tenant")."""
        if not isinstance(self.nc, connection.Connection):
            return await self.nc.request(subject, data, timeout=timeout)
        try:
            return await self.nc.request_checked(subject, data, timeout=timeout)
        except ForbiddenError as exc:
            why = exc.message
            if (exc.details or {}).get("subject") == subject:  # not its inbox: the request
                why = (
                    "the server refused the publish (a user held to tenant T may send T's "
                    'commands and queries only; docs/operations.md, "NATS permissions for '
                    'one tenant")'
                )
            raise ForbiddenError(
                f"NATS permissions do not let this user send {subject}: {why}",
                details=exc.details,
            ) from None

    @contextlib.contextmanager
    def _refused_subscriptions(
        self, subjects: list[str], wake: asyncio.Event
    ) -> Iterator[list[ForbiddenError]]:
        """While inside, the server's refusals of subscriptions to ``subjects`` (the notices
        a wait listens to) are collected in the list yielded, and set ``wake``."""
        refused: list[ForbiddenError] = []
        nc = self.nc
        if not isinstance(nc, connection.Connection):
            yield refused
            return
        lowered = {s.lower(): s for s in subjects}

        def denied(what: str, subject: str) -> None:
            if what == "subscription" and subject in lowered:
                refused.append(
                    ForbiddenError(
                        "NATS permissions do not let this user receive the notices on "
                        f"{lowered[subject]}: the server refused it a subscription",
                        details={"refused": what, "subject": lowered[subject]},
                    )
                )
                wake.set()

        with nc.on_denied(denied):
            yield refused

    async def command(self, aggregate: str, verb: str, body: dict[str, Any]) -> dict[str, Any]:
        subject = self.subjects.command(self.tenant, aggregate, verb)
        return await self._retrying(subject, self.command_body(body))

    def command_body(self, body: dict[str, Any]) -> dict[str, Any]:
        """``body`` as :meth:`command` sends it: with this client's actor, and an
        idempotency key when it retries (the same for every try)."""
        if self.actor and "actor" not in body:
            body = {**body, "actor": self.actor}
        if self.retry_for > 0 and "idempotency_key" not in body:
            body = {**body, "idempotency_key": ids.new_id()}
        return body

    async def query(
        self, model: str, verb: str, body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        return await self._retrying(self.subjects.query(self.tenant, model, verb), body or {})

    async def _retrying(self, subject: str, body: dict[str, Any]) -> dict[str, Any]:
        """``request``, tried again on retryable errors for up to ``retry_for`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.retry_for
        backoff = 0.1
        while True:
            try:
                return await self.request(subject, body)
            except PantheonError as exc:
                delay = exc.retry_after if exc.retry_after is not None else backoff
                retryable = exc.retryable or exc.retry_after is not None
                if not retryable or loop.time() + delay > deadline:
                    raise
                if self.on_retry is not None:
                    self.on_retry(exc)
                else:
                    log.warning("retrying", subject=subject, code=exc.code.value, error=exc.message)
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, 2.0)

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
        task_id: str | None = None,
        inactivity_timeout: float | None = None,
        max_attempts: int | None = None,
        options: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Submit a task. ``options``: scheduling options (SchedulingOptions fields:
        fairness_key, concurrency_key, concurrency_limit, retry, *_timeout)."""
        body: dict[str, Any] = {
            **(options or {}),
            "name": name,
            "executor": executor,
            "priority": priority,
        }
        _put(
            body,
            resources=resources,
            labels=labels,
            idempotency_key=idempotency_key,
            task_id=task_id,
            inactivity_timeout=inactivity_timeout,
            max_attempts=max_attempts,
        )
        if self._submits is not None:
            return await self._submits.send(self, "submit", body)
        return await self.command("task", "submit", body)

    async def spawn_agent(
        self,
        prompt: str,
        *,
        files: list[str] | None = None,
        delegates: list[str] | None = None,
        template: str | None = None,
        name: str | None = None,
        priority: str | int = "medium",
        resources: dict[str, Any] | None = None,
        labels: dict[str, str] | None = None,
        agent_id: str | None = None,
        inactivity_timeout: float | None = None,
        idempotency_key: str | None = None,
        options: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {**(options or {}), "prompt": prompt, "priority": priority}
        _put(
            body,
            files=files,
            delegates=delegates,
            template=template,
            name=name,
            resources=resources,
            labels=labels,
            agent_id=agent_id,
            inactivity_timeout=inactivity_timeout,
            idempotency_key=idempotency_key,
        )
        return await self.command("task", "spawn", body)

    async def redrive_task(self, task_id: str, reason: str | None = None) -> dict[str, Any]:
        """Run a failed or timed-out task again (the dead-letter queue's re-drive)."""
        body: dict[str, Any] = {"task_id": task_id}
        _put(body, reason=reason)
        return await self.command("task", "redrive", body)

    async def why(self, task_id: str, *, timeout: float = 2.0) -> dict[str, Any]:
        """Why a task is where it is: its read-model state plus the scheduler's live view.

        ``scheduler`` is ``None`` when no scheduler answered within ``timeout``.
        """
        task = await self.get_task(task_id)
        live: dict[str, Any] | None
        try:
            msg = await self._request(
                self.subjects.scheduler(self.tenant, "why"),
                orjson.dumps({"task_id": task_id}),
                timeout,
            )
            reply = orjson.loads(msg.data)
            live = reply.get("result") if reply.get("ok") else None
        except (TimeoutError, nats.errors.NoRespondersError, nats.errors.TimeoutError):
            live = None
        return {
            "task_id": task_id,
            "status": task["status"],
            "priority": task["priority"],
            "blocked_reason": task.get("blocked_reason"),
            "blocked_details": task.get("blocked_details"),
            "not_before": task.get("not_before"),
            "pending_since": task.get("pending_since"),
            "attempt": task["attempt"],
            "error": task.get("error"),
            "scheduler": live,
        }

    async def wait_for_task(
        self, task_id: str, *, timeout: float = 60.0, statuses: frozenset[str] = TERMINAL_STATUSES
    ) -> dict[str, Any]:
        """The task's state once it reaches one of ``statuses`` (default: finished).

        Listens to the task's committed-event notices, so it hears of the
        change as soon as the event is stored, then reads the state.
        """
        return await self._wait_on_notices(
            [self.subjects.changed(self.tenant, "task", task_id)],
            lambda: self.get_task(task_id),
            lambda state: state["status"] in statuses,
            f"task {task_id}",
            timeout,
        )

    async def _wait_on_notices(
        self,
        subjects: list[str],
        read: Callable[[], Awaitable[dict[str, Any]]],
        done: Callable[[dict[str, Any]], bool],
        what: str,
        timeout: float,
        *,
        recheck: float | None = None,
        settle: float = 0.0,
    ) -> dict[str, Any]:
        """``read()`` until ``done`` says so, woken by committed-event notices on ``subjects``
        (and every ``recheck`` seconds; ``settle``: let a burst of notices pass first).
        A refused subscription to the notices is ``forbidden`` (unless already done)."""
        wake = asyncio.Event()

        async def on_notice(_msg: Any) -> None:
            wake.set()

        subs: list[Any] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        with self._refused_subscriptions(subjects, wake) as refused:
            try:
                for subject in subjects:
                    subs.append(await self.nc.subscribe(subject, cb=on_notice))
                while True:
                    wake.clear()
                    state = await read()
                    if done(state):
                        return state
                    if refused:
                        raise refused[0]
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        raise UnavailableError(
                            f"{what} still {state['status']} after {timeout}s", retry_after=1.0
                        )
                    wait = remaining if recheck is None else min(remaining, recheck)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), wait)
                    if settle and not refused:
                        await asyncio.sleep(settle)
            finally:
                for sub in subs:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()

    async def cancel_task(self, task_id: str, reason: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"task_id": task_id}
        if reason:
            body["reason"] = reason
        return await self.command("task", "cancel", body)

    async def archive_task(self, task_id: str, reason: str = "cleanup") -> dict[str, Any]:
        return await self.command("task", "archive", {"task_id": task_id, "reason": reason})

    async def cleanup(self, older_than_minutes: float) -> dict[str, Any]:
        return await self.command("task", "cleanup", {"older_than_minutes": older_than_minutes})

    async def get_task(self, task_id: str) -> dict[str, Any]:
        return await self.query("task", "get", {"task_id": task_id})

    async def list_tasks(self, **filters: Any) -> dict[str, Any]:
        return await self.query("task", "list", {k: v for k, v in filters.items() if v is not None})

    # -- workflows --------------------------------------------------------------------------------
    async def create_workflow(
        self,
        name: str,
        tasks: list[dict[str, Any]],
        *,
        failure_policy: str = "fail_fast",
        labels: dict[str, str] | None = None,
        idempotency_key: str | None = None,
        workflow_id: str | None = None,
    ) -> dict[str, Any]:
        """Create and start a workflow: ``tasks`` are WorkflowNode objects (name, executor,
        depends_on, ...). Returns ``{"workflow_id", "tasks": {node: task_id}}``."""
        body: dict[str, Any] = {"name": name, "tasks": tasks, "failure_policy": failure_policy}
        _put(body, labels=labels, idempotency_key=idempotency_key, workflow_id=workflow_id)
        return await self.command("workflow", "create", body)

    async def cancel_workflow(self, workflow_id: str, reason: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"workflow_id": workflow_id}
        _put(body, reason=reason)
        return await self.command("workflow", "cancel", body)

    async def redrive_workflow(self, workflow_id: str, reason: str | None = None) -> dict[str, Any]:
        """Run a failed or cancelled workflow's nodes that did not complete again.

        Returns ``{"workflow_id", "status": "running", "redrive", "tasks": {node:
        task_id}}`` (the nodes that run again); completed nodes keep their results.
        """
        body: dict[str, Any] = {"workflow_id": workflow_id}
        _put(body, reason=reason)
        return await self.command("workflow", "redrive", body)

    async def get_workflow(self, workflow_id: str, *, nodes: bool = True) -> dict[str, Any]:
        return await self.query("workflow", "get", {"workflow_id": workflow_id, "nodes": nodes})

    async def wait_for_workflow(
        self,
        workflow_id: str,
        *,
        timeout: float = 600.0,
        on_change: Callable[[dict[str, Any]], Any] | None = None,
    ) -> dict[str, Any]:
        """The workflow once it finished; ``on_change(state)`` after each change of its tasks.

        Woken by the notices of committed task events of the tenant (no fixed-interval
        polling), with a 1 s safety re-check.
        """
        finished = ("completed", "failed", "cancelled")

        async def read() -> dict[str, Any]:
            state = await self.get_workflow(workflow_id, nodes=on_change is not None)
            if on_change is not None:
                on_change(state)
            return state

        state = await self._wait_on_notices(
            [
                self.subjects.changed(self.tenant, "workflow", workflow_id),
                self.subjects.changed(self.tenant, "task"),
            ],
            read,
            lambda wf: wf["status"] in finished,
            f"workflow {workflow_id}",
            timeout,
            recheck=1.0,
            settle=0.05,
        )
        return state if on_change is not None else await self.get_workflow(workflow_id)

    async def monitor(self) -> dict[str, Any]:
        return await self.query("task", "monitor", {})

    async def list_workers(self, **filters: Any) -> dict[str, Any]:
        return await self.query(
            "worker", "list", {k: v for k, v in filters.items() if v is not None}
        )

    async def list_messages(self, **filters: Any) -> dict[str, Any]:
        return await self.query(
            "mailbox", "list", {k: v for k, v in filters.items() if v is not None}
        )

    # -- reports from the holder of a lease --------------------------------------------------------
    async def report_progress(
        self,
        task_id: str,
        lease_id: str,
        fencing_token: int,
        *,
        progress: float | None = None,
        message: str = "",
        state: str = "active",
    ) -> dict[str, Any]:
        body = {
            "task_id": task_id,
            "lease_id": lease_id,
            "fencing_token": fencing_token,
            "message": message,
            "state": state,
        }
        _put(body, progress=progress)
        return await self.command("task", "progress", body)

    async def heartbeat(
        self,
        task_id: str,
        lease_id: str,
        fencing_token: int,
        *,
        activity: bool = True,
        usage: dict[str, float] | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "task_id": task_id,
            "lease_id": lease_id,
            "fencing_token": fencing_token,
            "activity": activity,
        }
        _put(body, usage=usage)
        return await self.command("task", "heartbeat", body)

    # -- messages ----------------------------------------------------------------------------------
    async def send_message(
        self,
        to: str,
        body: str,
        *,
        priority: str = "medium",
        type: str = "update",
        sender: str | None = None,
    ) -> dict[str, Any]:
        request: dict[str, Any] = {"to": to, "body": body, "priority": priority, "type": type}
        _put(request, sender=sender)
        return await self.command("mailbox", "send", request)

    async def receive_messages(
        self, agent_id: str, *, max: int = 10, ack: bool = True, wait: float | None = None
    ) -> list[dict[str, Any]]:
        """Take pending messages, highest priority first; with ``wait``, block up to that long."""
        subject = self.subjects.changed(self.tenant, "mailbox", agent_id)
        arrived = asyncio.Event()

        async def on_notice(msg: Any) -> None:
            arrived.set()

        with self._refused_subscriptions([subject], arrived) as refused:
            sub = await self.nc.subscribe(subject, cb=on_notice) if wait else None
            try:
                deadline = asyncio.get_running_loop().time() + (wait or 0)
                while True:
                    arrived.clear()
                    result = await self.command(
                        "mailbox", "receive", {"agent_id": agent_id, "max": max, "ack": ack}
                    )
                    messages: list[dict[str, Any]] = result["messages"]
                    remaining = deadline - asyncio.get_running_loop().time()
                    if messages or not wait or remaining <= 0:
                        return messages
                    if refused:
                        raise refused[0]
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(arrived.wait(), remaining)
            finally:
                if sub is not None:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()

    async def ack_messages(self, agent_id: str, message_ids: list[str]) -> dict[str, Any]:
        return await self.command(
            "mailbox", "ack", {"agent_id": agent_id, "message_ids": message_ids}
        )


def _put(body: dict[str, Any], **optional: Any) -> None:
    """Add the optional fields that were given (not None, not empty)."""
    for key, value in optional.items():
        if value is not None and value != [] and value != {}:
            body[key] = value


__all__ = ["PantheonClient", "PantheonError", "discover"]
