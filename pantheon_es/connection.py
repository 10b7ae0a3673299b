"""The NATS connection every Pantheon process uses: nats-py's client plus raw handlers
and immediate writes.

:class:`Connection` is nats-py's ``Client`` with :meth:`Connection.publish_now` and
:meth:`Connection.flush_now` (write now, not on the flusher task's next turn: replies,
offers and a lease behind its submission; docs/decisions.md, "A new task's lease in
its submission's wake"), and :meth:`Connection.raw_subscribe`: a subscription whose
messages go straight to
a synchronous handler as the protocol parser hands them over (subject, reply,
payload and header block as bytes). nats-py's own path parses every header
block into a dict, builds a ``Msg``, queues it and wakes a task that awaits the
callback: about 16 us a message here, of which the header parse alone is 5.
The event feed (:class:`pantheon_es.store.EventFeed`) reads the log through a
raw subscription at about 8 us a message (docs/decisions.md, "The feed reads
raw messages").

This relies on internals of nats-py 2.x: ``Client._process_msg(sid, subject, reply,
payload, headers)``, which the protocol parser calls for every message, and the
pending buffer its flusher writes (``_pending``, ``_pending_data_size``,
``_transport``); tests/test_connection.py fails if they stop being so. Every other
subscription and publish takes nats-py's path unchanged.

A server that refuses a publish or a subscription for lack of permission drops it and
says so in an ``-ERR`` (nats-py hands it to ``_process_err``, lowercased); a request
then simply gets no reply. :meth:`Connection.request_checked` and
:meth:`Connection.on_denied` turn such a refusal into a ``forbidden`` error at once
instead of a timeout (docs/decisions.md, "NATS permissions for one tenant"). They
rely on ``Client._process_err(err_msg)`` and on the reply machinery of nats-py's
requests (the inbox ``_resp_sub_prefix`` made by ``_init_request_sub``, the futures
of ``_resp_map`` by token, ``_nuid``); tests/test_connection.py and
tests/test_tenant_permissions.py fail if those change.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable, Iterable, Iterator
from secrets import token_hex
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.protocol import command as prot_command
from nats.protocol.parser import PERMISSIONS_ERR

from pantheon_es.errors import ForbiddenError

#: (subject, reply, payload, header block or None) -> None; called on the reading task
RawHandler = Callable[[bytes, bytes, bytes, bytes | None], None]
#: (what, subject) of a permission violation, both lowercase as nats-py passes them on:
#: ("publish", "$js.api...") or ("subscription", "_inbox...")
DenialHandler = Callable[[str, str], None]


#: Said with a refused subscription: replies and deliveries come to the inboxes.
_INBOX_HINT = (
    " (replies and deliveries come to this connection's inboxes; PANTHEON_INBOX_PREFIX "
    "sets their prefix to one its permissions allow)"
)


def denial_of(err_msg: str) -> tuple[str, str] | None:
    """(what, subject) of a server's ``permissions violation for publish to "x"`` (or
    ``... for subscription to "x"``), None for any other error."""
    if PERMISSIONS_ERR not in err_msg:
        return None
    what = "subscription" if "for subscription to" in err_msg else "publish"
    start = err_msg.find('"')
    end = err_msg.find('"', start + 1)
    return what, err_msg[start + 1 : end] if 0 <= start < end else ""


def _refusal(what: str, subject: str) -> ForbiddenError:
    hint = _INBOX_HINT if what == "subscription" else ""
    return ForbiddenError(
        f"the server refused it a {what} to {subject}{hint}",
        details={"refused": what, "subject": subject},
    )


class Connection(Client):
    """nats-py's client with :meth:`raw_subscribe`, :meth:`publish_now` and
    :meth:`flush_now`."""

    def __init__(self) -> None:
        super().__init__()
        self._raw_handlers: dict[int, RawHandler] = {}
        self._denial_handlers: set[DenialHandler] = set()
        #: (what, lowercase subject) -> handlers of the requests that a refusal of exactly
        #: that would fail (looked up, not called one by one: many may be in flight)
        self._request_denials: dict[tuple[str, str], set[DenialHandler]] = {}
        #: the latest permission violations the server reported, oldest first
        self.denials: collections.deque[tuple[str, str]] = collections.deque(maxlen=64)

    async def raw_subscribe(self, subject: str, handler: RawHandler) -> Subscription:
        """Subscribe ``handler`` to ``subject``: it is called with each message's raw parts,
        synchronously, in the order they arrive; it must not block. Unsubscribe as usual."""
        sub = await self.subscribe(subject)
        # No message can arrive before this line runs: the loop has not read since SUB.
        self._raw_handlers[sub._id] = handler
        return sub

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        handler = self._raw_handlers.get(sid)
        if handler is None:
            # nats-py annotates headers as bytes; its parser passes None when there are none.
            await super()._process_msg(sid, subject, reply, data, headers)  # type: ignore[arg-type]
            return
        stats = self.stats
        stats["in_msgs"] += 1
        stats["in_bytes"] += len(data)
        handler(subject, reply, data, headers)

    async def _process_err(self, err_msg: str) -> None:
        denial = denial_of(err_msg)
        if denial is not None:
            self.denials.append(denial)
            # Every request in flight that this refusal concerns fails now, so none needs
            # it again: the next refusal of the same finds only later requests.
            for handler in self._request_denials.pop(denial, ()):
                handler(*denial)
            for handler in list(self._denial_handlers):
                handler(*denial)
        await super()._process_err(err_msg)

    @contextlib.contextmanager
    def on_denied(self, handler: DenialHandler) -> Iterator[None]:
        """Call ``handler(what, subject)`` for every permission violation the server
        reports while inside (subjects lowercase, as nats-py passes the error on)."""
        self._denial_handlers.add(handler)
        try:
            yield
        finally:
            self._denial_handlers.discard(handler)

    async def request_checked(
        self, subject: str, payload: bytes, *, timeout: float, watch: Iterable[str] = ()
    ) -> Msg:
        """``request``, but a server's refusal to let this connection publish to
        ``subject``, subscribe to its reply inbox or subscribe to one of ``watch`` (a
        subscription the answer depends on) raises :class:`ForbiddenError` as soon as
        the server says so, instead of a timeout.

        nats-py's new-style request, with the refusal failing the reply's future: no
        task and no wait beyond nats-py's own, so commands and queries take this path
        too (docs/decisions.md, "Commands and queries of a tenant's user").

        Raises:
            ForbiddenError: naming what was refused.
            nats.errors.TimeoutError: no reply within ``timeout``.
            nats.errors.NoRespondersError: nothing subscribes to ``subject``.
        """
        if self.is_draining_pubs:
            raise nats.errors.ConnectionDrainingError
        if not self._resp_sub_prefix:
            await self._init_request_sub()  # nats-py's own, lazily made by request()
        assert self._resp_sub_prefix is not None
        prefix = self._resp_sub_prefix.decode()
        future: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        # (what, subject as nats-py passes it on: lowercase) -> the subject as given
        names = {
            ("publish", subject.lower()): subject,
            ("subscription", (prefix + "*").lower()): prefix + "*",
            **{("subscription", w.lower()): w for w in watch},
        }

        def denied(what: str, denied_subject: str) -> None:
            name = names.get((what, denied_subject))
            if name is not None and not future.done():
                future.set_exception(_refusal(what, name))

        # The reply inbox may have been refused earlier (a subscription is refused once,
        # when made); an earlier refused publish was another request's, not this one's.
        for what, denied_subject in self.denials:
            if what == "subscription":
                denied(what, denied_subject)
        if future.done():
            future.result()  # raises the refusal
        token = self._nuid.next()
        token.extend(token_hex(2).encode())
        key = token.decode()
        self._resp_map[key] = future
        for wanted in names:
            self._request_denials.setdefault(wanted, set()).add(denied)
        try:
            await self.publish(subject, payload, reply=prefix + key)
            try:
                msg = await asyncio.wait_for(future, timeout)
            except TimeoutError:
                raise nats.errors.TimeoutError from None
        finally:
            for wanted in names:
                handlers = self._request_denials.get(wanted)
                if handlers is not None:
                    handlers.discard(denied)
                    if not handlers:
                        del self._request_denials[wanted]
            self._resp_map.pop(key, None)
        if msg.headers and msg.headers.get("Status") == "503":
            raise nats.errors.NoRespondersError
        return msg

    def publish_now(self, subject: str, payload: bytes) -> None:
        """Publish ``payload`` (no reply subject, no headers) and hand it to the socket at
        once: nats-py's ``publish`` leaves the write to its flusher task's next turn,
        which costs a reply or an offer 0.1-0.2 ms on a busy loop. Uses the same pending
        buffer (also while reconnecting: nats-py sends it on reconnect)."""
        # The checks of nats-py's ``publish``, in its order.
        if self.is_closed:
            raise nats.errors.ConnectionClosedError
        if self.is_draining_pubs:
            raise nats.errors.ConnectionDrainingError
        if not self.is_connected and (
            self._max_pending_size <= 0
            or len(payload) + self._pending_data_size > self._max_pending_size
        ):
            raise nats.errors.OutboundBufferLimitError
        if len(payload) > self._max_payload:
            raise nats.errors.MaxPayloadError
        cmd = prot_command.pub_cmd(subject, "", payload)
        self.stats["out_msgs"] += 1
        self.stats["out_bytes"] += len(payload)
        self._pending.append(cmd)
        self._pending_data_size += len(cmd)
        self.flush_now()

    def flush_now(self) -> None:
        """Hand the queued commands to the socket now, instead of on the flusher task's
        next turn (a latency-critical publish followed by other work). Relies on
        nats-py's ``_pending`` buffer, as its flusher does; the flusher then finds it
        empty."""
        if self._pending_data_size > 0 and self._transport is not None and self.is_connected:
            self._transport.writelines(self._pending[:])
            self._pending = []
            self._pending_data_size = 0

    def _remove_sub(self, sid: int, max_msgs: int = 0) -> None:
        self._raw_handlers.pop(sid, None)
        super()._remove_sub(sid, max_msgs)


async def connect(url: str, **options: Any) -> Connection:
    """Connect like ``nats.connect(url, **options)``, returning a :class:`Connection`."""
    nc = Connection()
    await nc.connect(url, **options)
    return nc


__all__ = ["Connection", "DenialHandler", "RawHandler", "connect", "denial_of"]
