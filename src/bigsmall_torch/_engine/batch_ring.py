"""Reusable shared-memory buffers for the images of batches built in DataLoader workers.

Allocating a fresh shared-memory tensor for every batch costs the worker a new segment and its page
faults, the main process a new mapping and its page faults, and both a file descriptor handed over
a socket. Here each worker keeps a *ring* of slots instead: byte buffers in shared memory that the
main process maps once, on the first batch that uses each slot. Later batches travel as a reference
(ring token, slot, dtype, shape) plus their metadata, pickled by value. A slot holds a batch of any
dtype that fits in it.

In the main process the ``image`` of a batch is a view of its mapped slot. When the last reference
to that view dies (after ``pin_memory`` copied it, or when the training step drops the batch) a flag
in shared memory hands the slot back to the worker. A worker only writes into slots the main
process has handed back; when every slot is taken (the training loop keeps its batches) it
allocates a one-off buffer, so keeping batches is always safe, merely slower. A slot is also only
reused once no tensor of the worker views it any more (a transform may keep its input). That check
needs ``torch._C._storage_Use_Count``, a private function some torch builds lack; without it the
worker cannot prove a slot free, so it uses no slots at all, only one-off buffers.

Only the process that unpickled a batch releases its slot (not a forked child that inherited the
finalizer), and a transform whose output still views the slot gets its views copied out before the
slot is given back; an output the worker cannot inspect keeps the slot taken for good.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import secrets
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.utils._pytree

from ..errors import StreamError

__all__ = ["MAX_SLOTS", "InlineDict", "RingBatch", "acquire_images", "apply_transform"]

logger = logging.getLogger(__name__)

MAX_SLOTS = 16
"""Slots a worker may hold; they are created only when all existing ones are in use."""

_INLINE_BYTES = 1 << 16
"""Metadata tensors up to this size are pickled by value rather than through shared memory."""

_use_count = getattr(torch._C, "_storage_Use_Count", None)
"""How many references a storage has; None in torch builds without it (then no slot is reused)."""

_told_no_use_count = False


def _only_ring_holds(storage: torch.UntypedStorage) -> bool:
    """No tensor of this process views ``storage`` (only the ring's own reference is left).

    False when that cannot be known (no ``_use_count``): a slot is never reused on a guess.
    """
    return _use_count is not None and int(_use_count(storage._cdata)) <= 1


def _slots_usable() -> bool:
    """Whether this torch build lets the ring prove a slot free; says once per process when not."""
    global _told_no_use_count
    if _use_count is not None:
        return True
    if not _told_no_use_count:
        _told_no_use_count = True
        logger.info(
            "worker %d: this torch build has no torch._C._storage_Use_Count, so batch slots cannot be "
            "proven free: every batch gets a one-off shared-memory buffer (correct, a little slower)",
            os.getpid(),
        )
    return False


class _Ring:
    """One worker process's slots (created lazily in the worker, never in the main process)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.token = f"{self.pid}-{secrets.token_hex(6)}"
        self.control = torch.zeros(MAX_SLOTS, dtype=torch.int32).share_memory_()  # 1 = in use
        self.flags = self.control.numpy()
        self.storages: list[torch.UntypedStorage] = []
        self.announced: list[bool] = []  # the main process has this slot's storage
        self.lock = threading.Lock()
        # Slots whose batch was dropped or repackaged by user code instead of being sent (its lease
        # died unsent): their memory may now be viewed anywhere, so the ring lets go of it and gives
        # the slot a new buffer when next used. Appended by finalizers, so without the lock.
        self.abandoned: list[int] = []

    def acquire(self, nbytes: int) -> _Lease | None:
        with self.lock:
            while self.abandoned:
                lost = self.abandoned.pop()
                self.storages[lost] = torch.UntypedStorage(0)  # replaced before its next use
                self.announced[lost], self.flags[lost] = False, 0
            free = [
                i
                for i, storage in enumerate(self.storages)
                if self.flags[i] == 0 and _only_ring_holds(storage)
            ]
            # The same size first, else the smallest slot big enough (a slot is untyped bytes: any
            # dtype and shape that fit may use it).
            slot = next((i for i in free if self.storages[i].nbytes() == nbytes), None)
            if slot is None:
                fitting = [i for i in free if self.storages[i].nbytes() > nbytes]
                slot = min(fitting, key=lambda i: self.storages[i].nbytes(), default=None)
            if slot is None:
                empty = next((i for i in free if self.storages[i].nbytes() == 0), None)
                if empty is None and len(self.storages) < MAX_SLOTS:
                    slot = len(self.storages)
                    self.storages.append(torch.UntypedStorage._new_shared(nbytes))
                    self.announced.append(False)
                    logger.debug(
                        "worker %d: batch slot %d created (%d bytes)", self.pid, slot, nbytes
                    )
                elif free:  # an abandoned slot, or every free slot is too small: a new buffer
                    slot = free[0] if empty is None else empty
                    self.storages[slot] = torch.UntypedStorage._new_shared(nbytes)
                    self.announced[slot] = False
                else:
                    logger.debug(
                        "worker %d: all %d batch slots in use, one-off buffer", self.pid, MAX_SLOTS
                    )
                    return None
            self.flags[slot] = 1
            return _Lease(self, slot)


@dataclass(eq=False)
class _Lease:
    """A slot taken by one batch, from its building in the worker to its release in the main process."""

    ring: _Ring
    slot: int
    tensor: torch.Tensor | None = None  # the batch's image tensor, a view of the slot
    sent: bool = field(default=False)
    #: The batch's other per-sample arrays held in the slot after the images (e.g. ``"mask"``):
    #: key -> (byte offset, the tensor viewing it).
    planes: dict[str, tuple[int, torch.Tensor]] = field(default_factory=dict)
    returned: bool = field(default=False)

    def give_back(self) -> None:
        """Release in the worker: nothing outside it ever saw this slot's current contents."""
        self.returned = True
        self.ring.flags[self.slot] = 0

    def __del__(self) -> None:
        if not (self.sent or self.returned):  # dropped or repackaged: see _Ring.abandoned
            self.ring.abandoned.append(self.slot)


_RING: _Ring | None = None


def _view(
    storage: torch.UntypedStorage, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """A contiguous ``dtype`` tensor of ``shape`` over the start of ``storage``."""
    strides = [math.prod(shape[i + 1 :]) for i in range(len(shape))]
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape, strides)


def _flat(storage: torch.UntypedStorage) -> torch.Tensor:
    return _view(storage, (storage.nbytes(),), torch.uint8)


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _worker_ring() -> _Ring:
    global _RING
    if _RING is None or _RING.pid != os.getpid():
        _RING = _Ring()
    return _RING


_ALIGN = 64  # byte alignment of each plane in a slot


def _layout(
    shape: tuple[int, ...], dtype: torch.dtype, planes: dict[str, tuple[tuple[int, ...], torch.dtype]]
) -> tuple[dict[str, int], int]:
    """Byte offsets of ``planes`` after the images, and the total bytes."""
    offsets, end = {}, _nbytes(shape, dtype)
    for key, (plane_shape, plane_dtype) in planes.items():
        end = -(-end // _ALIGN) * _ALIGN
        offsets[key] = end
        end += _nbytes(plane_shape, plane_dtype)
    return offsets, end


def _view_at(
    storage: torch.UntypedStorage, offset: int, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """A contiguous ``dtype`` tensor of ``shape`` over ``storage`` from byte ``offset``."""
    flat = _flat(storage)[offset : offset + _nbytes(shape, dtype)]
    return flat.view(dtype).view(shape)


def acquire_images(
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.uint8,
    planes: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], _Lease | None]:
    """Uninitialised tensors for a batch's images (``dtype``, ``shape``) and its ``planes`` (other
    per-sample arrays, e.g. masks: key -> (shape, dtype)), and the slot they occupy.

    In a DataLoader worker they are views of one slot of the worker's ring or, when every slot is
    taken (or this torch build cannot tell a free slot), of a one-off buffer already in shared
    memory; in the main process ordinary tensors.
    """
    planes = planes or {}
    if torch.utils.data.get_worker_info() is None:
        extra = {key: torch.empty(s, dtype=d) for key, (s, d) in planes.items()}
        return torch.empty(shape, dtype=dtype), extra, None
    offsets, nbytes = _layout(shape, dtype, planes)
    lease = _worker_ring().acquire(nbytes) if _slots_usable() else None
    storage = torch.UntypedStorage._new_shared(nbytes) if lease is None else lease.ring.storages[lease.slot]
    images = _view(storage, shape, dtype)
    extra = {key: _view_at(storage, offsets[key], *planes[key]) for key in planes}
    if lease is not None:
        lease.tensor = images
        lease.planes = {key: (offsets[key], tensor) for key, tensor in extra.items()}
    return images, extra, lease


def _storage_order(image: torch.Tensor) -> tuple[int, ...]:
    """The dimensions of ``image`` (a dense view of a slot, e.g. a channels-last batch) from the
    outermost to the innermost in memory: ``image.permute(order)`` is contiguous."""
    strides = image.stride()
    order = tuple(sorted(range(image.ndim), key=lambda d: (-strides[d], d)))
    if not image.permute(order).is_contiguous():
        raise StreamError(f"a batch's image must be dense in its slot, got strides {image.stride()}")
    return order


def _inverse(order: tuple[int, ...]) -> tuple[int, ...]:
    inverse = [0] * len(order)
    for position, dim in enumerate(order):
        inverse[dim] = position
    return tuple(inverse)


def _in_slot(tensor: torch.Tensor, lease: _Lease) -> bool:
    """Whether ``tensor``'s memory lies in the lease's slot (views at any offset included)."""
    storage = lease.ring.storages[lease.slot]
    start = storage.data_ptr()
    pointer = tensor.untyped_storage().data_ptr()
    return bool(start <= pointer < start + storage.nbytes())


class InlineDict(dict[str, Any]):
    """A sample or batch dict whose small tensors are pickled by value.

    ``default_collate`` turns a per-sample mode batch's numbers into small tensors, and each tensor
    a worker sends otherwise gets a shared-memory segment and a file descriptor of its own. The
    collated batch keeps this type (``default_collate`` copies mappings with :func:`copy.copy`), so
    its ``x``, ``y``, ``level``... travel inline; it is unpickled as a plain ``dict``.
    """

    __slots__ = ()

    def __copy__(self) -> InlineDict:
        return type(self)(self)

    def __reduce__(self) -> tuple[Any, ...]:
        return _unwrap, (_inline(self),)


class RingBatch(InlineDict):
    """A batch dict whose ``image`` may live in a ring slot; it pickles to a compact reference.

    In the worker it behaves as the plain dict it is; unpickled in the main process it becomes a
    plain ``dict`` whose ``image`` is a view of the mapped slot.
    """

    __slots__ = ("lease",)

    def __init__(self, items: dict[str, Any], lease: _Lease | None) -> None:
        super().__init__(items)
        self.lease = lease

    def __copy__(self) -> RingBatch:  # default_convert and pin_memory copy mappings
        return RingBatch(dict(self), self.lease)

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, Any]:
        return copy.deepcopy(dict(self), memo)  # a plain dict with its own tensors

    def __reduce__(self) -> tuple[Any, ...]:
        lease, image = self.lease, self.get("image")
        tensor = None if lease is None else lease.tensor
        if lease is None or lease.sent or tensor is None or image is not tensor:
            # No slot, already sent once (a second pickling of one batch, by user code, gets a copy),
            # or user code replaced the image: send it the usual way. A slot whose image was
            # replaced stays taken for good, since the replacement may still view its memory.
            meta = {key: value for key, value in self.items() if key != "image"}
            if lease is not None and lease.sent:  # nothing of this copy may view the slot
                if isinstance(image, torch.Tensor):
                    image = image.clone()
                meta = {
                    k: v.clone() if isinstance(v, torch.Tensor) and _in_slot(v, lease) else v
                    for k, v in meta.items()
                }
            return _rebuild_plain, (image, _inline(meta))
        lease.sent = True
        # Planes still in the slot travel as references too; any other value the usual way.
        planes = [
            (key, offset, tuple(plane.shape), plane.dtype)
            for key, (offset, plane) in lease.planes.items()
            if self.get(key) is plane
        ]
        in_slot = {key for key, *_ in planes}
        # Any other entry viewing the slot (user code put a view of the images in the batch) is
        # copied out: the slot is released once the image and the planes are gone.
        meta = _inline({
            k: v.clone() if isinstance(v, torch.Tensor) and _in_slot(v, lease) else v
            for k, v in self.items() if k != "image" and k not in in_slot
        })  # fmt: skip
        ring = lease.ring
        with ring.lock:
            # The slot travels as a flat uint8 tensor (a bare storage does not survive plain pickle).
            storage = None if ring.announced[lease.slot] else _flat(ring.storages[lease.slot])
            ring.announced[lease.slot] = True
        control = None if storage is None else ring.control
        order = _storage_order(image)
        shape, dtype = tuple(image.shape[d] for d in order), image.dtype
        lease.tensor, lease.planes = None, {}  # the worker's last views of the slot go with this batch
        where = (ring.token, ring.pid, control, lease.slot, storage)
        return _rebuild_ring, (*where, shape, dtype, meta, planes, _inverse(order), tuple(self))


_PLAIN_LEAVES = (str, bytes, int, float, complex, bool, type(None), np.ndarray, np.generic)


def apply_transform(batch: dict[str, Any], transform: Callable[[Any], Any]) -> None:
    """``batch["image"] = transform(batch["image"])``, keeping the batch's slot safe.

    An in-place result (the slot tensor itself) keeps the slot. Otherwise the result is walked
    (tensors, and lists, tuples and dicts of them): tensors that view the slot are copied out of it
    and the slot is given back at once. A result holding anything else (an object that might keep
    a view of the slot) keeps the slot taken for good. numpy arrays are pickled by value, so views
    of the slot as arrays are safe.
    """
    images = batch["image"]
    out = transform(images)
    batch["image"] = out
    if not isinstance(batch, RingBatch) or batch.lease is None or out is images:
        return
    lease = batch.lease
    leaves, spec = torch.utils._pytree.tree_flatten(out)
    if not all(isinstance(leaf, (torch.Tensor, *_PLAIN_LEAVES)) for leaf in leaves):
        batch.lease = None  # unknown objects: the slot stays taken
        return
    if any(isinstance(leaf, torch.Tensor) and _in_slot(leaf, lease) for leaf in leaves):
        leaves = [
            leaf.clone() if isinstance(leaf, torch.Tensor) and _in_slot(leaf, lease) else leaf
            for leaf in leaves
        ]
        batch["image"] = torch.utils._pytree.tree_unflatten(leaves, spec)
    for key, (_, plane) in lease.planes.items():  # the other planes leave the slot with it
        if batch.get(key) is plane:
            batch[key] = plane.clone()
    batch.lease, lease.tensor, lease.planes = None, None, {}
    del images, out, leaves
    lease.give_back()  # reused only once no tensor of this worker views it (_only_ring_holds)


class _ByValue:
    """A small tensor pickled as a numpy array (by value, inline in the message)."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray) -> None:
        self.array = array


def _by_value(value: Any) -> Any:
    """How a dict value travels: small tensors inline, views of a larger unshared buffer (a crop of
    a big chunk) as a copy of their own bytes (sending the view would move the whole buffer to
    shared memory), anything else as it is."""
    if not isinstance(value, torch.Tensor) or value.device.type != "cpu":
        return value
    if value.nbytes <= _INLINE_BYTES:
        try:
            return _ByValue(value.detach().numpy())
        except TypeError:  # a dtype numpy does not have (bfloat16...)
            return value
    if not value.is_shared() and value.untyped_storage().nbytes() > 2 * value.nbytes:
        return value.clone()
    return value


def _inline(meta: dict[str, Any]) -> dict[str, Any]:
    return {key: _by_value(value) for key, value in meta.items()}


def _unwrap(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: torch.from_numpy(v.array) if isinstance(v, _ByValue) else v for k, v in meta.items()}


def _rebuild_plain(image: Any, meta: dict[str, Any]) -> dict[str, Any]:
    return {"image": image, **_unwrap(meta)}


# ---------------------------------------------------------------------------------------------
# The main process's side: the slots of every worker ring it has seen, mapped once each.


@dataclass
class _Mapped:
    pid: int
    control: np.ndarray
    slots: dict[int, np.ndarray] = field(default_factory=dict)


_MAPPED: dict[str, _Mapped] = {}
_MAPPED_LOCK = threading.RLock()  # finalizers may run during a locked section


_REAP_S = 0.5  # how often the main process looks for exited workers while it maps their rings
_reaper: threading.Thread | None = None


def _forget_mapped() -> None:
    """In a forked child: drop the parent's mappings (a DataLoader worker never reads them)."""
    global _MAPPED_LOCK, _reaper
    _MAPPED_LOCK = threading.RLock()  # finalizers may run during a locked section
    _MAPPED.clear()
    _reaper = None  # threads do not survive fork


def _reap() -> None:
    """Unmap the rings of exited workers until none is mapped. A DataLoader whose epoch ends in an
    error, or whose worker is killed, frees its batches before its workers exit, so no release
    comes after the exit to unmap them: this thread does, within ``_REAP_S`` of the exit."""
    global _reaper
    while True:
        time.sleep(_REAP_S)
        _forget_exited()
        with _MAPPED_LOCK:
            if not _MAPPED:
                _reaper = None
                return


def _watch_rings() -> None:
    """Start the reaper thread when the first ring is mapped (call with ``_MAPPED_LOCK`` held)."""
    global _reaper
    if _reaper is None:
        _reaper = threading.Thread(target=_reap, name="bigsmall-ring-reaper", daemon=True)
        _reaper.start()


os.register_at_fork(after_in_child=_forget_mapped)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, exited but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc: trust kill()
    return state not in (b"Z", b"X")


def _forget_exited() -> None:
    """Unmap the rings of workers that have exited (their batches still alive keep their own slots)."""
    with _MAPPED_LOCK:
        for token, mapped in list(_MAPPED.items()):  # a finalizer may change it meanwhile
            if not _alive(mapped.pid):
                _MAPPED.pop(token, None)


def _numpy_dtype(dtype: torch.dtype) -> np.dtype[Any]:
    """The numpy dtype of ``dtype`` (batch images come from numpy arrays, so there is one)."""
    return torch.empty(0, dtype=dtype).numpy().dtype


def _release(control: np.ndarray, slot: int, receiver: int) -> None:
    """Hand ``slot`` back, only in the process that received the batch (not in a forked child
    running its copy of the finalizer); then forget the rings of exited workers, so that the last
    batch freed after a DataLoader shut its workers down unmaps their slots."""
    if os.getpid() != receiver:
        return
    control[slot] = 0
    _forget_exited()


class _Countdown:
    """Calls ``_release`` once the last of ``count`` arrays viewing one slot is gone."""

    def __init__(self, count: int, *args: Any) -> None:
        self.count, self.args, self.lock = count, args, threading.Lock()

    def done(self) -> None:
        with self.lock:
            self.count -= 1
            last = self.count == 0
        if last:
            _release(*self.args)


def _rebuild_ring(
    token: str,
    pid: int,
    control: torch.Tensor | None,
    slot: int,
    storage: torch.Tensor | None,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    meta: dict[str, Any],
    planes: list[tuple[str, int, tuple[int, ...], torch.dtype]] = (),  # type: ignore[assignment]
    order: tuple[int, ...] | None = None,
    keys: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The batch of a slot: ``image`` is the slot's first ``shape`` elements (contiguous), shown
    permuted by ``order`` (None: as they are; a channels-last batch is stored ``n, H, W, C``), and
    its entries in the order of ``keys`` (the batch's own in the worker)."""
    if pid == os.getpid():  # unpickled inside the worker itself (user code pickling a batch)
        ring = _worker_ring()
        image = _view(ring.storages[slot], shape, dtype)
        image = (image if order is None else image.permute(order)).clone()
        extra = {k: _view_at(ring.storages[slot], o, s, d).clone() for k, o, s, d in planes}
        with ring.lock:
            if storage is not None:
                ring.announced[slot] = False  # the main process has not seen it after all
            ring.flags[slot] = 0  # reused once the original batch's tensors are gone
        return _ordered({"image": image, **_unwrap(meta), **extra}, keys)
    with _MAPPED_LOCK:
        if storage is not None:  # this slot's first batch (or the slot was resized)
            if token not in _MAPPED:
                _forget_exited()
                if control is None:
                    raise StreamError(f"batch slot {slot} of worker {pid} arrived without its ring")
                _MAPPED[token] = _Mapped(pid, control.numpy())  # arrays keep their storages alive
                _watch_rings()
            _MAPPED[token].slots[slot] = storage.numpy()
        mapped = _MAPPED.get(token)
        if mapped is None or slot not in mapped.slots:
            raise StreamError(
                f"batch slot {slot} of DataLoader worker {pid} was first sent to another process: "
                "batched-mode batches must reach the main process through the DataLoader only "
                "(clone batch['image'] before pickling a batch inside a worker)"
            )
        base = mapped.slots[slot]
        array = base[: _nbytes(shape, dtype)].view(_numpy_dtype(dtype)).reshape(shape)
        arrays = {
            key: base[offset : offset + _nbytes(s, d)].view(_numpy_dtype(d)).reshape(s)
            for key, offset, s, d in planes
        }
    # The slot goes back once the image and every plane viewing it are gone.
    countdown = _Countdown(1 + len(arrays), mapped.control, slot, os.getpid())
    for viewer in (array, *arrays.values()):
        weakref.finalize(viewer, countdown.done).atexit = False
    extra = {key: torch.from_numpy(a) for key, a in arrays.items()}
    image = torch.from_numpy(array)
    batch = {"image": image if order is None else image.permute(order), **_unwrap(meta), **extra}
    return _ordered(batch, keys)


def _ordered(batch: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """``batch`` with its entries in the order of ``keys`` (when they are its keys)."""
    if not keys or tuple(batch) == keys or set(keys) != batch.keys():
        return batch
    return {key: batch[key] for key in keys}
