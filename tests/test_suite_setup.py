"""The test suite's own set-up (tests/conftest.py): the share of the cores each pytest-xdist worker takes."""

import os

import pytest
import torch

import conftest


@pytest.fixture
def torch_threads_restored():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("affinity_known", [True, False], ids=["linux", "no-sched-getaffinity"])
def test_each_worker_takes_its_share_of_the_cores(monkeypatch, torch_threads_restored, affinity_known):
    # 2 workers on 4 cores: 2 threads each, for torch in the worker and (OMP_NUM_THREADS) the processes its
    # tests start; also where os.sched_getaffinity does not exist (macOS), where the suite must still start
    if affinity_known:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    else:
        monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # so that the test's own value is restored after it
    conftest.pytest_configure(None)
    assert os.environ["OMP_NUM_THREADS"] == "2" and torch.get_num_threads() == 2
