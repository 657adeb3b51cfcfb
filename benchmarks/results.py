r"""The results page, written from the benchmarks' JSON: no number is typed by hand.

Reads those of these JSON files that exist in ``--results_dir`` (default
``docs/results``), each as the command that wrote it left it:

* ``main_job.json``: the ``summary.json`` of a run of ``make run``, copied;
* ``study.json`` (``benchmarks.study``), ``throughput.json``
  (``benchmarks.throughput``),
  ``step_cost.json`` (``benchmarks.step_cost``) and ``stop_agreement.json``
  (``benchmarks.stop_agreement``);

and writes ``--output`` (default ``docs/results.md``): per file, its tables as
the benchmark itself prints them, the date and commit of the measurement and
the machine it ran on (the JSON's ``machine``, or a run's ``environment``), and
the figures found beside it (`Source.figures`). The files not there yet are
listed as such. With ``--readme`` (default ``README.md``; empty to leave it
alone), the block between the README's `BEGIN` and `END` markers becomes the
headline table: the study's if ``study.json`` exists, else the main job's.
Usage, from the repository root::

    python -m benchmarks.results        # or: make docs
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable

from absl import flags

from benchmarks import common, step_cost, stop_agreement, study, throughput
from mlres_jax import cli, files, models, parallel, reporting

FLAGS = flags.FLAGS
COMMAND = "python -m benchmarks.results"
BEGIN = "<!-- results: begin (written by `make docs` from docs/results/; do not edit) -->"
END = "<!-- results: end -->"


def main_job_table(summary: dict) -> str:
    """Markdown: one row per cycle of a run's ``summary.json`` (blocks, h, errors, times)."""
    rows = [
        [
            c["cycle"],
            models.format_stage_sizes(c["stage_sizes"]),
            f"{c['step_size']:g}",
            f"{c['num_params']:,}",
            f"{c['epochs']:g}",
            c["steps"],
            f"{100 * c['test_error']:.2f} %",
            f"{c['train_seconds']:.1f}",
            f"{c['compile_seconds']:.1f}",
            f"{c['eval_seconds']:.1f}",
        ]
        for c in summary["cycles"]
    ]
    return common.markdown_table(
        [
            "cycle",
            "blocks",
            "h",
            "params",
            "epochs",
            "steps",
            "test error at its end",
            "train (s)",
            "of which compiling (s)",
            "eval (s)",
        ],
        rows,
    )


def environment_line(environment: dict, brief: bool = False) -> str:
    """The machine of a run or benchmark (`parallel.describe_environment`); "not recorded"."""
    return parallel.describe_environment(environment, brief) if environment else "not recorded"


def main_job_markdown(summary: dict) -> str:
    """The main job's section: its cycles, totals, growths and machine."""
    config, totals = summary["config"], summary["totals"]
    blocks = " → ".join(models.format_stage_sizes(c["stage_sizes"]) for c in summary["cycles"])
    lines = [
        f"# The main job: {summary['dataset']['name']}, width {config['width']}, {blocks}, "
        f"{config['num_epochs']:g} epochs, seed {config['seed']}",
        "",
        main_job_table(summary),
        "",
        f"- Final test error {100 * totals['final_test_error']:.2f} % on "
        f"{totals['test_examples']} test images after {totals['steps']} steps. Train "
        f"{totals['train_seconds']:.1f} s (of which waiting for the compiler "
        f"{totals['compile_seconds']:.1f} s), evaluation {totals['eval_seconds']:.1f} s, "
        f"checkpoints {totals['checkpoint_seconds']:.1f} s; wall time of the last "
        f"invocation {totals['wall_seconds']:.1f} s.",
        *(f"- {reporting.growth_description(g)}." for g in summary.get("growths", [])),
        f"- Machine: {environment_line(summary.get('environment', {}))}.",
        "",
    ]
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Source:
    """One JSON file of the results page.

    Attributes:
      file: its name in the results folder.
      command: the command that writes it.
      markdown: its section's text from its content (a title line ``# ...``,
        tables, notes).
      figures: the figures of it that the page shows when they are in the
        results folder.
    """

    file: str
    command: str
    markdown: Callable[[dict], str]
    figures: tuple[str, ...] = ()


SOURCES = (
    Source(
        "main_job.json",
        "`make run` (its `runs/fashion_mnist/summary.json`, copied here)",
        main_job_markdown,
        ("main_job_curves.png",),
    ),
    Source("study.json", "`python -m benchmarks.study`", study.report_markdown, ("study.png",)),
    Source("throughput.json", "`python -m benchmarks.throughput`", throughput.report_markdown),
    Source("step_cost.json", "`python -m benchmarks.step_cost`", step_cost.report_markdown),
    Source(
        "stop_agreement.json",
        "`python -m benchmarks.stop_agreement`",
        stop_agreement.report_markdown,
    ),
)


def read_reports(results_dir: str) -> dict[str, dict]:
    """File name -> content of every `SOURCES` file in ``results_dir``.

    Raises:
      common.BenchmarkError: for a file that is not valid JSON.
    """
    reports = {}
    for source in SOURCES:
        path = os.path.join(results_dir, source.file)
        if not os.path.exists(path):
            continue
        try:
            with open(path, encoding="utf-8") as handle:
                reports[source.file] = json.load(handle)
        except ValueError as error:
            raise common.BenchmarkError(
                f"{path} is not valid JSON ({error}); write it again with {source.command}"
            ) from None
    return reports


def provenance(report: dict) -> str:
    """``"measured 2026-12-01T22:23:12+00:00 at commit ee07604feb08"`` from a JSON's record.

    A study names the commits and dates of its runs (``commits``, ``dates``),
    which are what was measured; other files their ``machine`` or a run's
    ``environment``.
    """
    if report.get("commits"):
        return f"runs made at commit {', '.join(report['commits'])}, {report['dates']}"
    record = report.get("machine") or report.get("environment") or {}
    date = record.get("time_utc") or "at a date not recorded"
    commit = record.get("commit")
    return f"measured {date} " + (f"at commit {commit}" if commit else "(commit not recorded)")


def section(source: Source, report: dict, results_dir: str, page_dir: str) -> str:
    """One file's section of the page: title, where it comes from, its tables, its figures."""
    lines = source.markdown(report).strip().splitlines()
    title = lines[0].removeprefix("# ") if lines and lines[0].startswith("# ") else source.file
    body = ["#" + line if line.startswith("#") else line for line in lines[1:]]
    link = os.path.relpath(os.path.join(results_dir, source.file), page_dir)
    figures = [
        f"![{title}: {name}]({os.path.relpath(os.path.join(results_dir, name), page_dir)})"
        for name in source.figures
        if os.path.exists(os.path.join(results_dir, name))
    ]
    return (
        "\n".join(
            [
                f"## {title}",
                "",
                f"From [`{source.file}`]({link}), written by {source.command}; "
                f"{provenance(report)}.",
                *body,
                *(["", *figures] if figures else []),
            ]
        ).strip()
        + "\n"
    )


def results_page(results_dir: str, page_dir: str) -> str:
    """The whole page: a section per JSON file found, and the list of those not there yet.

    Args:
      results_dir: the folder of the JSON files (and figures).
      page_dir: the folder the page is written to, for its relative links.
    """
    reports = read_reports(results_dir)
    missing = [s for s in SOURCES if s.file not in reports]
    folder = os.path.relpath(results_dir, page_dir)
    lines = [
        "# Results",
        "",
        f"Written by `{COMMAND}` (`make docs`) from the JSON files in [{folder}/]({folder}/), "
        "as the benchmarks and the main job recorded them: do not edit this page by hand. "
        "Each section names the date and commit of its measurements and the machine they "
        "ran on. How to run each benchmark: [benchmarks.md](benchmarks.md).",
        "",
    ]
    if missing:
        lines += [
            f"Not measured yet (no JSON file in {folder}/):",
            "",
            *(f"- `{s.file}`, written by {s.command}" for s in missing),
            "",
        ]
    lines += [
        section(s, reports[s.file], results_dir, page_dir) for s in SOURCES if s.file in reports
    ]
    return "\n".join(lines).rstrip() + "\n"


# Under the README's study table: what its names and columns mean.
STUDY_TERMS = (
    "`first_cycle` and `last_cycle` are fixed-depth networks with the first and the last "
    "cycle's blocks at h = 1 (the paper's ResNet-14 and ResNet-50), trained for the same "
    "epochs; `multilevel/RULE` grows under that growth rule, `one_more_level/RULE` starts one "
    "level lower. On par, the cost model and the jumps: "
    "[docs/benchmarks.md](docs/benchmarks.md#the-study-table-3-and-the-growth-rules-over-seeds)."
)


def headline(results_dir: str, page: str) -> str:
    """The README's results table: the study's if there is one, else the main job's.

    Args:
      results_dir: the folder of the JSON files.
      page: the link to the results page, relative to the README.
    """
    reports = read_reports(results_dir)
    if "study.json" in reports:
        report = reports["study.json"]
        what = (
            f"The paper's Table 3 and the growth rules on {report['settings']['dataset']}, "
            f"{study.seeds_label(report['settings']['seeds'])} (`python -m benchmarks.study`"
            f"{'' if report['complete'] else ', not every run finished yet'})"
        )
        machine = environment_line(report["machine"], brief=True)
        table = study.results_table(report["stats"], report["models"])
        table += f"\n\n{study.answer_line(report)}\n\n{STUDY_TERMS}"
    elif "main_job.json" in reports:
        report = reports["main_job.json"]
        what = "The main job (`make run`), test error at the end of each cycle"
        machine = environment_line(report.get("environment", {}), brief=True)
        table = main_job_table(report)
    else:
        return (
            "No headline result yet: neither `study.json` nor `main_job.json` has been "
            f"written into the results folder. What has: [{page}]({page}).\n"
        )
    return f"{what}; {provenance(report)} on {machine}. All results: [{page}]({page}).\n\n{table}\n"


def replace_block(text: str, block: str, path: str = "README.md") -> str:
    """``text`` with what lies between `BEGIN` and `END` replaced by ``block``.

    Raises:
      common.BenchmarkError: if ``text`` lacks either marker, or has them out of order.
    """
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise common.BenchmarkError(
            f"{path} has no results block: it needs the line {BEGIN!r} and, after it, the "
            f"line {END!r}; or pass --readme= to leave it alone"
        )
    return text[: start + len(BEGIN)] + "\n" + block + text[end:]


def write_pages(results_dir: str, output: str, readme: str = "") -> str:
    """Writes the results page (and the README's block, if ``readme``); returns the page.

    Raises:
      common.BenchmarkError: a results folder that does not exist, a file in
        it that is not JSON, a README without the markers; before writing
        anything.
    """
    if not os.path.isdir(results_dir):
        raise common.BenchmarkError(f"--results_dir={results_dir!r} is not a folder")
    page = results_page(results_dir, os.path.dirname(os.path.abspath(output)))
    readme_text = None
    if readme:
        with open(readme, encoding="utf-8") as handle:
            readme_text = replace_block(
                handle.read(),
                headline(
                    results_dir, os.path.relpath(output, os.path.dirname(os.path.abspath(readme)))
                ),
                readme,
            )
    files.write_text(output, page)
    if readme_text is not None:
        files.write_text(readme, readme_text)
    return page


def define_flags() -> None:
    """Defines the command-line flags (called only when run as a program)."""
    flags.DEFINE_string("results_dir", "docs/results", "Folder of the JSON files (and figures).")
    flags.DEFINE_string("output", "docs/results.md", "The results page to write.")
    flags.DEFINE_string(
        "readme",
        "README.md",
        "README whose results block gets the headline table; empty to leave it alone.",
    )


def main(argv):
    del argv  # run_command refuses arguments
    write_pages(FLAGS.results_dir, FLAGS.output, FLAGS.readme)
    print(
        f"Wrote {FLAGS.output}"
        + (f" and the results block of {FLAGS.readme}" if FLAGS.readme else ""),
        flush=True,
    )


if __name__ == "__main__":
    cli.run_command(main, define_flags)
