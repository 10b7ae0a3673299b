"""The mailbox aggregate: one per agent (task), holding the messages sent to it.

Unlike the orchestrator this replaces, where priority was only a label, a
recipient's pending messages are delivered highest priority first and in
send order within a priority. Sending, delivery and reading are events:
``MessageSent`` (into the mailbox), ``MessagesDelivered`` (handed to the
agent, each message exactly once; ``read: true`` when the reader acknowledges
on receipt), ``MessagesRead`` (an acknowledgement that came later).

A message to an unknown agent is ``not_found``; to a finished one,
``conflict``: the service loads the recipient task's state for ``decide``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import Field, StringConstraints

from pantheon_es.commands import Command
from pantheon_es.domain import AggregateType, DecideContext, Decision, register
from pantheon_es.errors import ConflictError, InternalError, NotFoundError
from pantheon_es.events import Event, EventData
from pantheon_es.tasks import TaskId, TaskState


class MessagePriority(StrEnum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    URGENT = "urgent"


RANK = {
    MessagePriority.LOW: 0,
    MessagePriority.MEDIUM: 1,
    MessagePriority.HIGH: 2,
    MessagePriority.URGENT: 3,
}


class MessageType(StrEnum):
    INSTRUCTION = "instruction"
    QUERY = "query"
    UPDATE = "update"
    COORDINATION = "coordination"
    STATUS_REQUEST = "status_request"


Sender = Annotated[str, StringConstraints(min_length=1, max_length=200)]


# -- commands ---------------------------------------------------------------------------


class SendMessage(Command, aggregate="mailbox", verb="send"):
    """Send a message to an agent (any task that has not finished)."""

    to: TaskId
    body: Annotated[str, StringConstraints(min_length=1, max_length=100_000)]
    priority: MessagePriority = MessagePriority.MEDIUM
    type: MessageType = MessageType.UPDATE
    sender: Sender | None = Field(
        None, description="Who sends it: an agent id, or a person; default: the actor."
    )

    def target_id(self) -> str | None:
        return self.to

    def related(self) -> list[tuple[str, str]]:
        return [("task", self.to)]


class ReceiveMessages(Command, aggregate="mailbox", verb="receive"):
    """Deliver the agent's pending messages, highest priority first, FIFO within one."""

    agent_id: TaskId
    max: int = Field(10, ge=1, le=100)
    ack: bool = Field(
        False, description="Also mark them read: one MessagesDelivered event with read=true."
    )

    def target_id(self) -> str | None:
        return self.agent_id

    def related(self) -> list[tuple[str, str]]:
        return [("task", self.agent_id)]


class AckMessages(Command, aggregate="mailbox", verb="ack"):
    """Mark delivered messages read."""

    agent_id: TaskId
    message_ids: list[Annotated[str, StringConstraints(min_length=1, max_length=64)]] = Field(
        min_length=1, max_length=100
    )

    def target_id(self) -> str | None:
        return self.agent_id


# -- events ------------------------------------------------------------------------------


class MessageSent(EventData, type_name="MessageSent", version=1, aggregate="mailbox"):
    message_id: str
    sender: str
    priority: MessagePriority
    type: MessageType
    body: str


class MessagesDelivered(EventData, type_name="MessagesDelivered", version=1, aggregate="mailbox"):
    message_ids: list[str]
    #: Read at delivery (the reader acknowledged on receipt): one event, not two.
    read: bool = False


class MessagesRead(EventData, type_name="MessagesRead", version=1, aggregate="mailbox"):
    message_ids: list[str]


# -- state -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    message_id: str
    sender: str
    priority: MessagePriority
    type: MessageType
    body: str
    sent_at: datetime
    order: int
    status: str = "pending"  # pending | delivered | read

    def public(self) -> dict[str, Any]:
        return {
            "message_id": self.message_id,
            "sender": self.sender,
            "priority": self.priority.value,
            "type": self.type.value,
            "body": self.body,
            "sent_at": self.sent_at.isoformat().replace("+00:00", "Z"),
        }


@dataclass(frozen=True, slots=True)
class MailboxState:
    agent_id: str
    messages: dict[str, Message]
    sent: int = 0

    def pending(self) -> list[Message]:
        """Pending messages in delivery order."""
        waiting = [m for m in self.messages.values() if m.status == "pending"]
        return sorted(waiting, key=lambda m: (-RANK[m.priority], m.order))


def _with(state: MailboxState, ids: list[str], status: str) -> MailboxState:
    messages = dict(state.messages)
    for message_id in ids:
        if message_id in messages:
            messages[message_id] = replace(messages[message_id], status=status)
    return replace(state, messages=messages)


@functools.singledispatch
def _apply(data: EventData, state: MailboxState, event: Event[Any]) -> MailboxState:
    raise InternalError(f"mailbox aggregate cannot apply {event.type}")


@_apply.register
def _sent(data: MessageSent, state: MailboxState, event: Event[Any]) -> MailboxState:
    message = Message(
        data.message_id,
        data.sender,
        data.priority,
        data.type,
        data.body,
        event.occurred_at,
        state.sent,
    )
    return replace(
        state, messages={**state.messages, data.message_id: message}, sent=state.sent + 1
    )


@_apply.register
def _delivered(data: MessagesDelivered, state: MailboxState, event: Event[Any]) -> MailboxState:
    return _with(state, data.message_ids, "read" if data.read else "delivered")


@_apply.register
def _read(data: MessagesRead, state: MailboxState, event: Event[Any]) -> MailboxState:
    return _with(state, data.message_ids, "read")


def evolve(state: MailboxState | None, event: Event[Any]) -> MailboxState:
    return _apply(event.data, state or MailboxState(event.aggregate_id, {}), event)


# -- decide --------------------------------------------------------------------------------------


def _recipient(ctx: DecideContext, agent_id: str) -> TaskState:
    task: TaskState | None = ctx.related.get(("task", agent_id))
    if task is None or task.archived:
        raise NotFoundError(f"agent {agent_id} not found", details={"agent_id": agent_id})
    return task


@functools.singledispatch
def _decide(command: Command, state: MailboxState | None, ctx: DecideContext) -> Decision:
    raise InternalError(f"mailbox aggregate has no handler for {type(command).__name__}")


@_decide.register
def _send(command: SendMessage, state: MailboxState | None, ctx: DecideContext) -> Decision:
    recipient = _recipient(ctx, command.to)
    if recipient.terminal:
        raise ConflictError(
            f"agent {command.to} is {recipient.status.value} and can no longer receive messages",
            details={"agent_id": command.to, "status": recipient.status.value},
        )
    message_id = ctx.new_id()
    event = MessageSent(
        message_id=message_id,
        sender=command.sender or command.actor or "anonymous",
        priority=command.priority,
        type=command.type,
        body=command.body,
    )
    return Decision([event], {"message_id": message_id, "to": command.to, "status": "pending"})


@_decide.register
def _receive(command: ReceiveMessages, state: MailboxState | None, ctx: DecideContext) -> Decision:
    _recipient(ctx, command.agent_id)
    pending = state.pending() if state else []
    taken = pending[: command.max]
    result = {"messages": [m.public() for m in taken], "remaining": len(pending) - len(taken)}
    if not taken:
        return Decision([], result)
    ids = [m.message_id for m in taken]
    return Decision([MessagesDelivered(message_ids=ids, read=command.ack)], result)


@_decide.register
def _ack(command: AckMessages, state: MailboxState | None, ctx: DecideContext) -> Decision:
    messages = state.messages if state else {}
    unknown = [i for i in command.message_ids if i not in messages]
    if unknown:
        raise NotFoundError(
            f"no message {unknown[0]} for agent {command.agent_id}",
            details={"agent_id": command.agent_id, "message_ids": unknown},
        )
    ids = [i for i in command.message_ids if messages[i].status == "delivered"]
    if not ids:
        return Decision([], {"read": []})
    return Decision([MessagesRead(message_ids=ids)], {"read": ids})


def decide(state: MailboxState | None, command: Command, ctx: DecideContext) -> Decision:
    return _decide(command, state, ctx)


MAILBOX: AggregateType[MailboxState] = register(
    AggregateType(name="mailbox", evolve=evolve, decide=decide)
)
