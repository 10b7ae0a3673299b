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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.protocol import command as prot_command

#: (subject, reply, payload, header block or None) -> None; called on the reading task
RawHandler = Callable[[bytes, bytes, bytes, bytes | None], None]


class Connection(Client):
    """nats-py's client with :meth:`raw_subscribe`, :meth:`publish_now` and
    :meth:`flush_now`."""

    def __init__(self) -> None:
        super().__init__()
        self._raw_handlers: dict[int, RawHandler] = {}

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


__all__ = ["Connection", "RawHandler", "connect"]
