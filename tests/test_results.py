"""The results page and the README's results block are written from JSON only."""

import datetime
import json
import os
import subprocess
import sys

import pytest

from benchmarks import common, results
from mlres_jax import parallel, plan, reporting

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What a benchmark records (`parallel.environment`); values no machine has.
MACHINE = {
    "platform": "cpu",
    "device_kind": "cpu",
    "devices": 1,
    "local_devices": 1,
    "processes": 1,
    "host": "benchhost",
    "cpu_model": "Test CPU 9000",
    "cpu_count": 4,
    "cpus_available": 2,
    "load_average_1_5_15_min": [0.5, 0.25, 0.125],
    "commit": "0123456789ab",
    "time_utc": "2031-02-03T04:05:06+00:00",
    "python": "3.99.0",
    "versions": {"jax": "9.9.9"},
}
# What a run recorded before runs recorded the CPUs and the load.
ENVIRONMENT = {
    "platform": "cpu",
    "device_kind": "cpu",
    "devices": 1,
    "local_devices": 1,
    "processes": 1,
    "host": "testhost",
    "cpu_model": "Test CPU 9000",
    "commit": "fedcba987654",
    "time_utc": "2031-05-06T07:08:09+00:00",
    "python": "3.99.0",
    "versions": {"jax": "9.9.9"},
}
README = "# Title\n\nBefore.\n\n{begin}\nold text\n{end}\n\nAfter.\n"


def _stop_agreement_report() -> dict:
    def stats(median, p25, p75, maximum):
        return {"median": median, "p25": p25, "p75": p75, "min": p25, "max": maximum, "n": 10}

    return {
        "benchmark": "stop_agreement",
        "machine": MACHINE,
        "exchanges": 10,
        "warmup": 2,
        "results": [
            {"processes": 1, "microseconds": stats(0.09, 0.08, 0.11, 1.62)},
            {"processes": 2, "microseconds": stats(1221.06, 1054.2, 1465.9, 9231.3)},
        ],
    }


def _main_job_summary() -> dict:
    # The main job's plan: 7 epochs of 600 steps, cycles from epochs 4 and 6.
    cycles = plan.plan_cycles(
        stage_sizes=(2, 2, 2),
        step_size=1.0,
        num_epochs=7.0,
        cycle_boundaries=(4.0, 6.0),
        steps_per_epoch=600,
        multilevel=True,
    )
    seconds = {
        "train_seconds": 100.0,
        "compile_seconds": 5.0,
        "eval_seconds": 10.0,
        "checkpoint_seconds": 1.0,
    }
    errors = (0.0936, 0.0898, 0.0886)
    records = [
        reporting.cycle_record(
            c,
            num_params=params,
            steps_per_epoch=600,
            seconds=seconds,
            last_evaluation={
                "train_loss": 0.25,
                "train_error": 0.09,
                "test_loss": 0.26,
                "test_error": error,
            },
        )
        for c, params, error in zip(cycles, (43_490, 92_322, 189_986), errors)
    ]
    return reporting.run_summary(
        config={"width": 8, "num_epochs": 7.0, "seed": 0, "multilevel": True},
        dataset={
            "name": "fashion_mnist",
            "train_examples": 60_000,
            "test_examples": 10_000,
            "steps_per_epoch": 600,
        },
        cycles=cycles,
        cycle_records=records,
        history=[],
        wall_seconds=400.0,
        environment=ENVIRONMENT,
    )


def _write(folder, name, payload):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "w", encoding="utf-8") as handle:
        json.dump(payload, handle)


def _readme(path) -> str:
    text = README.format(begin=results.BEGIN, end=results.END)
    path.write_text(text)
    return text


def _results_command(results_dir, output):
    """``python -m benchmarks.results`` on ``results_dir``, writing ``output`` (no README)."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.results",
            f"--results_dir={results_dir}",
            f"--output={output}",
            "--readme=",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )


def test_the_command_writes_the_page_from_the_json_it_finds(tmp_path):
    results_dir = tmp_path / "docs" / "results"
    _write(results_dir, "stop_agreement.json", _stop_agreement_report())
    output = tmp_path / "docs" / "results.md"
    result = _results_command(results_dir, output)
    assert result.returncode == 0, result.stderr
    page = output.read_text()
    assert page.startswith("# Results\n\nWritten by `python -m benchmarks.results`")
    # The table's numbers and the machine, commit and date, all from the JSON.
    assert "| 2 | 1221.1 | 1054.2 | 1465.9 | 9231.3 |" in page
    assert "measured 2031-02-03T04:05:06+00:00 at commit 0123456789ab." in page
    assert (
        "- Machine: 1 cpu device(s) (cpu) in 1 process(es) on benchhost; Test CPU 9000, "
        "2 of 4 CPUs, load average 0.50; Python 3.99.0, jax 9.9.9; "
        "commit 0123456789ab; 2031-02-03T04:05:06+00:00."
    ) in page
    assert "[`stop_agreement.json`](results/stop_agreement.json)" in page
    # The files not there are named, and get no section.
    assert "- `study.json`, written by `python -m benchmarks.study`" in page
    assert "## Multi-level" not in page and "## The main job" not in page
    # A missing folder is one line and status 2.
    result = _results_command(tmp_path / "none", output)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --results_dir=")


def test_the_main_job_section_and_the_readme_headline(tmp_path):
    results_dir = str(tmp_path / "docs" / "results")
    _write(results_dir, "main_job.json", _main_job_summary())
    with open(os.path.join(results_dir, "main_job_curves.png"), "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n")
    readme = tmp_path / "README.md"
    _readme(readme)
    page = results.write_pages(results_dir, str(tmp_path / "docs" / "results.md"), str(readme))
    assert page == (tmp_path / "docs" / "results.md").read_text()
    # Per cycle: blocks, h, parameters, epochs (2400 steps / 600), steps, test error.
    row1 = "| 1 | 2-2-2 | 1 | 43,490 | 4 | 2400 | 9.36 % | 100.0 | 5.0 | 10.0 |"
    row3 = "| 3 | 8-8-8 | 0.25 | 189,986 | 1 | 600 | 8.86 % | 100.0 | 5.0 | 10.0 |"
    assert row1 in page and row3 in page
    assert "## The main job: fashion_mnist, width 8, 2-2-2 → 4-4-4 → 8-8-8, 7 epochs" in page
    assert "measured 2031-05-06T07:08:09+00:00 at commit fedcba987654." in page
    assert (
        "- Machine: 1 cpu device(s) (cpu) in 1 process(es) on testhost; Test CPU 9000; "
        "Python 3.99.0, jax 9.9.9; commit fedcba987654; 2031-05-06T07:08:09+00:00."
    ) in page
    assert "Final test error 8.86 % on 10000 test images after 4200 steps" in page
    assert "](results/main_job_curves.png)" in page
    # The README: the block is the main job's table, the rest as it was.
    text = readme.read_text()
    assert text.startswith("# Title\n\nBefore.\n\n" + results.BEGIN + "\n")
    assert text.endswith(results.END + "\n\nAfter.\n")
    assert "old text" not in text and row1 in text
    assert "[docs/results.md](docs/results.md)" in text
    assert (
        "measured 2031-05-06T07:08:09+00:00 at commit fedcba987654 on 1 cpu device(s) (cpu) "
        "in 1 process(es) on testhost; Test CPU 9000. All results: "
    ) in text
    # Written again from the same JSON: the same files.
    results.write_pages(results_dir, str(tmp_path / "docs" / "results.md"), str(readme))
    assert readme.read_text() == text


def test_without_a_result_the_readme_says_so(tmp_path):
    (tmp_path / "results").mkdir()
    readme = tmp_path / "README.md"
    _readme(readme)
    results.write_pages(str(tmp_path / "results"), str(tmp_path / "results.md"), str(readme))
    assert "No headline result yet: neither `study.json` nor `main_job.json`" in readme.read_text()


def test_a_readme_without_the_markers_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "results").mkdir()
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n")
    with pytest.raises(common.BenchmarkError, match="has no results block"):
        results.write_pages(str(tmp_path / "results"), str(tmp_path / "results.md"), str(readme))
    assert not (tmp_path / "results.md").exists() and readme.read_text() == "# Title\n"


def test_a_damaged_json_file_is_named(tmp_path):
    (tmp_path / "study.json").write_text("{")
    with pytest.raises(common.BenchmarkError, match=r"study.json is not valid JSON"):
        results.write_pages(str(tmp_path), str(tmp_path / "results.md"))


def test_a_run_records_the_commit_and_date_of_its_code():
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    environment = parallel.environment()
    written = datetime.datetime.fromisoformat(environment["time_utc"])
    assert before <= written <= before + datetime.timedelta(minutes=1)
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, check=True, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        assert environment["commit"] is None
    else:
        assert head[:12] in environment["commit"]  # the hash, after a tag if there is one
