"""The README and the guide: short, buildable, generated pages up to date, commands that work as written."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tinylm.report import pages

REPO = Path(__file__).resolve().parent.parent
COMMAND_PAGES = [REPO / "README.md", REPO / "docs" / "getting-started.md"]
"""The pages whose every command a newcomer copies: each must work as written in a fresh clone."""

CHEAP = {"train": ["--preset", "tiny", "--max-steps", "2", "--eval-every", "1", "--eval-tokens", "512"],
         "ablate": ["--max-tokens", "1024", "--eval-tokens", "512", "--batch-size", "2"],
         "eval": ["--eval-tokens", "512"], "sample": ["--max-new-tokens", "5"]}  # fmt: skip
"""Flags appended (the last of a flag wins) so the fast test runs each command in seconds; the slow test does not."""


def commands(path: Path) -> list[str]:
    """The command lines of a page's ```bash blocks, continuation lines joined, comments dropped."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                found.append(line)
    return found


def test_the_readme_is_short_and_names_no_machine_of_ours():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for folder in ("src", "docs"):
        for path in (REPO / folder).rglob("*"):
            if path.suffix in {".py", ".md", ".yaml", ".yml"}:
                text = path.read_text()
                for needle in ("/work/", "/home/", "../shared"):
                    assert needle not in text, f"{path.relative_to(REPO)} names {needle}"
    assert not re.search(r"/work/|/home/|\.\./shared", readme)


def test_generated_results_pages_match_their_saved_data():
    stale = pages.write(REPO, check=True)
    assert stale == [], f"stale: {stale}; run python -m tinylm.report.pages"


def test_a_changed_measurement_makes_its_page_stale(tmp_path):
    copy = tmp_path / "repo"
    for name in ("results", "docs", "README.md"):
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, copy / name)
    path = copy / "results" / "bench" / "cpu-basic.json"
    path.write_text(path.read_text().replace('"speedup_vs_textbook": 1.7', '"speedup_vs_textbook": 2.7'))
    assert pages.write(copy, check=True) == ["docs/results/cpu-speed.md"]
    pages.write(copy)
    assert "2.74×" in (copy / "docs" / "results" / "cpu-speed.md").read_text()


def test_the_guide_builds_with_strict_checks(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-f", str(REPO / "mkdocs.yml"),
                           "--site-dir", str(tmp_path / "site")], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "studies" / "index.html").exists()
    assert (tmp_path / "site" / "results" / "modern-study" / "report-modern-basic-effects.png").exists()


def _argv(line: str) -> list[str]:
    """A page's command as this test runs it: the set-up's .venv/bin programs are this interpreter's."""
    argv = shlex.split(line)
    if argv[0] == ".venv/bin/tinylm":
        return [sys.executable, "-m", "tinylm", *argv[1:]]
    if argv[0] == ".venv/bin/python":
        return [sys.executable, *argv[1:]]
    return argv


def _needs_slurm(argv: list[str]) -> bool:
    return argv[:2] == ["bash", "scripts/slurm_cluster.sh"] or "--launcher" in argv and "slurm" in argv


def _run_page_commands(tmp_path: Path, cheap: bool) -> list[str]:
    ran = []
    slurm_study = None
    for page in COMMAND_PAGES:
        clone = tmp_path / page.stem  # each page as a newcomer follows it, in a folder of its own
        clone.mkdir()
        for line in commands(page):
            if line in ran:
                continue  # the same command on another page: once is enough
            argv = _argv(line)
            if argv[:2] == ["bash", "scripts/setup.sh"] or argv[1:4] == ["-m", "pytest", "-q"]:
                continue  # the set-up made this environment, and the test suite is what runs this
            if _needs_slurm(argv) or slurm_study and slurm_study in line:
                if cheap:  # starting a Slurm cluster (root, apt-get) is the slow test's, as is its study
                    slurm_study = slurm_study or (argv[argv.index("--out") + 1] if "--out" in argv else None)
                    continue
                if argv[0] == "bash":
                    argv = ["bash", str(REPO / argv[1])]  # the script from this repository
            known = argv[:3] == [sys.executable, "-m", "tinylm"] or argv[0] == "bash" and _needs_slurm(line.split())
            assert known, f"{page.name}: an unknown kind of command: {line}"
            if cheap:
                argv += CHEAP.get(argv[3], [])
            done = subprocess.run(argv, cwd=clone, capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, f"{page.name}: {line}\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
            ran.append(line)
    return ran


def test_every_readme_and_getting_started_command_runs(tmp_path):
    ran = _run_page_commands(tmp_path, cheap=True)
    assert any(" train " in line for line in ran) and any(" sample " in line for line in ran)
    assert (tmp_path / "README" / "runs" / "basic" / "eval.json").exists()
    assert (tmp_path / "README" / "runs" / "seed-tiny" / "report.md").exists()


@pytest.mark.slow
def test_every_readme_and_getting_started_command_runs_as_written(tmp_path):
    _run_page_commands(tmp_path, cheap=False)
