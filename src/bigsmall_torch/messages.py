"""Messages from the training loop to running loaders (PyDmed's ``send_message``), and weights.

The main process writes the board (a pickled dict in a file, replaced atomically) and bumps a
version counter in shared memory; workers, persistent or not, forked or spawned, re-read the file
only when the version changed. Reading the version costs a shared-memory load, so loaders can look
at every big chunk and collectors at every call.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import threading
import uuid
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["MessageBoard"]


def _board_folder() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def _remove(path: Path, owner: int) -> None:
    if os.getpid() == owner:  # a forked worker inherits the finalizer: only the owner cleans up
        path.unlink(missing_ok=True)


class MessageBoard:
    """Per-patient messages (the last one wins) and sampling weights, shared with workers."""

    def __init__(self) -> None:
        self.path = _board_folder() / f"bigsmall-board-{uuid.uuid4().hex}.pkl"
        self._version = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._messages: dict[Any, Any] = {}
        self._weights: dict[Any, float] = {}
        self._seen = 0
        self._lock = threading.Lock()
        self._owner = os.getpid()
        weakref.finalize(self, _remove, self.path, self._owner)

    # -- writing (the main process) --------------------------------------------------------------

    def _publish(self) -> None:
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            pickle.dump({"messages": self._messages, "weights": self._weights}, f)
        os.replace(tmp, self.path)
        self._version += 1
        self._seen = int(self._version[0])

    def send(self, messages: Mapping[Any, Any]) -> None:
        """Set the message of each patient id in ``messages`` (replacing any earlier one)."""
        with self._lock:
            self._refresh()
            self._messages.update(messages)
            self._publish()

    def set_weights(self, weights: Mapping[Any, float]) -> None:
        """Set sampling weights by patient id (the others keep theirs)."""
        with self._lock:
            self._refresh()
            self._weights.update(weights)
            self._publish()

    # -- reading (any process) -------------------------------------------------------------------

    def _refresh(self) -> None:
        version = int(self._version[0])
        if version == self._seen:
            return
        try:
            with open(self.path, "rb") as f:
                state = pickle.load(f)
        except FileNotFoundError:
            return
        self._messages, self._weights = state["messages"], state["weights"]
        self._seen = version

    def message(self, patient_id: Any) -> Any:
        """The last message sent about ``patient_id``, or None."""
        with self._lock:
            self._refresh()
            return self._messages.get(patient_id)

    def weights(self) -> dict[Any, float]:
        """The weights set so far, by patient id."""
        with self._lock:
            self._refresh()
            return dict(self._weights)

    @property
    def version(self) -> int:
        return int(self._version[0])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
