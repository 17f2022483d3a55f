"""The benchmarks find the TinyStories slice through one setting, TINYLM_TINYSTORIES, and say so when it is absent."""

import os
import subprocess
import sys

from conftest import BENCHMARKS, load_script


def test_a_benchmark_without_the_slice_is_one_line_naming_the_setting(tmp_path):
    env = {**os.environ, "TINYLM_TINYSTORIES": str(tmp_path / "absent")}
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_prepare.py")], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "TINYLM_TINYSTORIES" in done.stderr and "Traceback" not in done.stderr


def test_the_setting_points_at_any_folder(tmp_path, monkeypatch):
    slice_ = load_script("tinystories")
    monkeypatch.setenv("TINYLM_TINYSTORIES", str(tmp_path))
    assert slice_.tinystories_path() == tmp_path and slice_.missing_reason() is None
    monkeypatch.delenv("TINYLM_TINYSTORIES")
    assert slice_.tinystories_path() == slice_.DEFAULT
