"""Connection.raw_subscribe against a real nats-server: the one nats-py internal the
event feed relies on (``Client._process_msg``) is still called for every message."""

from __future__ import annotations

import asyncio
from typing import Any

import nats.errors
import pytest

from pantheon_es.connection import Connection, connect
from tests.conftest import eventually


async def test_a_raw_handler_gets_each_message_as_the_parser_hands_it_over(
    nc: Connection,
) -> None:
    got: list[tuple[bytes, bytes, bytes, bytes | None]] = []
    sub = await nc.raw_subscribe("raw.test.>", lambda *parts: got.append(parts))
    await nc.publish("raw.test.a", b"one", reply="answer.here")
    await nc.publish("raw.test.b", b"two", headers={"X-Name": "value"})
    await nc.flush()

    async def both() -> bool:
        return len(got) == 2

    await eventually(both, timeout=5)
    assert got[0] == (b"raw.test.a", b"answer.here", b"one", None)
    subject, reply, data, headers = got[1]
    assert (subject, reply, data) == (b"raw.test.b", b"", b"two")
    assert headers is not None and b"X-Name: value" in headers

    await sub.unsubscribe()
    assert sub._id not in nc._raw_handlers
    await nc.publish("raw.test.c", b"three")
    await nc.flush()
    await asyncio.sleep(0.1)
    assert len(got) == 2


async def test_other_subscriptions_still_take_nats_py_s_path(nc: Connection) -> None:
    raw: list[bytes] = []
    await nc.raw_subscribe("raw.mixed", lambda s, r, d, h: raw.append(d))
    sub = await nc.subscribe("plain.mixed")
    await nc.publish("plain.mixed", b"p", headers={"Nats-Msg-Id": "42"})
    await nc.publish("raw.mixed", b"r")
    msg = await sub.next_msg(timeout=5)
    assert msg.data == b"p" and msg.headers == {"Nats-Msg-Id": "42"}
    await nc.flush()

    async def one() -> bool:
        return raw == [b"r"]

    await eventually(one, timeout=5)


async def test_publish_now_hands_the_message_to_the_socket_before_the_loop_turns(
    nc: Connection, nats_server: Any
) -> None:
    # A second connection listens; publish_now leaves nothing for nats-py's flusher task.
    other = await connect(nats_server.url)
    try:
        sub = await other.subscribe("now.test")
        await other.flush()
        nc.publish_now("now.test", b"at once")
        assert nc._pending_data_size == 0 and nc.stats["out_msgs"] >= 1
        msg = await sub.next_msg(timeout=5)
        assert msg.data == b"at once" and not msg.reply
        with pytest.raises(nats.errors.MaxPayloadError):
            nc.publish_now("now.test", b"x" * (nc.max_payload + 1))
    finally:
        await other.close()


async def test_publish_now_on_a_closed_connection_raises(nats_server: Any) -> None:
    closed = await connect(nats_server.url)
    await closed.close()
    with pytest.raises(nats.errors.ConnectionClosedError):
        closed.publish_now("now.test", b"late")


async def test_a_checked_request_gets_its_reply_through_nats_py_s_reply_inbox(
    nc: Connection, nats_server: Any
) -> None:
    # request_checked writes nats-py's new-style request out (its _resp_map, _nuid and the
    # token after the inbox prefix); a change there shows here as a timeout.
    other = await connect(nats_server.url)
    try:

        async def answer(msg: Any) -> None:
            await msg.respond(b"re: " + msg.data)

        await other.subscribe("checked.echo", cb=answer)
        await other.flush()
        replies = await asyncio.gather(
            *(nc.request_checked("checked.echo", b"%d" % i, timeout=5) for i in range(20))
        )
        assert [m.data for m in replies] == [b"re: %d" % i for i in range(20)]
        with pytest.raises(nats.errors.NoRespondersError):
            await nc.request_checked("checked.nobody", b"", timeout=5)
        await other.subscribe("checked.silent")  # listens, never answers
        await other.flush()
        with pytest.raises(nats.errors.TimeoutError):
            await nc.request_checked("checked.silent", b"", timeout=0.2)
        # a caller that gives up (cancelled) leaves nothing behind either
        pending = asyncio.create_task(nc.request_checked("checked.silent", b"", timeout=30))
        await asyncio.sleep(0.05)
        assert nc._resp_map and nc._request_denials
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        assert nc._resp_map == {} and nc._request_denials == {} and not nc._denial_handlers
    finally:
        await other.close()
