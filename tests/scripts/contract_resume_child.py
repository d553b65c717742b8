"""Resume streams of the contract suite in a fresh process (used by tests/contract).

``python contract_resume_child.py JOBS OUT``: JOBS is a pickled list of jobs, each a dict with
``spec`` (a ``contract_streams.Spec``), ``num_workers``, ``state`` (the path of a pickled
``StatefulDataLoader.state_dict()``) and ``take`` (batches to read, None: to the end of the epoch).
For every job a new StatefulDataLoader over a newly built dataset loads the state and streams on;
OUT receives the pickled list of the records (``contract_streams.records``) of each job, in order.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "contract"))

import contract_streams as cs


def resume(job: dict) -> list[tuple]:
    spec, num_workers = job["spec"], job["num_workers"]
    loader = cs.make_loader(spec, cs.build(spec, num_workers), num_workers, stateful=True)
    loader.load_state_dict(pickle.loads(Path(job["state"]).read_bytes()))
    out: list[tuple] = []
    for index, batch in enumerate(loader):
        if job["take"] is not None and index >= job["take"]:
            break
        out += cs.records(spec, batch)
    return out


def main() -> None:
    jobs = pickle.loads(Path(sys.argv[1]).read_bytes())
    Path(sys.argv[2]).write_bytes(pickle.dumps([resume(job) for job in jobs]))


if __name__ == "__main__":
    main()
