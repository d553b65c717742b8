"""PyDmed's API on top of bigsmall_torch: PyDmed code runs with only its imports changed.

Replace ``from pydmed.lightdl import *`` and ``from pydmed.utils.data import *`` with::

    from bigsmall_torch.compat.pydmed import (
        BigChunk, BigChunkLoader, Dataset, LightDL, Patient, Record, SmallChunk,
        SmallChunkCollector, get_default_constglobinf,
    )

and the tutorial's loaders, collectors and training loop run unchanged: ``LightDL`` builds a
:class:`~bigsmall_torch.BigSmallDataset` and a ``torch.utils.data.DataLoader`` underneath, and two
adapters call the user's PyDmed-style classes from the reservoir engine.

How PyDmed's pieces map onto the engine (the full table, with a before/after example, is in
``docs/coming_from_pydmed.md``):

- ``Record(rootdir, relativedir, dict_infos)`` / ``Patient(int_uniqueid, dict_records)`` /
  ``Dataset(str_dsname, list_patients)``: kept as they are; :meth:`Dataset.to_bigsmall` gives the
  :class:`bigsmall_torch.Dataset` the engine streams (ids from ``int_uniqueid``, records from the
  :class:`Record` entries of ``dict_records``, the other entries as ``info``).
- ``extract_bigchunk(last_message_fromroot)`` / ``extract_smallchunk(call_count, bigchunk,
  last_message_fromroot)``: called by adapters implementing the engine's
  ``extract_bigchunk(patient, ctx)`` / ``extract_smallchunk(call_count, bigchunk, ctx)``; the
  message is ``ctx.message``, ``get_checkpoint`` / ``set_checkpoint`` read and write ``ctx.state``.
- ``const_global_info["num_bigchunkloaders"]``: the resident big chunks of all workers together
  (``buffer_size = ceil(num_bigchunkloaders / num_workers)`` per worker).
- ``LightDL.get()``: the next batch of an endless ``DataLoader`` over the engine;
  ``pause_loading()``: that iterator shut down, and the engine moved to its next epoch
  (``set_epoch``), so that the next ``get()`` continues the stream instead of replaying it;
  ``send_message``: ``BigSmallDataset.send_message``; :class:`LabelBalancedDL`:
  :class:`~bigsmall_torch.LabelBalancedScheduler`.

Keys of ``const_global_info`` this layer adds (absent keys take the defaults of
:func:`get_default_constglobinf`): ``"num_workers"`` (DataLoader workers, 0 loads in the calling
process), ``"smallchunks_per_bigchunk"`` (samples a big chunk gives before it retires) and
``"seed"`` (the root of every random stream). ``maxlength_queue_smallchunk``,
``maxlength_queue_lightdl``, ``interval_resched`` and ``core-assignment`` are accepted and ignored.
Any other key is kept and reaches the user's classes as ``self.const_global_info``.

What behaves differently, and why:

- **No process per patient, no taskset.** PyDmed starts processes per loaded patient and pins them
  to cores. Here the DataLoader's workers each keep a reservoir of big chunks and load the next ones
  in a background thread; PyTorch starts and joins them, the OS schedules them.
- **Rescheduling by exhaustion, not by a timer.** PyDmed swaps a big chunk every
  ``interval_resched`` seconds, so what a chunk yields depends on machine speed. Here a big chunk
  retires after ``smallchunks_per_bigchunk`` samples, or when ``extract_smallchunk`` returns None,
  and a seeded scheduler (least visited first) picks the next patient.
- **Messages are seen sooner and stay.** PyDmed hands a message to a patient's processes when the
  patient is next scheduled, once. Here ``extract_smallchunk`` gets the last message sent about its
  patient at its next call, ``extract_bigchunk`` at the next big chunk it loads (prefetched chunks
  keep the message they saw), and a message stays until another replaces it.
- **Checkpoints live in the worker** that owns the patient: they survive the big chunk being
  retired and reloaded there, and the loader sees them; as loading runs ahead, a loader may read a
  checkpoint one chunk old. With workers, loading restarted after ``pause_loading`` starts
  without them (they lived in the workers that shut down).
- **Random numbers.** ``np.random`` and ``random`` are seeded per worker from ``"seed"`` and the
  epoch, so workers never draw the same crops and a restart does not replay them; the loading and
  collecting threads share them, so their order is not reproducible. ``self.rng`` (a seeded
  ``numpy.random.Generator``) is: prefer it. With ``"num_workers": 0`` they are left alone.
- **A batch comes from one worker** (its resident big chunks), consecutive batches from different
  workers, rather than every batch from all resident chunks.
- ``SmallChunk.data`` is None after the default collate (PyDmed puts a placeholder string there);
  ``log`` writes at once; ``LightDL`` is not a ``multiprocessing.Process``, and a subclass
  overriding ``schedule`` / ``initial_schedule`` is refused (write a
  :class:`~bigsmall_torch.Scheduler`); ``flag_grabqueue_onunsched`` has no effect (no small chunk
  is ever discarded).
"""

from __future__ import annotations

from ._adapters import _seed_worker
from .chunks import BigChunk, BigChunkLoader, SmallChunk, SmallChunkCollector
from .data import Dataset, Patient, Record
from .extensions import LabelBalancedDL
from .lightdl import LightDL, get_default_constglobinf

__all__ = [
    "BigChunk",
    "BigChunkLoader",
    "Dataset",
    "LabelBalancedDL",
    "LightDL",
    "Patient",
    "Record",
    "SmallChunk",
    "SmallChunkCollector",
    "get_default_constglobinf",
]
_ = _seed_worker  # importable from here (tests and older code)
