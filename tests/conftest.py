import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from helpers import threads_for_tests  # noqa: E402 (tests/ is on sys.path from here)

torch.set_num_threads(threads_for_tests())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(items):
    """The files with the most end-to-end (slow) tests run first: with pytest-xdist's --dist
    loadfile (pytest.ini) the short files then fill the workers' last minutes instead of one long
    file running alone at the end. The order inside a file is kept."""
    slow = {}
    for item in items:
        slow[item.fspath] = slow.get(item.fspath, 0) + (item.get_closest_marker("slow") is not None)
    # test_slurm.py first of all: its one-node SLURM takes about a minute to start, then runs real jobs
    items.sort(key=lambda item: (item.fspath.basename != "test_slurm.py", -slow[item.fspath]))
