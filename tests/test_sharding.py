from __future__ import annotations

import itertools

import numpy as np
import pytest

from bigsmall_torch._engine.sharding import assign_shards, derive_rng, split_evenly


@pytest.mark.parametrize(("patients", "shards"), [(10, 1), (10, 3), (8, 4), (5, 5), (100, 7)])
def test_every_patient_in_exactly_one_shard(patients: int, shards: int) -> None:
    assignment = assign_shards(patients, shards, seed=3, epoch=1)
    owned = [i for shard in assignment for i, part, parts in shard]
    assert sorted(owned) == list(range(patients))
    assert all((part, parts) == (0, 1) for shard in assignment for _, part, parts in shard)
    sizes = [len(s) for s in assignment]
    assert max(sizes) - min(sizes) <= 1


def test_assignment_reshuffles_per_epoch_and_is_deterministic() -> None:
    a0 = assign_shards(20, 4, seed=0, epoch=0)
    assert a0 == assign_shards(20, 4, seed=0, epoch=0)
    assert a0 != assign_shards(20, 4, seed=0, epoch=1)
    assert a0 != assign_shards(20, 4, seed=1, epoch=0)


@pytest.mark.parametrize(("patients", "shards"), [(1, 2), (1, 4), (2, 3), (3, 8)])
def test_fewer_patients_than_shards_split_into_disjoint_parts(patients: int, shards: int) -> None:
    assignment = assign_shards(patients, shards, seed=0, epoch=0)
    assert all(len(s) == 1 for s in assignment)  # every shard has work
    by_patient: dict[int, list[tuple[int, int]]] = {}
    for shard in assignment:
        (i, part, parts), = shard
        by_patient.setdefault(i, []).append((part, parts))
    assert sorted(by_patient) == list(range(patients))
    for parts_list in by_patient.values():
        count = parts_list[0][1]
        assert sorted(p for p, _ in parts_list) == list(range(count))  # each part exactly once
        assert all(c == count for _, c in parts_list)


def test_split_evenly_sums_and_balances() -> None:
    for total, parts in itertools.product([0, 1, 7, 100, 101], [1, 2, 3, 8]):
        counts = [split_evenly(total, parts, i) for i in range(parts)]
        assert sum(counts) == total and max(counts) - min(counts) <= 1


def test_derive_rng_depends_on_every_key() -> None:
    base = derive_rng(1, 2, 3).integers(0, 2**31, 4)
    assert np.array_equal(base, derive_rng(1, 2, 3).integers(0, 2**31, 4))
    for other in [(0, 2, 3), (1, 0, 3), (1, 2, 0), (1, 2, 3, 0), (1, 2)]:
        assert not np.array_equal(base, derive_rng(*other).integers(0, 2**31, 4))
