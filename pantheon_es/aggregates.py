"""Imports every aggregate module so its commands, events and types are registered.

Anything that needs the full registries (the command service, the projector,
schema export) imports this module once.
"""

from pantheon_es import mailbox, reports, retention, tasks, workers, workflows
from pantheon_es.commands import COMMANDS
from pantheon_es.domain import AGGREGATE_TYPES
from pantheon_es.events import REGISTRY

__all__ = [
    "AGGREGATE_TYPES",
    "COMMANDS",
    "REGISTRY",
    "mailbox",
    "reports",
    "retention",
    "tasks",
    "workers",
    "workflows",
]
