r"""Per-step cost of the stop agreement (`mlres_jax.stopping.StopAgreement`).

Before every training step each process asks `StopAgreement.should_stop`
whether any process of the run received SIGINT or SIGTERM. With one process
that reads a flag; with several it is one exchange through the key-value
store of JAX's coordination service (a write, a read per peer, a delete).
This benchmark starts 1 and 2 processes (joined over localhost, as
``python -m mlres_jax.main --num_processes=2`` joins them) and times
``--exchanges`` calls back to back after ``--warmup`` untimed ones: the
time a training step pays for the agreement. Writes ``stop_agreement.json``
and ``stop_agreement.md`` into ``--output_dir`` and prints the table::

    python -m benchmarks.stop_agreement --output_dir=runs/bench/stop_agreement
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from absl import flags

from benchmarks import common
from mlres_jax import cli, parallel

FLAGS = flags.FLAGS


def define_flags() -> None:
    common.define_list(
        "processes", "1,2", "Numbers of processes to measure.", flags.IntegerParser(lower_bound=1)
    )
    flags.DEFINE_integer("exchanges", 1000, "Timed calls per process count.", lower_bound=1)
    flags.DEFINE_integer("warmup", 50, "Untimed calls first.", lower_bound=0)
    flags.DEFINE_string(
        "output_dir", "runs/bench/stop_agreement", "Folder for stop_agreement.json and .md."
    )
    # Internal: one measuring process.
    flags.DEFINE_string("worker", None, "PORT,PROCESSES,PROCESS_ID (internal).")


def measure(exchanges: int, warmup: int) -> list[float]:
    """Seconds of each timed `StopAgreement.should_stop` call in this process."""
    from mlres_jax import stopping  # pylint: disable=import-outside-toplevel

    agreement = stopping.StopAgreement(stopping.StopRequest())
    common.time_calls(lambda _: agreement.should_stop(), warmup)
    return common.time_calls(lambda _: agreement.should_stop(), exchanges)


def _worker(spec: str) -> None:
    port, processes, process_id = (int(part) for part in spec.split(","))
    if processes > 1:
        parallel.initialize(f"localhost:{port}", processes, process_id)
    seconds = measure(FLAGS.exchanges, FLAGS.warmup)
    if process_id == 0:
        print(json.dumps(seconds), flush=True)


def _run(processes: int) -> list[float]:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.stop_agreement",
                f"--worker={port},{processes},{i}",
                f"--exchanges={FLAGS.exchanges}",
                f"--warmup={FLAGS.warmup}",
            ],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]
    outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    if any(worker.returncode for worker in workers):
        raise RuntimeError(f"a worker failed: {[w.returncode for w in workers]}")
    return json.loads(outputs[0].strip().splitlines()[-1])


def report_markdown(report: dict) -> str:
    """``stop_agreement.md``: the table and how it was measured."""
    rows = [
        [
            r["processes"],
            *(f"{r['microseconds'][key]:.1f}" for key in ("median", "p25", "p75", "max")),
        ]
        for r in report["results"]
    ]
    table = common.markdown_table(["processes", "median µs per step", "25 %", "75 %", "max"], rows)
    warmup = report.get("warmup")
    return "\n".join(
        [
            "# Stop agreement: cost per training step",
            "",
            table,
            "",
            f"- {report['exchanges']} timed calls of StopAgreement.should_stop per process "
            f"count{f' after {warmup} untimed' if warmup is not None else ''}, back to back; "
            "processes joined over localhost.",
            f"- Machine: {parallel.describe_environment(report['machine'])}.",
            "",
        ]
    )


def main(argv) -> None:
    del argv
    if FLAGS.worker:
        _worker(FLAGS.worker)
        return
    machine, results = parallel.environment(), []
    for processes in FLAGS.processes:
        stats = common.percentiles([1e6 * s for s in _run(processes)])
        results.append({"processes": processes, "microseconds": stats})
    report = {
        "benchmark": "stop_agreement",
        "machine": machine,
        "exchanges": FLAGS.exchanges,
        "warmup": FLAGS.warmup,
        "results": results,
    }
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    common.write_outputs(FLAGS.output_dir, "stop_agreement", report, report_markdown(report))
    print(report_markdown(report), flush=True)


if __name__ == "__main__":
    cli.run_command(main, define_flags)
