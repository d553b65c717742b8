"""Messages from the training loop to running loaders (PyDmed's ``send_message``), and weights.

The main process writes the board (a pickled dict in a file, replaced atomically) and bumps a
version counter in shared memory; workers, persistent or not, forked or spawned, re-read the file
only when the version changed. Reading the version costs a shared-memory load, so loaders can look
at every big chunk and collectors at every call.

The board file lives in ``/dev/shm`` (else the temporary folder) and is named for the process that
owns it: ``bigsmall-board-<pid>-<start time>-<random>.pkl``. The owner removes it when the board is
garbage collected or the interpreter exits; a board created later removes the files of owners that
no longer run (killed with SIGKILL, say), never those of a live process.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import tempfile
import threading
import uuid
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError

__all__ = ["MessageBoard"]

logger = logging.getLogger(__name__)

_PREFIX = "bigsmall-board-"
# bigsmall-board-<pid>-<start>-<hex>.pkl and the workers' reports bigsmall-report-<pid>-<start>-<hex>.
# <key>.pkl (see reports.py), and their temporary files <...>.<random>.tmp
_NAME = re.compile(
    r"^bigsmall-(?:board|report)-(\d+)-(\d+)-[0-9a-f]+\.(?:[^.]+\.)?(?:pkl|[^.]+\.tmp)$"
)


def _board_folder() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def _start_time(pid: int) -> int:
    """When process ``pid`` started (clock ticks since boot, from ``/proc``); 0 where unknown.

    Together with the pid it names a process even after the pid has been reused.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat.rsplit(b")", 1)[1].split()[19])  # field 22; the name may hold spaces
    except (OSError, IndexError, ValueError):
        return 0


def _alive(pid: int, start: int) -> bool:
    """Whether the process that wrote a board file named ``pid``/``start`` may still run."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    now = _start_time(pid)
    return not (start and now and now != start)  # a different process that got the same pid


def _remove_stale(folder: Path) -> None:
    """Remove this user's board files (and temporary files) whose owner process is gone."""
    uid = os.getuid() if hasattr(os, "getuid") else None
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        match = _NAME.match(entry.name)
        if match is None:
            continue
        pid, start = int(match[1]), int(match[2])
        if pid == os.getpid() or _alive(pid, start):
            continue
        try:
            if uid is not None and entry.stat(follow_symlinks=False).st_uid != uid:
                continue
            os.unlink(entry.path)
            logger.info("removed %s, left by process %d that no longer runs", entry.path, pid)
        except FileNotFoundError:
            pass  # another process cleaned it up first
        except OSError as exc:
            logger.debug("could not remove stale board file %s: %s", entry.path, exc)


def _remove(path: Path, owner: int) -> None:
    if os.getpid() == owner:  # a forked worker inherits the finalizer: only the owner cleans up
        path.unlink(missing_ok=True)


def _dumps(state: dict[str, Any], changed: Mapping[Any, Any], what: str) -> bytes:
    """``state`` pickled; a ConfigError naming the patient id whose value of ``changed`` refuses."""
    try:
        return pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        for key, value in changed.items():
            try:
                pickle.dumps((key, value), protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as item_exc:
                raise ConfigError(
                    f"{what}: the value for patient id {key!r} is a {type(value).__name__}, which "
                    f"cannot be pickled ({item_exc}); only picklable values reach the workers"
                ) from item_exc
        raise ConfigError(f"{what}: the board cannot be pickled ({exc})") from exc


class MessageBoard:
    """Per-patient messages (the last one wins) and sampling weights, shared with workers."""

    def __init__(self) -> None:
        folder = _board_folder()
        _remove_stale(folder)
        self._owner = os.getpid()
        self.path = (
            folder / f"{_PREFIX}{self._owner}-{_start_time(self._owner)}-{uuid.uuid4().hex}.pkl"
        )
        self._version = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._messages: dict[Any, Any] = {}
        self._weights: dict[Any, float] = {}
        self._seen = 0
        self._lock = threading.Lock()
        weakref.finalize(self, _remove, self.path, self._owner)

    # -- writing (the main process) --------------------------------------------------------------

    def _publish(
        self,
        messages: dict[Any, Any],
        weights: dict[Any, float],
        changed: Mapping[Any, Any],
        what: str,
    ) -> None:
        """Write the new state, then adopt it: on any failure the board (file and memory) is unchanged."""
        data = _dumps({"messages": messages, "weights": weights}, changed, what)
        fd, name = tempfile.mkstemp(
            dir=self.path.parent, prefix=f"{self.path.stem}.", suffix=".tmp"
        )
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(name, self.path)
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        self._messages, self._weights = messages, weights
        self._version += 1
        self._seen = int(self._version[0])

    def send(self, messages: Mapping[Any, Any]) -> None:
        """Set the message of each patient id in ``messages`` (replacing any earlier one).

        A ConfigError, and nothing sent, when a message cannot be pickled.
        """
        with self._lock:
            self._refresh()
            self._publish({**self._messages, **messages}, self._weights, messages, "send_message")

    def set_weights(self, weights: Mapping[Any, float]) -> None:
        """Set sampling weights by patient id (the others keep theirs)."""
        with self._lock:
            self._refresh()
            self._publish(self._messages, {**self._weights, **weights}, weights, "set_weights")

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
