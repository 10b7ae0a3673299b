"""Read models folded from the event log: one module per model (schema + handlers),
the projector that runs them, and the query service that serves them over NATS."""
