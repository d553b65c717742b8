"""PyDmed code on bigsmall_torch: the tutorial's data loader with only its imports changed."""

from __future__ import annotations

import multiprocessing
import pickle
import random
import threading
from abc import abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import pytest
import torch
import torchvision

import bigsmall_torch as bst
from bigsmall_torch.compat.pydmed import (
    BigChunk,
    BigChunkLoader,
    Dataset,
    LabelBalancedDL,
    LightDL,
    Patient,
    Record,
    SmallChunk,
    SmallChunkCollector,
    _seed_worker,
    get_default_constglobinf,
)
from bigsmall_torch.errors import ConfigError, DatasetError, ExtractorError

# -- PyDmed's tutorial, section 2 ("Making a Dataloader"), as written for PyDmed -------------------
# Only the imports above differ, and the big chunk is 1024 x 1024 instead of 5000 x 5000 so that
# it fits the small synthetic slides. The @abstractmethod on the implementations is the tutorial's.


class SampleBigchunkLoader(BigChunkLoader):
    @abstractmethod
    def extract_bigchunk(self, arg_msg):
        """
        Extract and return a bigchunk.
        Inputs:
            - `arg_msg`: we won't need this argument for now.
        In this function you have access to `self.patient` and some
        other functions and fields to be covered later.
        """
        record_HandE = self.patient.dict_records["H&E"]
        fname_hande = record_HandE.rootdir + record_HandE.relativedir
        osimage = openslide.OpenSlide(fname_hande)
        w, h = 1024, 1024
        W, H = osimage.dimensions
        rand_x, rand_y = np.random.randint(0, W - w), np.random.randint(0, H - h)
        pil_bigchunk = osimage.read_region(location=[rand_x, rand_y], level=0, size=[w, h])
        np_bigchunk = np.array(pil_bigchunk)[:, :, 0:3]
        bigchunk = BigChunk(
            data=np_bigchunk, dict_info_of_bigchunk={"x": rand_x, "y": rand_y}, patient=self.patient
        )
        return bigchunk


class SampleSmallchunkCollector(SmallChunkCollector):
    @abstractmethod
    def extract_smallchunk(self, call_count, bigchunk, last_message_fromroot):
        """
        Extract and return a smallchunk. Please note that in this function you have access to
        self.bigchunk, self.patient, self.const_global_info.
        Inputs:
            - bigchunk: the returned bigchunk.
        """
        W, H = bigchunk.data.shape[1], bigchunk.data.shape[0]
        w, h = 224, 224
        rand_x, rand_y = np.random.randint(0, W - w), np.random.randint(0, H - h)
        np_smallchunk = bigchunk.data[rand_y : rand_y + h, rand_x : rand_x + w, :]
        # wrap in SmallChunk
        smallchunk = SmallChunk(
            data=np_smallchunk,
            dict_info_of_smallchunk={"x": rand_x, "y": rand_y},
            dict_info_of_bigchunk=bigchunk.dict_info_of_bigchunk,
            patient=bigchunk.patient,
        )
        return smallchunk


# -- variants that record what they see (messages, checkpoints), as PyDmed's sample 2 does ---------


class RecordingLoader(BigChunkLoader):
    """The tutorial's loader, with the side from const_global_info (small: fast), recording the
    message and checkpoint it saw in the big chunk's info."""

    def extract_bigchunk(self, last_message_fromroot):
        record = self.patient.dict_records["H&E"]
        osimage = openslide.OpenSlide(record.rootdir + record.relativedir)
        side = self.const_global_info["side"]
        W, H = osimage.dimensions
        x, y = int(self.rng.integers(0, W - side)), int(self.rng.integers(0, H - side))
        data = np.array(osimage.read_region((x, y), 0, (side, side)))[:, :, 0:3]
        osimage.close()
        checkpoint = self.get_checkpoint()
        self.log(f"patient {self.patient.int_uniqueid} checkpoint {checkpoint}\n")
        info = {"x": x, "y": y, "message": last_message_fromroot, "checkpoint": checkpoint}
        return BigChunk(data=data, dict_info_of_bigchunk=info, patient=self.patient)


class RecordingCollector(SampleSmallchunkCollector):
    """Counts the patient's big chunks in its checkpoint (PyDmed's sample 2) and records what it
    saw in the small chunk's info."""

    def extract_smallchunk(self, call_count, bigchunk, last_message_fromroot):
        if call_count == 0:
            old_checkpoint = self.get_checkpoint()
            visits = 1 if old_checkpoint is None else old_checkpoint["visits"] + 1
            self.set_checkpoint({"visits": visits})
        smallchunk = super().extract_smallchunk(call_count, bigchunk, last_message_fromroot)
        smallchunk.dict_info_of_smallchunk.update(
            message=last_message_fromroot,
            visits=self.get_checkpoint()["visits"],
            call_count=call_count,
        )
        return smallchunk


class RngCollector(SmallChunkCollector):
    """Square crops (side ``const_global_info["patch"]``) drawn from ``self.rng``: a stream that
    the seed determines."""

    def extract_smallchunk(self, call_count, bigchunk, last_message_fromroot):
        side = self.const_global_info["patch"]
        H, W = bigchunk.data.shape[0], bigchunk.data.shape[1]
        x, y = int(self.rng.integers(0, W - side + 1)), int(self.rng.integers(0, H - side + 1))
        return SmallChunk(
            data=bigchunk.data[y : y + side, x : x + side, :],
            dict_info_of_smallchunk={"x": x, "y": y},
            dict_info_of_bigchunk=bigchunk.dict_info_of_bigchunk,
            patient=bigchunk.patient,
        )


class NoLoader(BigChunkLoader):
    pass


class NoCollector(SmallChunkCollector):
    pass


# -- helpers ---------------------------------------------------------------------------------------


@pytest.fixture
def dataset(slide_folder: Path) -> Dataset:
    """PyDmed-style (tutorial section 1): a patient per slide, its H&E record and a label."""
    rootdir = str(slide_folder) + "/"
    list_relativedirs = sorted(path.name for path in slide_folder.glob("*.tiff"))
    list_patients = []
    for fname in list_relativedirs:
        index = list_relativedirs.index(fname)
        new_patient = Patient(
            int_uniqueid=index,
            dict_records={
                "H&E": Record(rootdir, fname, {"resolution": "40x"}),
                "HER2-status": index % 2,
            },
        )
        list_patients.append(new_patient)
    return Dataset("myHER2dataset", list_patients)


def settings(**changes: Any) -> dict[str, Any]:
    const_global_info = get_default_constglobinf()
    const_global_info["side"] = 256  # of RecordingLoader's big chunks
    const_global_info["patch"] = 64  # of RngCollector's small chunks
    const_global_info.update(changes)
    return const_global_info


def make(
    dataset: Dataset,
    *,
    batch_size: int = 10,
    tfms: Any = None,
    type_bigchunkloader: Any = RecordingLoader,
    type_smallchunkcollector: Any = RecordingCollector,
    collate_func: Any = None,
    fname_logfile: str | None = None,
    flag_enable_sendgetmessage: bool = True,
    flag_enable_setgetcheckpoint: bool = True,
    **const_global_info: Any,
) -> LightDL:
    """A LightDL of the recording classes; other keyword arguments go to const_global_info."""
    return LightDL(
        dataset=dataset,
        type_bigchunkloader=type_bigchunkloader,
        type_smallchunkcollector=type_smallchunkcollector,
        const_global_info=settings(**const_global_info),
        batch_size=batch_size,
        tfms=tfms,
        collate_func=collate_func,
        fname_logfile=fname_logfile,
        flag_enable_sendgetmessage=flag_enable_sendgetmessage,
        flag_enable_setgetcheckpoint=flag_enable_setgetcheckpoint,
    )


def positions(dataloader: LightDL, batches: int) -> list[tuple[int, int, int, int, int]]:
    """(patient, big chunk x, y, small chunk x, y) of the next ``batches`` batches."""
    found = []
    for _ in range(batches):
        _, list_patients, list_smallchunks = dataloader.get()
        for patient, smallchunk in zip(list_patients, list_smallchunks, strict=True):
            big, small = smallchunk.dict_info_of_bigchunk, smallchunk.dict_info_of_smallchunk
            found.append((patient.int_uniqueid, big["x"], big["y"], small["x"], small["y"]))
    return found


def workers_alive() -> set[int | None]:
    return {process.pid for process in multiprocessing.active_children()}


def loading_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "bigsmall-loader" and t.is_alive()]


# -- the tutorial ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_workers", "call_start"),
    [(2, True), (0, False)],
    ids=["workers2-start", "workers0-get-without-start"],
)
def test_tutorial_dataloader_runs_unchanged(
    dataset: Dataset, slide_folder: Path, num_workers: int, call_start: bool
) -> None:
    before = workers_alive()
    const_global_info = get_default_constglobinf()
    const_global_info["num_workers"] = num_workers
    tfms = torchvision.transforms.ToTensor()
    dataloader = LightDL(
        dataset=dataset,
        type_bigchunkloader=SampleBigchunkLoader,
        type_smallchunkcollector=SampleSmallchunkCollector,
        const_global_info=const_global_info,
        batch_size=10,
        tfms=tfms,
    )
    if call_start:
        dataloader.start()
    seen = set()
    slides: dict[int, openslide.OpenSlide] = {}
    for batch_index in range(5):
        x, list_patients, list_smallchunks = dataloader.get()
        assert x.shape == (10, 3, 224, 224) and x.dtype == torch.float32
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        assert len(list_patients) == len(list_smallchunks) == 10
        for i, (patient, smallchunk) in enumerate(
            zip(list_patients, list_smallchunks, strict=True)
        ):
            # The caller's own Patient objects come back, not copies made in the workers.
            assert any(patient is mine for mine in dataset.list_patients)
            assert isinstance(smallchunk, SmallChunk) and smallchunk.patient is patient
            assert smallchunk.data is None  # the batch holds the pixels
            assert set(smallchunk.dict_info_of_smallchunk) == {"x", "y"}
            assert set(smallchunk.dict_info_of_bigchunk) == {"x", "y"}
            small, big = smallchunk.dict_info_of_smallchunk, smallchunk.dict_info_of_bigchunk
            sx, sy, bx, by = small["x"], small["y"], big["x"], big["y"]
            assert 0 <= sx < 1024 - 224 and 0 <= sy < 1024 - 224
            assert 0 <= bx < 3072 - 1024 and 0 <= by < 2560 - 1024
            seen.add(patient.int_uniqueid)
            if batch_index == 0:  # the pixels are the slide's at the reported position
                record = patient.dict_records["H&E"]
                slide = slides.setdefault(patient.int_uniqueid, openslide.OpenSlide(record.path))
                region = np.array(slide.read_region((bx + sx, by + sy), 0, (224, 224)))[:, :, 0:3]
                assert torch.equal(x[i], tfms(region))
    for slide in slides.values():
        slide.close()
    assert len(seen) > 1
    if num_workers:
        assert len(workers_alive() - before) == num_workers
    dataloader.pause_loading()
    assert workers_alive() - before == set()
    assert loading_threads() == []


# -- messages and checkpoints ---------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2], ids=["workers0", "workers2"])
def test_send_message_reaches_collector_and_loader(dataset: Dataset, num_workers: int) -> None:
    dataloader = make(
        dataset, num_workers=num_workers, num_bigchunkloaders=4, smallchunks_per_bigchunk=5
    )
    _, _, first = dataloader.get()
    assert all(s.dict_info_of_smallchunk["message"] is None for s in first)
    target = dataset.list_patients[1]
    dataloader.send_message(target, {"focus": True})
    in_collector = in_loader = False
    for _ in range(80):
        _, list_patients, list_smallchunks = dataloader.get()
        for patient, smallchunk in zip(list_patients, list_smallchunks, strict=True):
            if patient is not target:
                assert smallchunk.dict_info_of_smallchunk["message"] is None
                continue
            in_collector |= smallchunk.dict_info_of_smallchunk["message"] == {"focus": True}
            in_loader |= smallchunk.dict_info_of_bigchunk["message"] == {"focus": True}
        if in_collector and in_loader:
            break
    dataloader.pause_loading()
    assert in_collector, "extract_smallchunk never saw the message"
    assert in_loader, "extract_bigchunk never saw the message"


@pytest.mark.parametrize("num_workers", [0, 2], ids=["workers0", "workers2"])
def test_checkpoint_survives_big_chunk_retirement(
    dataset: Dataset, tmp_path: Path, num_workers: int
) -> None:
    logfile = tmp_path / "pydmed.log"
    dataloader = make(
        dataset, num_workers=num_workers, num_bigchunkloaders=2, smallchunks_per_bigchunk=3,
        fname_logfile=str(logfile),
    )  # fmt: skip
    visits: dict[int, set[int]] = {}
    loader_saw: dict[int, set[int]] = {}
    for _ in range(12):
        _, list_patients, list_smallchunks = dataloader.get()
        for patient, smallchunk in zip(list_patients, list_smallchunks, strict=True):
            assert smallchunk.dict_info_of_smallchunk["call_count"] < 3  # retired after 3 samples
            visits.setdefault(patient.int_uniqueid, set()).add(
                smallchunk.dict_info_of_smallchunk["visits"]
            )
            checkpoint = smallchunk.dict_info_of_bigchunk["checkpoint"]
            loader_saw.setdefault(patient.int_uniqueid, set()).add(
                0 if checkpoint is None else checkpoint["visits"]
            )
    dataloader.pause_loading()
    # The collector's checkpoint counts the patient's big chunks across retirements...
    assert len(visits) == 4 and all(max(v) >= 3 for v in visits.values()), visits
    # ...and the loader reads what the collector set (it may run one chunk ahead: prefetch).
    assert all(max(v) >= 2 for v in loader_saw.values()), loader_saw
    assert "checkpoint {'visits': 2}" in logfile.read_text()


def test_disabled_checkpoints_and_messages_are_refused(dataset: Dataset) -> None:
    dataloader = make(
        dataset, num_workers=0, flag_enable_setgetcheckpoint=False, flag_enable_sendgetmessage=False
    )
    with pytest.raises(ConfigError, match="messages are disabled"):
        dataloader.send_message(dataset.list_patients[0], "hello")
    with pytest.raises(ConfigError, match="checkpoints are disabled"):
        dataloader.get()
    dataloader.pause_loading()
    assert loading_threads() == []


def test_send_message_to_unknown_patient_is_refused(dataset: Dataset) -> None:
    dataloader = make(dataset, num_workers=0)
    with pytest.raises(ConfigError, match="unknown patient ids"):
        dataloader.send_message(Patient(99, {}), "hello")


# -- lifecycle -------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2], ids=["workers0", "workers2"])
def test_pause_loading_ends_cleanly_and_get_restarts(dataset: Dataset, num_workers: int) -> None:
    before = workers_alive()
    dataloader = make(dataset, num_workers=num_workers, num_bigchunkloaders=2)
    dataloader.pause_loading()  # before start: nothing to stop
    for _ in range(2):
        dataloader.get()
        assert len(workers_alive() - before) == num_workers
        assert dataloader.get_list_loadedpatients() != []
        dataloader.pause_loading()
        assert workers_alive() - before == set()
        assert loading_threads() == []
        assert dataloader.get_list_loadedpatients() == []
    dataloader.pause_loading()


@pytest.mark.parametrize(
    ("num_workers", "collector"),
    [(0, RngCollector), (2, SampleSmallchunkCollector)],
    ids=["workers0-self.rng", "workers2-np.random"],
)
def test_get_after_pause_continues_the_stream(
    dataset: Dataset, num_workers: int, collector: type[SmallChunkCollector]
) -> None:
    def two_runs() -> tuple[list[Any], list[Any]]:
        dataloader = make(
            dataset, num_workers=num_workers, num_bigchunkloaders=2, smallchunks_per_bigchunk=5,
            type_smallchunkcollector=collector,
        )  # fmt: skip
        first = positions(dataloader, 3)
        dataloader.pause_loading()
        assert dataloader._stream.epoch == 1  # the restart loads the engine's next epoch
        second = positions(dataloader, 3)
        dataloader.pause_loading()
        return first, second

    first, second = two_runs()
    # The big chunks (the engine's generators) and the crops (self.rng with 0 workers, np.random
    # seeded per worker and epoch with 2) both continue instead of replaying...
    assert [big for *big, _, _ in second] != [big for *big, _, _ in first]
    assert [small[-2:] for small in second] != [small[-2:] for small in first]
    # ...and the same seed and the same get/pause sequence give the same stream.
    assert two_runs() == (first, second)


def test_stream_state_dict_resumes_exactly(dataset: Dataset) -> None:
    def make_dl() -> LightDL:
        return make(
            dataset, num_workers=0, batch_size=5, num_bigchunkloaders=3,
            smallchunks_per_bigchunk=4, type_smallchunkcollector=RngCollector,
        )  # fmt: skip

    reference = make_dl()
    expected = [reference.get() for _ in range(5)]
    reference.pause_loading()
    interrupted = make_dl()
    for _ in range(2):
        interrupted.get()
    state = pickle.loads(pickle.dumps(interrupted._stream.state_dict()))
    interrupted.pause_loading()
    assert state["samples"] == 10 and state["reservoir"] is not None
    resumed = make_dl()
    resumed._stream.load_state_dict(state)
    got = [resumed.get() for _ in range(3)]
    resumed.pause_loading()
    for (x, list_patients, list_smallchunks), (x_ref, patients_ref, smallchunks_ref) in zip(
        got, expected[2:], strict=True
    ):
        assert torch.equal(x, x_ref)
        assert list_patients == patients_ref
        assert [s.dict_info_of_bigchunk for s in list_smallchunks] == [
            s.dict_info_of_bigchunk for s in smallchunks_ref
        ]
        assert [s.dict_info_of_smallchunk for s in list_smallchunks] == [
            s.dict_info_of_smallchunk for s in smallchunks_ref
        ]


def test_context_manager_pauses(dataset: Dataset) -> None:
    with make(dataset, num_workers=0, num_bigchunkloaders=2) as dataloader:
        dataloader.get()
        assert loading_threads() != []
    assert loading_threads() == []


# -- extension points ------------------------------------------------------------------------------


def test_abstract_methods_are_enforced(dataset: Dataset) -> None:
    patient = dataset.list_patients[0]
    for cls in (NoLoader, BigChunkLoader):
        with pytest.raises(ExtractorError, match="must implement extract_bigchunk"):
            cls(patient=patient)
    for cls in (NoCollector, SmallChunkCollector):
        with pytest.raises(ExtractorError, match="must implement extract_smallchunk"):
            cls(patient=patient)
    with pytest.raises(TypeError):  # ExtractorError is a TypeError, as ABCMeta's refusal is
        NoLoader(patient=patient)
    # The tutorial decorates its implementations with @abstractmethod: they still instantiate.
    assert SampleBigchunkLoader(patient=patient).patient is patient
    assert SampleSmallchunkCollector(patient=patient).patient is patient
    with pytest.raises(ExtractorError, match="NoLoader cannot be used"):
        make(dataset, num_workers=0, type_bigchunkloader=NoLoader)
    with pytest.raises(ExtractorError, match="NoCollector cannot be used"):
        make(dataset, num_workers=0, type_smallchunkcollector=NoCollector)
    with pytest.raises(
        ConfigError, match="type_bigchunkloader must be a subclass of BigChunkLoader"
    ):
        make(dataset, num_workers=0, type_bigchunkloader=SampleBigchunkLoader(patient=patient))


class KwargsCollector(SampleSmallchunkCollector):
    def __init__(self, *args, **kwargs):
        self.kwarg_names = sorted(kwargs)
        super().__init__(*args, **kwargs)

    def extract_smallchunk(self, call_count, bigchunk, last_message_fromroot):
        smallchunk = super().extract_smallchunk(call_count, bigchunk, last_message_fromroot)
        smallchunk.dict_info_of_smallchunk.update(
            kwargs=self.kwarg_names,
            my_setting=self.const_global_info["my_setting"],
            loader=self.type_bigchunkloader.__name__,
        )
        return smallchunk


def test_collectors_get_pydmed_constructor_arguments(dataset: Dataset) -> None:
    dataloader = make(
        dataset, num_workers=0, my_setting=7, type_smallchunkcollector=KwargsCollector
    )
    _, _, list_smallchunks = dataloader.get()
    dataloader.pause_loading()
    info = list_smallchunks[0].dict_info_of_smallchunk
    assert info["kwargs"] == sorted(
        ["patient", "queue_smallchunks", "const_global_info", "type_bigchunkloader", "queue_logs",
         "old_checkpoint", "queue_checkpoint", "last_message_from_root"]
    )  # fmt: skip
    assert info["my_setting"] == 7 and info["loader"] == "RecordingLoader"
    # Outside LightDL a collector keeps its checkpoint itself.
    collector = RecordingCollector(patient=dataset.list_patients[0], old_checkpoint={"visits": 4})
    assert collector.get_checkpoint() == {"visits": 4}
    collector.set_checkpoint({"visits": 5})
    assert collector.get_checkpoint() == {"visits": 5}


def test_collate_func_gets_raw_smallchunks_and_tfms(dataset: Dataset) -> None:
    calls: list[tuple[Any, ...]] = []

    def collate(list_smallchunks: list[SmallChunk], tfms: Any) -> str:
        calls.append(
            (
                len(list_smallchunks),
                list_smallchunks[0].data.shape,
                list_smallchunks[0].data.dtype,
                tfms,
            )
        )
        return "batch"

    def tfms(data: Any) -> Any:
        raise AssertionError("tfms is the collate function's to apply")

    dataloader = make(dataset, num_workers=0, tfms=tfms, collate_func=collate)
    assert dataloader.get() == "batch"
    dataloader.pause_loading()
    assert calls == [(10, (224, 224, 3), np.uint8, tfms)]


def test_default_collate_without_tfms_stacks_the_data(dataset: Dataset) -> None:
    dataloader = make(dataset, num_workers=0, batch_size=4)
    x, list_patients, _ = dataloader.get()
    dataloader.pause_loading()
    assert x.shape == (4, 224, 224, 3) and x.dtype == torch.uint8
    assert LightDL.default_collate(
        [SmallChunk(np.zeros((2, 2, 3), np.uint8), {}, {}, list_patients[0])],
        torchvision.transforms.ToTensor(),
    )[0].shape == (1, 3, 2, 2)


def test_label_balanced_dl(dataset: Dataset) -> None:
    def func_getlabel_of_patient(patient: Patient) -> int:
        return int(patient.int_uniqueid == 3)  # labels 0, 0, 0, 1

    dataloader = LabelBalancedDL(
        func_getlabel_of_patient,
        dataset=dataset,
        type_bigchunkloader=RecordingLoader,
        type_smallchunkcollector=RecordingCollector,
        const_global_info=settings(
            num_workers=0, num_bigchunkloaders=4, smallchunks_per_bigchunk=5
        ),
        batch_size=10,
        tfms=None,
    )
    assert dataloader.possible_labels == [0, 1]
    labels = [func_getlabel_of_patient(p) for _ in range(20) for p in dataloader.get()[1]]
    dataloader.pause_loading()
    assert 0.3 <= sum(labels) / len(labels) <= 0.7  # one patient in four, half of the samples
    with pytest.raises(ConfigError, match="gave None"):
        LabelBalancedDL(
            lambda p: None,
            dataset,
            SampleBigchunkLoader,
            SampleSmallchunkCollector,
            settings(),
            10,
            None,
        )


def test_visualize_and_scheduling_counts(dataset: Dataset) -> None:
    dataloader = make(dataset, num_workers=0, num_bigchunkloaders=4, smallchunks_per_bigchunk=5)
    for _ in range(3):
        dataloader.get()
    loaded, waiting = dataloader.get_list_loadedpatients(), dataloader.get_list_waitingpatients()
    counts = [dataloader.get_schedcount_of(p) for p in dataset.list_patients]
    dataloader.pause_loading()
    assert loaded and sorted(p.int_uniqueid for p in loaded + waiting) == [0, 1, 2, 3]
    # 4 resident chunks, and at least 3 replaced: 30 samples, at most 4 in each unretired chunk.
    assert sum(counts) >= 4 + 3
    calls: list[tuple[Patient, list[SmallChunk]]] = []
    dataloader.visualize(
        lambda patient, list_smallchunks: calls.append((patient, list_smallchunks))
    )
    assert [patient for patient, _ in calls] == dataset.list_patients
    assert all(
        patient is mine for (patient, _), mine in zip(calls, dataset.list_patients, strict=True)
    )
    assert sum(len(chunks) for _, chunks in calls) == 30
    assert all(s.data is None and s.patient is p for p, chunks in calls for s in chunks)


def test_overriding_lightdl_scheduling_is_refused(dataset: Dataset) -> None:
    class MyDL(LightDL):
        def schedule(self):
            return None, None

    with pytest.raises(ConfigError, match=r"bigsmall_torch\.Scheduler"):
        MyDL(dataset, SampleBigchunkLoader, SampleSmallchunkCollector, settings(), 10, None)


# -- data model and settings -----------------------------------------------------------------------


def test_data_model_and_conversion(dataset: Dataset, slide_folder: Path) -> None:
    record = dataset.list_patients[0].dict_records["H&E"]
    assert record.path == slide_folder / "synthetic_000.tiff" and record.path.is_file()
    assert Patient(3, {}) == Patient(3, {"other": 1}) and hash(Patient(3, {})) == hash(3)
    assert Patient(np.int64(3), {}).int_uniqueid == 3
    with pytest.raises(DatasetError, match="duplicate int_uniqueid"):
        Dataset("twice", [Patient(1, {}), Patient(1, {})])
    with pytest.raises(DatasetError, match="must hold"):
        Dataset("wrong", [bst.Patient(1, {"wsi": bst.Record("a.svs")})])
    with pytest.raises(ConfigError, match="int_uniqueid"):
        Patient(1.5, {})  # type: ignore[arg-type]
    converted = dataset.to_bigsmall(lambda patient: patient.dict_records["HER2-status"])
    assert isinstance(converted, bst.Dataset) and converted.name == "myHER2dataset"
    assert [p.id for p in converted] == [0, 1, 2, 3]
    assert [p.label for p in converted] == [0, 1, 0, 1]
    assert converted[1].records["H&E"].path == slide_folder / "synthetic_001.tiff"
    assert converted[1].records["H&E"].info == {"resolution": "40x"}
    assert converted[1].info == {"HER2-status": 1}
    assert Dataset("no records", [Patient(5, {"label": 1})]).to_bigsmall()[0].records  # placeholder


def test_default_constglobinf_and_bad_settings(dataset: Dataset) -> None:
    defaults = get_default_constglobinf()
    pydmed_keys = {"num_bigchunkloaders", "maxlength_queue_smallchunk", "maxlength_queue_lightdl",
                   "interval_resched", "core-assignment"}  # fmt: skip
    assert pydmed_keys | {"num_workers", "smallchunks_per_bigchunk", "seed"} == set(defaults)
    assert defaults["core-assignment"] == {
        "lightdl": None,
        "smallchunkloaders": None,
        "bigchunkloaders": None,
    }
    dataloader = make(dataset, num_workers=2, num_bigchunkloaders=5)
    assert dataloader.buffer_size == 3  # 5 resident big chunks split over 2 workers
    pickle.dumps(dataloader._stream)  # the engine's dataset travels to spawned workers
    for key, value in [
        ("num_bigchunkloaders", 0),
        ("num_workers", -1),
        ("smallchunks_per_bigchunk", "8"),
        ("seed", 1.5),
    ]:
        with pytest.raises(ConfigError, match=key):
            make(dataset, **{key: value})
    with pytest.raises(ConfigError, match="batch_size"):
        make(dataset, batch_size=0)
    wrong: Any = None
    with pytest.raises(ConfigError, match="const_global_info must be a dict"):
        LightDL(dataset, SampleBigchunkLoader, SampleSmallchunkCollector, wrong, 10, None)
    wrong = dataset.to_bigsmall()
    with pytest.raises(ConfigError, match=r"compat\.pydmed\.Dataset"):
        LightDL(wrong, SampleBigchunkLoader, SampleSmallchunkCollector, settings(), 10, None)


def test_workers_seed_the_global_generators_apart() -> None:
    saved = np.random.get_state(), random.getstate()
    try:
        draws = []
        for epoch, worker in [(0, 0), (0, 1), (1, 0), (0, 0)]:
            _seed_worker(0, epoch, worker)
            draws.append((np.random.randint(1 << 30), random.random()))
    finally:
        np.random.set_state(saved[0])
        random.setstate(saved[1])
    assert draws[0] == draws[3]  # a function of (seed, epoch, worker) only
    for other in draws[1:3]:  # another worker, or the same worker after a restart: other draws
        assert draws[0][0] != other[0] and draws[0][1] != other[1]
