"""Pantheon-ES: an event-sourced orchestration backend for AI agents and their tasks."""

__version__ = "0.1.0"
