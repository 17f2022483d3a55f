"""Shared fixtures: a private cache per test session and small corpora written by the tests."""

from __future__ import annotations

import importlib.util
import os
import random
from pathlib import Path
from types import ModuleType

import pytest

from tinylm.config import ModelConfig, RunConfig, TrainConfig
from tinylm.data.tokenizer import gpt2_ranks_path

_NAMES = ["lily", "tom", "max", "sue", "ben", "mia", "sam", "zoe"]
_THINGS = ["ball", "cat", "tree", "boat", "cake", "dog", "kite", "box"]
_VERBS = ["saw", "found", "liked", "wanted", "made", "lost", "took", "had"]
_FEELINGS = ["happy", "sad", "glad", "tired", "brave", "kind"]


def make_story(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(3, 9)):
        name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
        sentences.append(
            rng.choice(
                [
                    f"{name} {rng.choice(_VERBS)} a {thing}.",
                    f"the {thing} was big and {name} was {rng.choice(_FEELINGS)}.",
                    f"one day {name} went to the park with a {thing}.",
                    f'"i like my {thing}," said {name}.',
                ]
            )
        )
    return "once upon a time, " + " ".join(sentences)


def write_stories(path: Path, n: int, seed: int = 0) -> Path:
    """A TinyStories-layout file: each story followed by a '<|endoftext|>' line."""
    rng = random.Random(seed)
    path.write_text("".join(f"{make_story(rng)}\n<|endoftext|>\n" for _ in range(n)))
    return path


def pytest_xdist_auto_num_workers(config):
    """-n auto: a worker per core this process may use (xdist alone counts the host's cores where psutil is
    installed, dozens in a container given two)."""
    from tinylm.study.local import cpu_cores

    return cpu_cores()


def pytest_configure(config):
    """Under pytest-xdist (the suite's default, -n auto), the cores are shared out among the workers: each
    worker's torch, and the tinylm processes its tests start, take their share of threads rather than every
    core each (which would run more threads than cores)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        import torch

        from tinylm.study.local import cpu_cores  # os.sched_getaffinity is Linux's alone

        threads = max(1, cpu_cores() // int(workers))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("TINYLM_GPT2_RANKS", str(gpt2_ranks_path()))  # the installed ranks, found before redirecting
    # TINYLM_TEST_CACHE: one cache for many sessions (benchmarks/mutation.sh runs a session per mutant,
    # each of which would otherwise prepare the test corpora again: seconds a session)
    mp.setenv("TINYLM_CACHE", os.environ.get("TINYLM_TEST_CACHE") or str(tmp_path_factory.mktemp("cache")))
    mp.setenv("TINYLM_CPU_BF16", "0")  # --precision auto means fp32 on every CPU: the same numbers anywhere
    yield
    mp.undo()


@pytest.fixture(autouse=True, scope="session")
def _tqdm_fork_safe():
    """tqdm's bars share a lock across processes (a multiprocessing one: a semaphore that forked processes
    share) and start a monitor thread. benchmarks/mutation.sh forks a process per mutant from the test
    process: once one of them stopped holding that lock, every later one that drew a bar hung on it for ever.
    Here: a lock of each process's own, and no monitor thread."""
    import threading

    from tqdm import tqdm

    lock, interval = tqdm.get_lock(), tqdm.monitor_interval
    tqdm.set_lock(threading.RLock())
    tqdm.monitor_interval = 0
    yield
    tqdm.set_lock(lock)
    tqdm.monitor_interval = interval


@pytest.fixture(scope="session")
def stories(tmp_path_factory) -> Path:
    return write_stories(tmp_path_factory.mktemp("data") / "stories.txt", 400)


TINY_CLI_FLAGS = ["--preset", "tiny", "--device", "cpu", "--batch-size", "4", "--eval-tokens", "512",
                  "--tokenizer", "bpe:512", "--quiet"]  # fmt: skip
"""The tiny model of tiny_config() as `tinylm train` flags (add --data and --out)."""


def tiny_config(data: Path | str, out: Path, **train) -> RunConfig:
    """A tiny model; a small trained BPE keeps its steps cheap (pass tokenizer='gpt2' for GPT-2's 50257)."""
    settings = dict(
        data=str(data), out=str(out), max_steps=12, batch_size=4, eval_every=4, eval_tokens=512, lr=3e-3, seed=7,
        tokenizer="bpe:512", device="cpu",  # the CPU's behaviour; test_cuda.py runs the same on a GPU
    )  # fmt: skip
    settings.update(train)
    model = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)
    return RunConfig(model=model, train=TrainConfig(**settings), preset="tiny")


def tiny_trainer(data: Path | str, out: Path, quiet: bool = True, vocab_size: int | None = None, **train):
    """A Trainer of tiny_config() on one CPU process, built as `tinylm train` builds it, before its first step.
    vocab_size: the model's embedding rows, when not the tokenizer's."""
    import torch

    from tinylm.distributed import Cluster
    from tinylm.train import build_trainer

    cfg = tiny_config(data, out, **train)
    if vocab_size is not None:
        cfg.model.vocab_size = vocab_size
    return build_trainer(cfg, resume=False, quiet=quiet, cluster=Cluster(), device=torch.device("cpu"))


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
"""The repository's benchmarks/ folder (measurement scripts run as files, not installed with the package)."""


def load_script(name: str) -> ModuleType:
    """benchmarks/NAME.py imported as a module, for tests of its functions."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tinystories() -> Path:
    """The TinyStories slice's folder (TINYLM_TINYSTORIES, see benchmarks/tinystories.py); skips when absent."""
    slice_ = load_script("tinystories")
    if reason := slice_.missing_reason():
        pytest.skip(reason)
    return slice_.tinystories_path()
