"""The streaming engine (private): the core every dataset is a front end of (``streaming``), the
per-worker reservoir of big chunks (``reservoir``), sharding and seeding (``sharding``), batches
built in workers (``batching``) in shared-memory slots (``batch_ring``), and messages from the
training loop (``messages``). See ``docs/architecture.md``."""

from __future__ import annotations

__all__: list[str] = []
