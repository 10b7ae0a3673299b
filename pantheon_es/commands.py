"""Command base class and the registry of commands by (aggregate, verb).

A command is a frozen pydantic model named as a verb. It is published as a
JSON object to ``pantheon.cmd.<tenant>.<aggregate>.<verb>``; the tenant comes
from the subject, never from the body. Every command may carry an
``idempotency_key``, a ``correlation_id`` and the ``actor`` issuing it.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

IdempotencyKey = Annotated[str, StringConstraints(min_length=1, max_length=255)]


class Command(BaseModel):
    """Base of every command. Subclasses register under ``aggregate``/``verb``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    aggregate: ClassVar[str]
    verb: ClassVar[str]
    #: True if the command creates a new aggregate (its id is made by the service).
    creates: ClassVar[bool] = False

    idempotency_key: IdempotencyKey | None = Field(
        None,
        description=(
            "The same key (per tenant) returns the first reply and appends nothing new, "
            "also after JetStream's duplicate window."
        ),
    )
    correlation_id: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None
    actor: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = None

    def __init_subclass__(
        cls, *, aggregate: str | None = None, verb: str | None = None, **kwargs: Any
    ) -> None:
        super().__init_subclass__(**kwargs)
        if aggregate is not None:
            cls.aggregate = aggregate
        if verb is None:  # abstract, or internal: decided by the scheduler, never routed
            return
        cls.verb = verb
        key = (cls.aggregate, verb)
        if key in COMMANDS and COMMANDS[key] is not cls:
            raise TypeError(f"command {aggregate}.{verb} is already registered")
        COMMANDS[key] = cls

    def target_id(self) -> str | None:
        """The id of the aggregate this command acts on (``None`` when it creates one)."""
        raise NotImplementedError

    def related(self) -> list[tuple[str, str]]:
        """Other aggregates (kind, id) whose current state ``decide`` needs to see."""
        return []

    def request_body(self) -> dict[str, Any]:
        """The JSON body a client publishes (defaults left out)."""
        return self.model_dump(mode="json", exclude_none=True, exclude_defaults=True)


class BulkCommand(Command):
    """A command that acts on many aggregates by issuing single commands (cleanup).

    The service calls :meth:`run` instead of deciding on one aggregate.
    """

    def target_id(self) -> str | None:
        return None

    async def run(self, service: Any, tenant: str) -> dict[str, Any]:
        raise NotImplementedError


#: (aggregate, verb) -> command class
COMMANDS: dict[tuple[str, str], type[Command]] = {}
