"""Tests of the benchmark scripts: their arithmetic, tables and a tiny study.

Timings are measured, never asserted: only that they are there and that the
savings are computed from them as documented.
"""

import glob
import json
import math
import os
import shutil
import subprocess
import sys

import ml_collections
import pytest
import tensorflow_datasets as tfds
from absl import flags

from benchmarks import common, results, runs, step_cost, study, throughput
from benchmarks.presets import cpu as cpu_preset
from configs import default, fashion_mnist, resnet50, resnet50i, resnet122i, wrn122i
from mlres_jax import configuration, files, parallel, plan, steps, train
from tests import fake_data

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NUM_EXAMPLES = 40  # mock examples per split


# ---------------------------------------------------------------------------
# common: statistics, formatting, tables, flags.


def test_mean_std_uses_sample_std_and_none_for_one_value():
    stats = common.mean_std([1.0, 2.0, 3.0])
    assert stats == {"mean": 2.0, "std": 1.0, "n": 3}  # sqrt((1 + 0 + 1) / 2)
    assert common.mean_std([0.25]) == {"mean": 0.25, "std": None, "n": 1}
    with pytest.raises(ValueError):
        common.mean_std([])


def test_format_mean_std():
    assert (
        common.format_mean_std({"mean": 0.1234, "std": 0.0056, "n": 3}, scale=100) == "12.34 ± 0.56"
    )
    assert (
        common.format_mean_std({"mean": 41.25, "std": None, "n": 1}, digits=1, suffix=" %")
        == "41.2 %"
    )
    assert common.format_mean_std(None) == "—"


def test_time_saved_against_hand_computed_example():
    # The paper's 60/50/50 split costs (60/4 + 50/2 + 50) / 160 = 0.5625 of
    # the last-cycle model: 675 s against 1200 s is 43.75 % saved.
    assert common.time_saved(675.0, 1200.0) == pytest.approx(0.4375)
    assert common.time_saved(67.0, 114.0) == pytest.approx(47 / 114)  # Table 3
    assert common.time_saved(150.0, 100.0) == pytest.approx(-0.5)  # slower
    with pytest.raises(ValueError, match="reference"):
        common.time_saved(1.0, 0.0)


def test_percentiles_of_five_values():
    stats = common.percentiles([5.0, 1.0, 4.0, 2.0, 3.0])
    assert stats == {"median": 3.0, "p25": 2.0, "p75": 4.0, "min": 1.0, "max": 5.0, "n": 5}
    assert common.percentiles([2.0, 4.0])["median"] == 3.0


def test_markdown_table_and_row_length_check():
    text = common.markdown_table(["model", "error"], [["a", "1.5"], ["b", 2]])
    assert text.splitlines() == ["| model | error |", "| --- | ---: |", "| a | 1.5 |", "| b | 2 |"]
    with pytest.raises(ValueError, match="2 cells"):
        common.markdown_table(["model"], [["a", "b"]])


def _parse(module, *args):
    """The flags of a benchmark command after parsing ``args`` (absl, as on the command line)."""
    flag_values = flags.FlagValues()
    module.define_flags(flag_values)
    flag_values(["benchmark", *args])
    return flag_values


@pytest.mark.parametrize("text", ["", "a,b", "0,-1", "1,1"])
def test_a_bad_seed_list_names_the_flag(text):
    with pytest.raises(
        flags.IllegalFlagValueError, match=r"--seeds=.*each a non-negative integer, none twice"
    ):
        _parse(study, f"--seeds={text}")


@pytest.mark.parametrize("text", ["", " , ", "unrolled,unrolled", "unrolled,rolled"])
def test_a_bad_name_list_names_the_flag_and_the_allowed_names(text):
    with pytest.raises(flags.IllegalFlagValueError, match=r"--layouts=.*\['unrolled', 'scanned'\]"):
        _parse(throughput, f"--layouts={text}")


def test_list_flags():
    assert _parse(study, "--seeds=0, 1,2").seeds == [0, 1, 2]
    assert _parse(study).seeds == [0, 1, 2]
    assert _parse(study).models == list(study.DEFAULT_MODELS)
    parsed = _parse(study, "--models=first_cycle, multilevel/linear/reset")
    assert parsed.models == ["first_cycle", "multilevel/linear/reset"]
    assert _parse(throughput, "--cycle_epochs=60,50,50").cycle_epochs == [60, 50, 50]
    with pytest.raises(flags.IllegalFlagValueError, match="--cycle_epochs=1,-1"):
        _parse(throughput, "--cycle_epochs=1,-1")
    with pytest.raises(flags.IllegalFlagValueError, match="--models=multilevel/x"):
        _parse(study, "--models=multilevel/x")
    with pytest.raises(flags.IllegalFlagValueError, match="--parallel_runs=0"):
        _parse(study, "--parallel_runs=0")


def test_atomic_writes_leave_no_temporary_files(tmp_path):
    files.write_json(str(tmp_path / "a.json"), {"x": 1})
    files.write_text(str(tmp_path / "a.md"), "hello\n")
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert (tmp_path / "a.md").read_text() == "hello\n"
    assert sorted(os.listdir(tmp_path)) == ["a.json", "a.md"]


def test_the_machine_record_names_platform_cpus_and_load():
    info = parallel.environment()
    assert info["platform"] in ("cpu", "gpu", "tpu", "cuda", "rocm")
    assert 1 <= info["cpus_available"] <= info["cpu_count"] and info["devices"] >= 1
    line = parallel.describe_environment(info)
    assert f"{info['cpus_available']} of {info['cpu_count']} CPUs" in line
    assert line.endswith(f"; {info['time_utc']}")
    brief = parallel.describe_environment(info, brief=True)
    assert line.startswith(brief) and brief.endswith(" CPUs")  # no load, versions, date


# ---------------------------------------------------------------------------
# study: models, cost model, statistics, answer, table.


def test_model_overrides_derive_the_paper_baselines(tmp_path):
    config = resnet50i.get_config()
    names = ["first_cycle", "last_cycle", "multilevel/paper"]
    planned = runs.plan_runs(config, study.model_overrides(config, names), [3], str(tmp_path))
    assert [run.name for run in planned] == names
    assert planned[0].workdir == os.path.join(str(tmp_path), "runs", "first_cycle", "seed3")
    first, last, multi = (run.config for run in planned)
    assert (first.stage_sizes, first.step_size, first.multilevel) == ((2, 2, 2), 1.0, False)
    assert (last.stage_sizes, last.step_size, last.multilevel) == ((8, 8, 8), 1.0, False)
    assert (multi.stage_sizes, multi.step_size, multi.multilevel) == ((2, 2, 2), 1.0, True)
    assert (multi.interpolation_rule, multi.momentum_at_interpolation) == ("paper", "interpolate")
    for run in planned:  # same data, steps and restarts
        assert (run.config.seed, run.config.num_epochs, run.config.cycle_boundaries) == (
            3,
            160,
            (60.0, 110.0),
        )
    # The derived last-cycle model is the paper's ResNet-50 config.
    reference = resnet50.get_config()
    assert (last.width, last.stage_sizes) == (reference.width, tuple(reference.stage_sizes))


def test_one_more_level_splits_the_first_cycle_on_half_the_blocks():
    # CPU preset: 2-2-2 h=1, boundaries 2.25 and 4.125 of 6 epochs; one more
    # level: 1-1-1 with h=2 for the first 1.125 epochs, then the preset's cycles.
    config = cpu_preset.get_config()
    overrides = study.model_overrides(
        config, ["one_more_level/identity/reset", "multilevel/linear"]
    )
    assert overrides["one_more_level/identity/reset"] == {
        "interpolation_rule": "identity",
        "momentum_at_interpolation": "reset",
        "stage_sizes": (1, 1, 1),
        "step_size": 2.0,
        "cycle_boundaries": (1.125, 2.25, 4.125),
    }
    assert overrides["multilevel/linear"] == {
        "interpolation_rule": "linear",
        "momentum_at_interpolation": "interpolate",  # the config's
    }
    # The same last network as the multi-level run: 8-8-8 with h = 2 / 2^3.
    sizes = plan.cycle_networks((1, 1, 1), 2.0, 4)
    assert sizes[-1] == ((8, 8, 8), 0.25)
    with pytest.raises(common.BenchmarkError, match=r"stage_sizes = \(5, 5, 5\).*even"):
        study.model_overrides(resnet122i.get_config(), ["one_more_level/identity"])
    # A rule that cannot grow a one-block stage is refused before training.
    with pytest.raises(configuration.ConfigError, match=r"'paper' growth rule.*one block"):
        runs.plan_runs(
            config, study.model_overrides(config, ["one_more_level/paper"]), [0], "unused"
        )


def test_model_overrides_refuse_a_fixed_depth_config_and_unknown_models():
    with pytest.raises(common.BenchmarkError, match="config.multilevel = False"):
        study.model_overrides(resnet50.get_config(), ["first_cycle"])
    config = fashion_mnist.get_config()
    config.cycle_boundaries = ()
    with pytest.raises(common.BenchmarkError, match="cycle_boundaries = \\(\\)"):
        study.model_overrides(config, ["first_cycle"])
    with pytest.raises(common.BenchmarkError, match="model 'multilevel/nearest' is not allowed"):
        study.model_overrides(fashion_mnist.get_config(), ["multilevel/nearest"])


def _cycles(stage_sizes, steps, train_seconds=None, compile_seconds=None):
    train_seconds = train_seconds or [0.0] * len(steps)
    compile_seconds = compile_seconds or [0.0] * len(steps)
    return [
        {"stage_sizes": list(n), "steps": k, "train_seconds": t, "compile_seconds": c}
        for n, k, t, c in zip(stage_sizes, steps, train_seconds, compile_seconds)
    ]


def test_cost_ratio_of_the_papers_split_and_one_more_level():
    # Paper Sec. 4.2: (60/4 + 50/2 + 50) / 160 = 0.5625 against ResNet-50.
    last = {"cycles": _cycles([(8, 8, 8)] * 3, [60, 50, 50])}
    paper = {"cycles": _cycles([(2, 2, 2), (4, 4, 4), (8, 8, 8)], [60, 50, 50])}
    assert study.cost_ratio(paper, last) == pytest.approx(0.5625)
    # The CPU preset in steps (1350 / 1125 / 1125) keeps the paper's proportions.
    cpu = {"cycles": _cycles([(2, 2, 2), (4, 4, 4), (8, 8, 8)], [1350, 1125, 1125])}
    last = {"cycles": _cycles([(8, 8, 8)] * 3, [1350, 1125, 1125])}
    assert study.cost_ratio(cpu, last) == pytest.approx(0.5625)
    # One more level: (1.125/8 + 1.125/4 + 1.875/2 + 1.875) / 6 = 0.5390625.
    more = {"cycles": _cycles([(1, 1, 1), (2, 2, 2), (4, 4, 4), (8, 8, 8)], [675, 675, 1125, 1125])}
    assert study.cost_ratio(more, last) == pytest.approx(0.5390625)
    first = {"cycles": _cycles([(2, 2, 2)] * 3, [1350, 1125, 1125])}
    assert study.cost_ratio(first, last) == pytest.approx(0.25)


def test_paper_reference_only_for_the_papers_setting():
    reference = study.paper_reference(resnet50i.get_config())
    assert reference["multilevel/paper"]["name"] == "ResNet-50-i"
    assert reference["time_saved"] == pytest.approx(1 - 67 / 114)
    config = resnet50i.get_config()
    config.dataset = "cifar100"
    assert study.paper_reference(config)["multilevel/paper"]["test_error_percent"] == 28.71
    assert study.paper_reference(fashion_mnist.get_config()) is None
    # Table 4's last row, WResNet-122(-i) on STL-10: 22.00 % in 516 min, 22.65 % in 307 min.
    config = wrn122i.get_config()
    config.dataset = "stl10"
    reference = study.paper_reference(config)
    assert reference["last_cycle"] == {
        "name": "WResNet-122",
        "test_error_percent": 22.0,
        "minutes": 516,
    }
    assert reference["multilevel/paper"] == {
        "name": "WResNet-122-i",
        "test_error_percent": 22.65,
        "minutes": 307,
    }


def _record(seed, error, train_seconds, wall_seconds, sizes=((8,),) * 3, jumps=()):
    return {
        "seed": seed,
        "workdir": "x",
        "status": "trained",
        "test_error": error,
        "train_seconds": train_seconds,
        "wall_seconds": wall_seconds,
        "compile_seconds": 1.0,
        "eval_seconds": 2.0,
        "steps": 10,
        "cycles": [{"stage_sizes": list(n), "step_size": 1.0, "steps": 10} for n in sizes],
        "growths": [{"jump": {"test_error": j}} for j in jumps],
    }


def _records():
    growing = ((2,), (4,), (8,))
    return {
        "first_cycle": [
            _record(0, 0.20, 250, 300, ((2,),) * 3),
            _record(1, 0.22, 250, 300, ((2,),) * 3),
        ],
        "last_cycle": [_record(0, 0.10, 1000, 1100), _record(1, 0.12, 1200, 1300)],
        "multilevel/paper": [
            _record(0, 0.11, 600, 700, growing, (0.05, 0.01)),
            _record(1, 0.13, 600, 700, growing, (0.03, 0.03)),
        ],
        "multilevel/identity": [
            _record(0, 0.10, 550, 650, growing, (0.0, 0.0)),
            _record(1, 0.12, 570, 670, growing, (0.0, 0.0)),
        ],
    }


def test_aggregate_pairs_savings_by_seed_and_averages_the_jumps():
    records = _records()
    stats = study.aggregate(records)
    saved = stats["multilevel/paper"]["time_saved_train"]
    assert saved["per_seed"] == pytest.approx([0.4, 0.5])  # 1-600/1000, 1-600/1200
    assert saved["mean"] == pytest.approx(0.45)
    assert saved["std"] == pytest.approx(math.sqrt(2 * 0.05**2))
    assert stats["last_cycle"]["time_saved_train"]["per_seed"] == [0.0, 0.0]
    assert stats["last_cycle"]["test_error"]["mean"] == pytest.approx(0.11)
    # Cost model: 10 steps each of 2, 4 and 8 blocks against 30 steps of 8.
    assert stats["multilevel/paper"]["cost_model_saving"] == pytest.approx(1 - 14 / 24)
    jumps = stats["multilevel/paper"]["growth_jumps"]
    assert [j["mean"] for j in jumps] == pytest.approx([0.04, 0.02])
    assert jumps[0]["std"] == pytest.approx(math.sqrt(2 * 0.01**2))
    assert stats["first_cycle"]["growth_jumps"] == []
    # Paired by seed, not by position: runs side by side finish in any order.
    swapped = study.aggregate({**records, "multilevel/paper": records["multilevel/paper"][::-1]})
    assert swapped["multilevel/paper"]["time_saved_train"]["per_seed"] == pytest.approx([0.5, 0.4])
    partial = study.aggregate(
        {
            "multilevel/paper": records["multilevel/paper"][1:],
            "last_cycle": records["last_cycle"][:1],
        }
    )
    assert "time_saved_train" not in partial["multilevel/paper"]  # no last-cycle seed 1


def test_on_par_and_the_answer():
    stats = study.aggregate(_records())
    # Last-cycle: 11 % ± 1.414 points; on par up to 12.414 %.
    assert study.on_par(stats, "multilevel/identity") is True  # 11 %
    assert study.on_par(stats, "multilevel/paper") is True  # 12 %
    assert study.on_par(stats, "first_cycle") is False  # 21 %
    best = study.answer(stats)
    # identity and paper train the same networks (cost model 1 - 14/24 each):
    # identity has the lower error. It saves 1 - 550/1000 and 1 - 570/1200:
    # mean 0.4875; paper 0.45.
    assert best["model"] == "multilevel/identity" and best["on_par"] is True
    assert best["same_schedule"] == ["multilevel/paper"]
    assert best["time_saved"] == pytest.approx(0.4875)
    assert best["against_paper"]["time_saved"] == pytest.approx(0.0375)
    assert best["against_paper"]["cost_model_saving"] == pytest.approx(0.0)
    assert best["against_paper"]["same_schedule"] is True
    assert best["against_paper"]["test_error"] == pytest.approx(-0.01)
    assert best["against_paper"]["paper_on_par"] is True
    line = study.answer_line({"answer": best})
    # Per seed 0.45 and 0.525: std 0.075 / sqrt(2) = 0.053.
    assert "48.8 ± 5.3 % of the last-cycle model's train time measured (41.7 % by the cost" in line
    assert "multilevel/paper train the same networks" in line
    # The same schedule as the paper's rule: the time apart is noise, the error is the news.
    assert "trains the same networks for the same steps: against it -1.00 points of" in line
    # A schedule that costs less by the cost model wins over a lower measured
    # time: 1, 4 and 8 blocks cost 13/24 (saving 11/24 against 10/24),
    # although 700 s saves only 0.3 and 1 - 700/1200 (mean 0.358).
    cheaper = [_record(seed, 0.115, 700, 800, ((1,), (4,), (8,))) for seed in (0, 1)]
    best = study.answer(study.aggregate({**_records(), "one_more_level/identity": cheaper}))
    assert best["model"] == "one_more_level/identity" and best["same_schedule"] == []
    assert best["cost_model_saving"] == pytest.approx(11 / 24)
    assert best["against_paper"]["cost_model_saving"] == pytest.approx(11 / 24 - 10 / 24)
    assert best["against_paper"]["same_schedule"] is False
    assert best["time_saved"] == pytest.approx((0.3 + 1 - 700 / 1200) / 2)
    line = study.answer_line({"answer": best})
    assert "(multilevel/paper, on par) that is -9.2 points of measured time saved, +4.2 by" in line
    # Another schedule of the paper rule's cost (3, 3, 8 blocks: 14/24, as 2, 4, 8) is
    # not the paper rule's schedule: its measured time is not the paper rule's plus noise.
    same_cost = [_record(seed, 0.10, 640, 700, ((3,), (3,), (8,))) for seed in (0, 1)]
    best = study.answer(study.aggregate({**_records(), "other/schedule": same_cost}))
    assert best["model"] == "other/schedule"  # the lowest error among the 10/24 savings
    assert best["cost_model_saving"] == pytest.approx(10 / 24)
    assert best["same_schedule"] == [] and best["against_paper"]["same_schedule"] is False
    # None on par: the answer is the closest model, the one of the lowest error
    # (paper 13 % and 15 %: mean 14 %, over the 12.414 % allowed).
    records = _records()
    for name, errors in (("multilevel/paper", (0.13, 0.15)), ("multilevel/identity", (0.14, 0.16))):
        for record, error in zip(records[name], errors):
            record["test_error"] = error
    best = study.answer(study.aggregate(records))
    assert best["on_par"] is False and best["model"] == "multilevel/paper"
    assert best["threshold"] == pytest.approx(0.11 + math.sqrt(2 * 0.01**2))
    line = study.answer_line({"answer": best})
    assert "no model is on par with the last-cycle model (on par: a mean test error of at " in line
    assert (
        "the closest, multilevel/paper, ends at 14.00 % (+3.00 points over the last-cycle " in line
    )
    assert "model's 11.00 %) and saves 45.0" in line
    # One seed: no spread to compare with, no answer.
    one_seed = study.aggregate({k: v[:1] for k, v in _records().items()})
    assert study.on_par(one_seed, "multilevel/paper") is None and study.answer(one_seed) is None


def test_same_network_spread_groups_runs_of_the_same_networks_by_seed():
    records = _records()
    # multilevel/paper and multilevel/identity train 2, 4, 8 blocks for 10
    # steps each: seed 0 took 600 and 550 s, seed 1 600 and 570 s.
    assert study.same_network_spread(records) == [
        (0, ["multilevel/paper", "multilevel/identity"], 550, 600),
        (1, ["multilevel/paper", "multilevel/identity"], 570, 600),
    ]


def test_results_table_shows_means_savings_and_jumps():
    records = _records()
    stats = study.aggregate(records)
    descriptions = {name: study.model_description(rs[0]) for name, rs in records.items()}
    table = study.results_table(stats, descriptions)
    paper_row = next(line for line in table.splitlines() if "multilevel/paper" in line)
    assert "2 → 4 → 8" in paper_row and "| 1 |" in paper_row
    assert "12.00 ± 1.41" in paper_row  # test error %, mean ± std
    assert "600.0 ± 0.0" in paper_row  # train seconds
    assert "45.0 ± 7.1 %" in paper_row  # train time saved
    assert "41.7 %" in paper_row  # cost model: 1 - 14/24
    assert "4.00 ± 1.41, 2.00 ± 1.41" in paper_row  # jumps in points
    assert "| yes |" in paper_row
    first_row = next(line for line in table.splitlines() if "first_cycle" in line)
    assert "| no |" in first_row
    last_row = next(line for line in table.splitlines() if "last_cycle" in line)
    assert "1100.0 ± 141.4" in last_row and "| 8 |" in last_row


def test_time_gap_splits_the_shortfall_into_cycles_and_compiling():
    # Hand derivation. Last-cycle model: 4-4 blocks, 200 steps, 210 s of which
    # 10 s compiling, so 1.0 s per step. Multi-level: 1-1, 2-2, 4-4 blocks for
    # 100, 50, 50 steps: fractions 1/4, 1/2, 1, cost ratio (25 + 25 + 50) / 200
    # = 0.5. Cost model: 25, 25, 50 s of steps and 0.5 x 10 = 5 s compiling.
    # Measured: 32 - 4, 30 - 3, 55 - 2 = 28, 27, 53 s and 9 s compiling, so
    # excesses +3, +2, +3, +4 = 12 s = 5.714 points of 210 s; measured saving
    # 1 - 117 / 210 = 44.29 % against 50 %: 5.714 points short, the same sum.
    last = {
        "seed": 0,
        "train_seconds": 210.0,
        "cycles": _cycles([(4, 4)] * 3, [100, 50, 50], [110.0, 50.0, 50.0], [10.0, 0.0, 0.0]),
    }
    multi = {
        "seed": 0,
        "train_seconds": 117.0,
        "cycles": _cycles(
            [(1, 1), (2, 2), (4, 4)], [100, 50, 50], [32.0, 30.0, 55.0], [4.0, 3.0, 2.0]
        ),
    }
    gap = study.time_gap(multi, last)
    excess = {name: part["excess_seconds"] for name, part in gap["parts"].items()}
    assert excess == pytest.approx(
        {"cycle 1 (1-1)": 3.0, "cycle 2 (2-2)": 2.0, "cycle 3 (4-4)": 3.0, "compiling": 4.0}
    )
    assert gap["parts"]["compiling"]["model_seconds"] == pytest.approx(5.0)
    assert gap["theoretical_saving"] == pytest.approx(0.5)
    assert gap["measured_saving"] == pytest.approx(1 - 117 / 210)
    assert gap["shortfall_points"] == pytest.approx(100 * 12 / 210)
    assert sum(p["points"] for p in gap["parts"].values()) == pytest.approx(100 * 12 / 210)
    over_seeds = study.time_gap_over_seeds(
        {
            "multilevel/paper": [multi, {**multi, "seed": 1, "cycles": multi["cycles"][:2]}],
            "last_cycle": [last],
        }
    )
    assert over_seeds["seeds"] == [0]  # paired by seed: seed 1 has no last-cycle run
    table = study.time_gap_table(over_seeds)
    assert "| compiling | 9.0 | 5.0 | +4.0 | +1.90 |" in table
    assert "+5.71 |" in table.splitlines()[-1]
    with pytest.raises(ValueError, match="step counts"):
        study.time_gap({**multi, "cycles": multi["cycles"][:2]}, last)


def test_a_finished_run_from_before_a_config_field_existed_is_reused_only_at_its_old_value():
    config = fashion_mnist.get_config()
    config.compile_ahead = False
    # summary.json of a run finished before compile_ahead and scan_blocks
    # existed: it compiled each depth when its cycle started, unrolled.
    old_config = {
        k: v for k, v in config.to_dict().items() if k not in ("compile_ahead", "scan_blocks")
    }
    summary = {"config": old_config}
    assert runs.config_differences(summary, config) == []
    config.progress_bar = not config.progress_bar  # display only: the run is still reused
    assert runs.config_differences(summary, config) == []
    config.scan_blocks, config.compile_ahead = True, True
    assert runs.config_differences(summary, config) == [
        "compile_ahead: was False, now True",
        "scan_blocks: was False, now True",
    ]


def test_error_curves_give_mean_and_spread_per_epoch():
    histories = [
        [{"epoch": 1.0, "test_error": 0.4}, {"epoch": 2.0, "test_error": 0.2}],
        [{"epoch": 1.0, "test_error": 0.6}],
    ]
    curves = study.error_curves(histories)
    assert curves["epoch"] == [1.0]  # epoch 2 is missing from seed 1
    assert curves["mean"] == pytest.approx([0.5])
    assert curves["std"] == pytest.approx([math.sqrt(0.02)])  # sample std of 0.4, 0.6
    assert study.error_curves(histories[:1])["std"] == [0.0, 0.0]


# ---------------------------------------------------------------------------
# throughput: flags and arithmetic.


def test_throughput_flags():
    parsed = _parse(throughput, "--families=resnet,wresnet,8")
    assert parsed.families == [16, 32, 8]
    assert [throughput.family_name(w) for w in parsed.families] == [
        "ResNet",
        "WResNet",
        "ResNet w8",
    ]
    for args, words in [
        (["--families=resnet,vgg"], "--families=resnet,vgg"),
        (["--families=resnet,16"], "none twice"),
        (["--image_shape=32,32"], "three integers H,W,C"),
        (["--dataset=imagenet"], "--dataset=imagenet"),
        (["--levels=3", "--stage_sizes=1,2,2"], ">= 2 blocks"),
        (["--levels=3", "--cycle_epochs=1,2"], "one number of epochs per level"),
        (["--batch_size=3", "--device_counts=1,2"], "split evenly"),
    ]:
        with pytest.raises(flags.IllegalFlagValueError, match=words):
            _parse(throughput, *args)
    assert _parse(throughput, "--image_shape=16,16,3").image_shape == [16, 16, 3]


def test_throughput_levels_come_from_the_plan():
    # Fashion-MNIST at batch 100: 600 steps per epoch.
    cycles = throughput.plan_levels((2, 2, 2), [2.25, 1.875, 1.875], 600)
    assert [(c.stage_sizes, c.step_size) for c in cycles] == [
        ((2, 2, 2), 1.0),
        ((4, 4, 4), 0.5),
        ((8, 8, 8), 0.25),
    ]
    assert [c.num_steps for c in cycles] == [1350, 1125, 1125]
    assert [c.num_steps for c in throughput.plan_levels((5,), [60, 50, 50], 500)] == [
        30_000,
        25_000,
        25_000,
    ]
    with pytest.raises(common.BenchmarkError, match="--cycle_epochs=1,0"):
        throughput.plan_levels((2,), [1, 0], 600)


def test_throughput_arithmetic():
    assert throughput.compile_share(10.0, 90, 1.0) == pytest.approx(0.1)
    ips = throughput.images_per_second(
        100, {"median": 0.5, "p25": 0.4, "p75": 1.0, "min": 0.25, "max": 2.0}
    )
    assert ips == {"median": 200.0, "p25": 100.0, "p75": 250.0, "min": 50.0, "max": 400.0}
    rows = [
        {
            "train_step_seconds": {"median": t},
            "compile_train_seconds": 1.0,
            "compile_eval_seconds": 0.0,
        }
        for t in (0.25, 0.5, 1.0)
    ]
    summary = throughput.family_summary(rows, [60, 50, 50])
    assert summary["step_time_ratio_to_deepest"] == [0.25, 0.5, 1.0]
    # Step times exactly proportional to depth: the paper's 43.75 %.
    assert summary["predicted_time_saved_steps_only"] == pytest.approx(0.4375)
    assert summary["theoretical_time_saved"] == pytest.approx(0.4375)
    # With compilation: 1 - (90 + 3) / (160 + 1).
    assert summary["predicted_time_saved_with_compile"] == pytest.approx(1 - 93 / 161)


def test_throughput_runs_smallest_configuration_first():
    levels = plan.cycle_networks((2, 2, 2), 1.0, 3)
    order = throughput.run_order([("ResNet", 16), ("WResNet", 32)], levels)
    assert order[0] == ("ResNet", 16, 0) and order[-1] == ("WResNet", 32, 2)


# ---------------------------------------------------------------------------
# study end to end on tensorflow-datasets mock data.

TINY_MODELS = ["first_cycle", "last_cycle", "multilevel/paper", "multilevel/identity"]


def _tiny_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.dataset = "cifar10"
    config.width = 2
    # One stage keeps the compilations of the models short: this checks the
    # benchmark's plumbing, the models have their own tests.
    config.stage_sizes = (2,)
    config.multilevel = True
    config.batch_size = 8  # 5 steps per epoch
    config.num_epochs = 2.0
    config.cycle_boundaries = (1.0,)  # 2 -> 4 blocks
    config.eval_batch_size = 16
    config.growth_train_examples = 16
    config.log_every_steps = 5
    config.progress_bar = False
    return config


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    output_dir = str(tmp_path_factory.mktemp("study"))
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
        report = study.run_study(_tiny_config(), TINY_MODELS, [0], output_dir)
    return output_dir, report


def _must_not_train(monkeypatch):
    monkeypatch.setattr(
        train, "train_and_evaluate", lambda *a, **k: pytest.fail("training started")
    )


def test_study_json_has_every_model_savings_and_jumps(tiny_study):
    output_dir, report = tiny_study
    with open(os.path.join(output_dir, "study.json")) as handle:
        on_disk = json.load(handle)
    assert on_disk["complete"] is True
    assert list(on_disk["stats"]) == list(on_disk["runs"]) == TINY_MODELS
    models = on_disk["models"]
    assert models["first_cycle"]["stage_sizes"] == [[2], [2]]
    assert models["last_cycle"]["stage_sizes"] == [[4], [4]]
    assert models["last_cycle"]["step_sizes"] == [1.0, 1.0]
    assert models["multilevel/paper"]["stage_sizes"] == [[2], [4]]
    assert models["multilevel/paper"]["step_sizes"] == [1.0, 0.5]
    stats = on_disk["stats"]
    assert stats["multilevel/paper"]["cost_model_saving"] == pytest.approx(0.25)  # 1-(1/2+1)/2
    for model in ("first_cycle", "multilevel/paper"):
        saved = stats[model]["time_saved_train"]
        run = on_disk["runs"][model][0]
        last = on_disk["runs"]["last_cycle"][0]
        assert saved["per_seed"] == pytest.approx(
            [1 - run["train_seconds"] / last["train_seconds"]]
        )
        assert "time_saved_wall" in stats[model]
    # The identity rule keeps the function at the growth; the paper's does not.
    jumps = {m: on_disk["runs"][m][0]["growths"][0]["jump"]["test_loss"] for m in TINY_MODELS[2:]}
    assert abs(jumps["multilevel/identity"]) < 1e-4 < abs(jumps["multilevel/paper"])
    assert len(stats["multilevel/paper"]["growth_jumps"]) == 1
    assert on_disk["answer"] is None  # one seed: no spread to call anything on par
    # Every run was made here, by this code: its commit, once.
    commit = parallel.source_commit()
    assert on_disk["commits"] == ([commit] if commit else [])
    assert {r["commit"] for rs in on_disk["runs"].values() for r in rs} == {commit}
    assert on_disk["machine"]["devices"] and on_disk["machine"]["cpu_count"] >= 1
    assert report["stats"] == on_disk["stats"]


def test_study_writes_table_plot_and_each_run(tiny_study):
    output_dir, report = tiny_study
    with open(os.path.join(output_dir, "study.md")) as handle:
        text = handle.read()
    error = 100 * report["stats"]["multilevel/paper"]["test_error"]["mean"]
    assert f"{error:.2f}" in text and "25.0 %" in text  # the cost model's saving
    assert "**Answer.** Nothing is known to be on par" in text  # one seed: no spread
    assert "## Where the time of multilevel/paper goes" in text
    with open(os.path.join(output_dir, "study.png"), "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    for model in TINY_MODELS:
        workdir = runs.run_dir(output_dir, model, 0)
        with open(os.path.join(workdir, "summary.json")) as handle:
            summary = json.load(handle)
        assert summary["totals"]["steps"] == 10  # same steps for every model
        assert summary["totals"]["test_examples"] == NUM_EXAMPLES
    assert not glob.glob(os.path.join(output_dir, "*.tmp"))


def test_results_page_and_readme_headline_from_a_real_study_json(tiny_study, tmp_path):
    output_dir, report = tiny_study
    results_dir = tmp_path / "docs" / "results"
    results_dir.mkdir(parents=True)
    for name in ("study.json", "study.png"):
        shutil.copy(os.path.join(output_dir, name), results_dir / name)
    readme = tmp_path / "README.md"
    readme.write_text(f"{results.BEGIN}\n{results.END}\n")
    page = results.write_pages(str(results_dir), str(tmp_path / "docs" / "results.md"), str(readme))
    with open(os.path.join(output_dir, "study.md")) as handle:
        table = study.results_table(report["stats"], report["models"])
        assert table in handle.read()  # the benchmark's own table, as it printed it
    assert table in page and table in readme.read_text()
    # The README names the runs' commit and the machine in brief, and says what the names mean.
    brief = parallel.describe_environment(report["machine"], brief=True)
    assert f" on {brief}. All results: " in readme.read_text()
    assert results.STUDY_TERMS in readme.read_text()
    assert f"Machine: {parallel.describe_environment(report['machine'])}." in page
    assert f"at commit {report['machine']['commit']}" in page
    assert "](results/study.png)" in page


def test_study_resume_reuses_finished_runs(tiny_study, monkeypatch):
    output_dir, report = tiny_study
    _must_not_train(monkeypatch)
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
        again = study.run_study(_tiny_config(), TINY_MODELS[1:3], [0], output_dir, resume=True)
    assert list(again["runs"]) == TINY_MODELS[1:3]
    assert [r["status"] for r in again["runs"]["multilevel/paper"]] == ["reused"]
    for name in TINY_MODELS[1:3]:
        assert [{**r, "status": None} for r in again["runs"][name]] == [
            {**r, "status": None} for r in report["runs"][name]
        ]


def test_study_refuses_earlier_runs_without_resume(tiny_study, monkeypatch):
    output_dir, _ = tiny_study
    _must_not_train(monkeypatch)
    with pytest.raises(common.BenchmarkError, match="--resume"):
        study.run_study(_tiny_config(), TINY_MODELS, [0], output_dir)


def test_study_resume_refuses_a_finished_run_of_another_config(tiny_study, monkeypatch):
    output_dir, _ = tiny_study
    _must_not_train(monkeypatch)
    config = _tiny_config()
    config.learning_rate_max = 0.1
    with pytest.raises(
        common.BenchmarkError, match=r"another config \(learning_rate_max: was .*, now 0.1\)"
    ):
        study.run_study(config, TINY_MODELS, [0], output_dir, resume=True)


def test_study_bad_config_fails_before_training(tmp_path, monkeypatch):
    _must_not_train(monkeypatch)
    config = _tiny_config()
    config.batch_size = 0
    with pytest.raises(configuration.ConfigError, match="config.batch_size = 0"):
        study.run_study(config, TINY_MODELS, [0, 1], str(tmp_path))
    assert not os.listdir(tmp_path)


def test_scaling_table_puts_device_counts_side_by_side():
    def row(sizes, devices, images_per_second):
        return {
            "family": "ResNet",
            "stage_sizes": sizes,
            "step_size": 1.0,
            "devices": devices,
            "layout": "unrolled",
            "train_images_per_second": {"median": images_per_second},
        }

    table = throughput.scaling_table(
        [row([2], 1, 100.0), row([4], 1, 50.0), row([2], 2, 180.0), row([4], 2, 95.0)]
    )
    lines = table.splitlines()
    assert lines[0] == (
        "| model | blocks | train images/s, 1 device | train images/s, 2 devices | 2 vs 1 device |"
    )
    assert lines[2] == "| ResNet-6 | 2 | 100 | 180 | x1.80 |"
    assert lines[3] == "| ResNet-10 | 4 | 50 | 95 | x1.90 |"
    # A run cut short: the cells not measured are marked, not guessed.
    partial = throughput.scaling_table(
        [row([2], 1, 100.0), row([4], 1, 50.0), row([2], 2, 180.0)]
    ).splitlines()
    assert partial[3] == "| ResNet-10 | 4 | 50 | — | — |"


def test_throughput_makes_the_host_devices_it_measures_on(tmp_path):
    output = tmp_path / "throughput"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.throughput",
            "--families=2",
            "--levels=1",
            "--stage_sizes=1",
            "--steps=1",
            "--warmup=0",
            "--eval_steps=1",
            "--device_counts=1,2",
            "--batch_size=4",
            "--eval_batch_size=4",
            f"--output_dir={output}",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert result.returncode == 0, result.stderr
    with open(output / "throughput.json") as handle:
        report = json.load(handle)
    assert [r["devices"] for r in report["rows"]] == [1, 2] and report["complete"]
    assert report["machine"]["devices"] == 2  # the two host devices it made
    assert "| ResNet-4 w2 | 1 |" in (output / "throughput.md").read_text()
    assert "train images/s, 2 devices" in result.stdout


# ---------------------------------------------------------------------------
# runs: the helper config, and side by side, one process per core.


def _tiny_fashion_mnist(tmp_path) -> ml_collections.ConfigDict:
    data = fake_data.write_fashion_mnist(str(tmp_path / "data"), num_train=32, num_test=8)
    config = fashion_mnist.get_config()
    config.update(
        fashion_mnist_dir=data,
        width=2,
        stage_sizes=(2,),
        batch_size=8,
        eval_batch_size=8,
        num_epochs=2.0,
        cycle_boundaries=(1.0,),
        growth_train_examples=16,
        progress_bar=False,
    )
    return config


def test_runs_side_by_side_match_runs_one_after_another(tmp_path, monkeypatch):
    if len(parallel.cpus_available()) < 2:
        pytest.skip("needs two CPU cores")
    config = _tiny_fashion_mnist(tmp_path)
    overrides = {"first_cycle": {"multilevel": False}, "multilevel": {}}
    planned = runs.plan_runs(config, overrides, [0], str(tmp_path / "side_by_side"))
    finished = []
    side_by_side = runs.train_runs(
        planned,
        str(tmp_path / "side_by_side"),
        parallel_runs=2,
        on_finished=lambda results: finished.append(len(results)),
    )
    assert [(r.run.name, r.status) for r in side_by_side] == [
        ("first_cycle", "trained"),
        ("multilevel", "trained"),
    ]
    assert finished == [1, 2]  # the report is rewritten as each run finishes
    # The same runs one after another: the same errors (one core or two
    # compute the same numbers), the same order of results.
    alone = runs.train_runs(
        runs.plan_runs(config, overrides, [0], str(tmp_path / "alone")), str(tmp_path / "alone")
    )
    for a, b in zip(side_by_side, alone):
        assert [h["test_loss"] for h in a.summary["history"]] == pytest.approx(
            [h["test_loss"] for h in b.summary["history"]], rel=1e-5
        )
    _must_not_train(monkeypatch)  # finished runs are reused, not trained again
    again = runs.train_runs(planned, str(tmp_path / "side_by_side"), resume=True, parallel_runs=2)
    assert [r.status for r in again] == ["reused", "reused"]
    with pytest.raises(common.BenchmarkError, match="--parallel_runs=999"):
        runs.train_runs(planned, str(tmp_path / "side_by_side"), resume=True, parallel_runs=999)


# ---------------------------------------------------------------------------
# step_cost and the GPU script.


def test_step_cost_fit_and_every_phase_timed():
    # seconds = 0.002 + 0.0005 * blocks, exactly: the fit recovers both.
    assert step_cost.fit([6, 12, 24], [0.005, 0.008, 0.014]) == pytest.approx(
        {"fixed": 0.002, "per_block": 0.0005}
    )
    seconds = step_cost.measure_depth(
        (1,),
        {
            "width": 2,
            "image_shape": (8, 8, 1),
            "num_classes": 10,
            "crop_padding": 1,
            "batch_size": 4,
            "warmup": 0,
            "steps": 1,
        },
    )
    assert list(seconds) == [*steps.TRAIN_STEP_PHASES, step_cost.HOST_INDICES]
    assert all(value > 0 for value in seconds.values())


def test_gpu_check_script_runs_end_to_end_on_the_cpu_at_tiny_sizes(tmp_path):
    # Every command of the prepared GPU script, at tiny sizes: its first run
    # on a GPU is not lost to a typo.
    data = fake_data.write_fashion_mnist(str(tmp_path / "data"), num_train=32, num_test=8)
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHON=sys.executable,
        BUDGET_SECONDS="600",
        THROUGHPUT_FLAGS=(
            "--dataset=fashion_mnist --image_shape=8,8,1 --families=2 --stage_sizes=1 "
            "--levels=1 --cycle_epochs=1 --steps=1 --warmup=0 --eval_steps=1 "
            "--batch_size=4 --eval_batch_size=4 --layouts=unrolled"
        ),
        STUDY_FLAGS=(
            "--config.width=2 --config.stage_sizes=(2,) --config.batch_size=8 "
            "--config.eval_batch_size=8 --config.progress_bar=False"
        ),
    )
    output = tmp_path / "out"
    script = os.path.join(REPO_ROOT, "benchmarks", "gpu_check.sh")
    result = subprocess.run(
        ["bash", script, str(output), data], capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for part in ("resnet", "wresnet", "resnet_bf16", "wresnet_bf16"):
        with open(output / part / "throughput.json") as handle:
            report = json.load(handle)
        assert report["settings"]["compute_dtype"] == (
            "bfloat16" if part.endswith("bf16") else "float32"
        )
    with open(output / "study" / "study.json") as handle:
        study_json = json.load(handle)
    assert study_json["complete"] and study_json["settings"]["num_epochs"] == 3.0
    assert list(study_json["runs"]) == ["first_cycle", "last_cycle", "multilevel/paper"]
    # The budget: with none left every part is skipped and the script ends.
    result = subprocess.run(
        ["bash", script, str(tmp_path / "none"), data],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(env, BUDGET_SECONDS="0"),
    )
    assert result.returncode == 0 and result.stderr.count("skipped") == 5, result.stderr
