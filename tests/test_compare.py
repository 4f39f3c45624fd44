"""The comparison report of several runs (mpff report RUN RUN ...): baselines of the same problem
only, the training phase, seed groups, the tables as CSV and JSON, clean rewrites; and the paper
sweep's seed and rank axes."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess

import h5py
import numpy as np
import pytest
from fake_runs import make_config, make_run, sequential_spans

from mpff.analysis import compare, figures, report, summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _al_spans(last: float):
    """Two ranks of a 2-rank run: setup to 1 s, training spans ending at ``last``, the model
    written after it; its wall ends 1 s after ``last``."""
    return [[("setup", -1, -1, 0.0, 1.0), ("train", 0, 0, 1.0, 4.0), ("send", 0, 0, 4.0, 4.5, 1000, 1),
             ("wait", 2, 0, 4.5, 5.0), ("train", 2, 0, 5.0, last)],
            [("setup", -1, -1, 0.0, 1.0), ("wait", 1, 0, 1.0, 4.5), ("recv", 0, 0, 4.5, 5.0, 1000, 0),
             ("train", 1, 0, 5.0, last - 1.0), ("io", 3, -1, last, last + 0.5)]]


@pytest.fixture
def four_runs(tmp_path):
    """Sequential and All Layers, seeds 0 and 1 each (seed 1's tasks a little slower)."""
    runs = {}
    for seed, slower in ((0, 0.0), (1, 0.2)):
        runs[f"seq-seed{seed}"] = make_run(
            tmp_path / f"seq-seed{seed}", [sequential_spans(4, train=(2.0 + slower, 3.0))],
            make_config("sequential", seed=seed), accuracy=0.9 + 0.01 * seed)
        last = 11.0 + 5 * slower
        runs[f"al-seed{seed}"] = make_run(
            tmp_path / f"al-seed{seed}", _al_spans(last), make_config("all_layers", seed=seed),
            walls=[(0.0, last + 1.0)] * 2, accuracy=0.88 + 0.02 * seed)
    return runs


def _rows(text: str, first: str) -> list[str]:
    """Rows of the comparison table (the report's first table) whose run is ``first``."""
    table = text.split("## Training cost")[0]  # that section has a table of the same runs
    return [line for line in table.splitlines() if line.startswith(f"| {first}")]


# ------------------------------------------------------------------------------ baselines

def test_a_baseline_of_another_problem_is_refused(tmp_path, four_runs, capsys):
    other = make_run(tmp_path / "seq-wide", [sequential_spans(4)],
                     make_config("sequential", dims=(784, 16, 16), data={"train_subset": 2000}))
    assert report.main([four_runs["al-seed0"], four_runs["al-seed1"], "--baseline", other,
                        "--out", str(tmp_path / "cmp"), "--no-figures"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert ("baseline seq-wide is not the same problem as run al-seed0: they differ in model.dims "
            "([784, 16, 16] vs [784, 8, 8]), data.train_subset (2000 vs 1000)") in err
    assert not (tmp_path / "cmp").exists()
    # the same problem with another seed is a fine baseline
    assert report.main([four_runs["al-seed0"], "--baseline", four_runs["seq-seed1"],
                        "--out", str(tmp_path / "ok"), "--no-figures"]) == 0


def test_the_report_of_one_run_refuses_a_baseline_of_another_problem(tmp_path, four_runs, capsys):
    # one run went another way than several: it printed a speedup against any --baseline
    other = make_run(tmp_path / "seq-wide", [sequential_spans(4)],
                     make_config("sequential", dims=(784, 16, 16), data={"train_subset": 2000}))
    out = tmp_path / "one"
    assert report.main([four_runs["al-seed0"], "--baseline", other, "--out", str(out), "--no-figures"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mpff report: error: baseline seq-wide is not the same "
                                                  "problem as run al-seed0: they differ in model.dims"), err
    assert "--any-baseline" in err
    assert not out.exists()
    # asked for explicitly, it is compared and the baseline row says what differs
    assert report.main([four_runs["al-seed0"], "--baseline", other, "--any-baseline", "--out", str(out),
                        "--no-figures"]) == 0
    text = (out / "report.md").read_text()
    assert "(another problem: differs in model.dims ([784, 16, 16] vs [784, 8, 8]), data.train_subset" in text
    assert "| speedup |" in text
    # several runs: the same flag, the same note in the baseline column
    cmp = tmp_path / "cmp"
    assert report.main([four_runs["al-seed0"], four_runs["al-seed1"], "--baseline", other, "--any-baseline",
                        "--out", str(cmp), "--no-figures"]) == 0
    (row,) = _rows((cmp / "report.md").read_text(), "al-seed0")
    assert row.rstrip(" |").endswith("seq-wide (another problem: differs in model.dims ([784, 16, 16] vs "
                                     "[784, 8, 8]), data.train_subset (2000 vs 1000))"), row
    capsys.readouterr()
    assert report.main([four_runs["al-seed0"], "--any-baseline", "--out", str(tmp_path / "x"), "--no-figures"]) == 2
    assert "--any-baseline applies to a --baseline" in capsys.readouterr().err


def test_auto_pairing_prefers_a_finished_baseline(tmp_path, four_runs):
    # a Sequential run of the same problem and seed that was preempted is a worse baseline than
    # a finished one of another seed: its wall is not a whole run's
    pre = make_run(tmp_path / "seq-pre", [sequential_spans(2)], make_config("sequential"),
                   info={"status": "preempted"})
    pairs = compare.pair_baselines([report.analyze_run(d) for d in (pre, four_runs["seq-seed1"],
                                                                   four_runs["al-seed0"])], None)
    assert pairs[2].baseline.name == "seq-seed1"


def test_auto_pairing_names_what_differs_instead_of_a_speedup(tmp_path, four_runs):
    other = make_run(tmp_path / "seq-neg", [sequential_spans(4)], make_config("sequential", negatives="random"))
    out = tmp_path / "cmp"
    assert report.main([other, four_runs["al-seed0"], "--out", str(out), "--no-figures"]) == 0
    (row,) = _rows((out / "report.md").read_text(), "al-seed0")
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[7] == "–" and cells[8] == "–"      # no speedup, no efficiency
    assert cells[-1] == "– (no Sequential run of the same problem; seq-neg differs in train.negatives)"


def test_pairs_prefer_the_same_seed_and_report_the_training_phase(four_runs, tmp_path):
    out = tmp_path / "cmp"
    assert report.main(list(four_runs.values()) + ["--out", str(out), "--no-figures"]) == 0
    text = (out / "report.md").read_text()
    (al1,) = _rows(text, "al-seed1")
    # wall 13 against seq-seed1's 1 + 4 x 5.7 + 1 + 0.2 = 25 -> speedup 1.92; setup 1 s;
    # training 1 .. 12 = 11 s against seq-seed1's 1 .. 24.8 = 23.8 s -> 2.16; busy in the
    # training phase: rank 0 3 + 0.5 + 7, rank 1 0.5 + 6 -> bubble 1 - 17 / 22
    assert al1.startswith("| al-seed1 | all_layers | fixed | goodness | 2 | 13.00 | 90.00 % | 1.92 | 96.2 % |")
    assert al1.rstrip().endswith("| 1.00 | 11.00 | 2.16 | 22.7 % | 1 | seq-seed1 |")


# ------------------------------------------------------------------------------ training phase

def test_training_phase_from_spans_and_from_the_runs_own_record(tmp_path):
    spans = [[("setup", -1, -1, 0.0, 5.0), ("train", 0, 0, 5.0, 8.0), ("eval", 0, -1, 8.0, 9.0),
              ("wait", -1, -1, 9.0, 9.5), ("io", 0, -1, 9.5, 10.0)],
             [("setup", -1, -1, 0.0, 4.0), ("wait", 0, 1, 4.0, 6.0), ("train", 0, 1, 6.0, 8.5)]]
    cfg = make_config("single_layer", chapters=1)
    run = report.load_run(make_run(tmp_path / "a", spans, cfg, walls=[(0.0, 10.0)] * 2))
    tp = summary.training_phase(run)
    # from the first end of setup (4) to the last training span (9), trailing wait and the model
    # write left out: rank 0 busy all 5 s (the end of its setup, train, eval), rank 1 2.5 s
    assert (tp.start, tp.end, tp.seconds, tp.setup_seconds) == pytest.approx((4.0, 9.0, 5.0, 4.0))
    assert tp.busy == pytest.approx([5.0, 2.5])
    assert tp.bubble == pytest.approx(1 - 7.5 / 10)
    # what the run recorded wins: trace attributes train_start / train_end, run.json training_seconds
    attrs = [{"train_start": 5.0, "train_end": 9.0}, {"train_start": 4.5, "train_end": 8.5}]
    run = report.load_run(make_run(tmp_path / "b", spans, cfg, walls=[(0.0, 10.0)] * 2, attrs=attrs,
                                   info={"training_seconds": 4.4}))
    tp = summary.training_phase(run)
    assert (tp.start, tp.end, tp.seconds, tp.setup_seconds) == pytest.approx((4.5, 9.0, 4.4, 4.5))


# ------------------------------------------------------------------------------ seeds and tables

def test_runs_that_differ_only_in_seed_are_grouped(four_runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert report.main(list(four_runs.values()) + ["--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "## Runs that differ only in their seed" in text
    (group,) = _rows(text, "al-seed*")
    # walls 12 and 13, training 10 and 11; speedups 24.2 / 12 = 2.017 and 25 / 13 = 1.923
    assert group.startswith("| al-seed* | all_layers | fixed | goodness | 2 | 2 | 12.50 ± 0.71 | 10.50 ± 0.71 "
                            "| 1.97 ± 0.07 |")
    assert "| 89.00 % ± 1.41 % |" in group
    assert "al-seed*" in capsys.readouterr().out

    data = json.loads((out / "comparison.json").read_text())
    (al,) = [g for g in data["seed_groups"] if g["group"] == "al-seed*"]
    assert al["runs"] == ["al-seed0", "al-seed1"] and al["seeds"] == [0, 1]
    assert al["speedup"]["mean"] == pytest.approx((24.2 / 12 + 25.0 / 13) / 2)
    assert al["speedup"]["min"] == pytest.approx(25.0 / 13) and al["speedup"]["n"] == 2
    assert al["wall_seconds"]["std"] == pytest.approx(0.5 ** 0.5)

    with open(out / "comparison.csv", newline="") as fh:
        rows = {r["run"]: r for r in csv.DictReader(fh)}
    assert set(rows) == set(four_runs)
    assert float(rows["al-seed0"]["speedup"]) == pytest.approx(24.2 / 12)
    assert float(rows["al-seed0"]["training_seconds"]) == pytest.approx(10.0)
    assert rows["al-seed0"]["baseline"] == "seq-seed0" and rows["al-seed1"]["baseline"] == "seq-seed1"
    assert rows["al-seed0"]["seed_group"] == rows["al-seed1"]["seed_group"] != rows["seq-seed0"]["seed_group"]
    assert [r["run"] for r in data["runs"]] == list(rows)
    with open(out / "comparison-groups.csv", newline="") as fh:
        groups = {r["group"]: r for r in csv.DictReader(fh)}
    assert float(groups["al-seed*"]["speedup_max"]) == pytest.approx(24.2 / 12)
    for name in ("scaling.png", "scaling.pdf", "comparison.png", "accuracy.png", "al-seed0/report.md"):
        assert (out / name).stat().st_size > 0, name


def test_runs_with_another_setting_are_not_a_seed_group(tmp_path, four_runs):
    lr = make_run(tmp_path / "al-lr", _al_spans(11.0), make_config("all_layers", seed=2, lr=0.001),
                  walls=[(0.0, 12.0)] * 2)
    runs = [report.analyze_run(d) for d in (four_runs["al-seed0"], four_runs["al-seed1"], lr)]
    assert compare.seed_groups(runs) == [[0, 1], [2]]


def test_predicted_time_beside_the_measured_one(four_runs, tmp_path):
    out = tmp_path / "cmp"
    assert report.main([four_runs["seq-seed0"], four_runs["al-seed0"], "--out", str(out), "--predict",
                        "--no-figures"]) == 0
    text = (out / "report.md").read_text()
    assert "predicted time (s)" in text
    (seq,) = _rows(text, "seq-seed0")
    assert seq.rstrip().endswith("| 24.20 |")       # the source predicts itself exactly
    data = json.loads((out / "comparison.json").read_text())
    assert {(c["schedule"], c["ranks"]) for c in data["predicted"]} >= {("sequential", 1), ("all_layers", 2)}
    assert data["runs"][0]["predicted_wall_seconds"] == pytest.approx(24.2)


def test_predictions_come_from_a_finished_run_first(four_runs, tmp_path):
    # a preempted Sequential run (seed 0, the one picked before) has the times of part of a run
    pre = make_run(tmp_path / "seq-pre", [sequential_spans(2)], make_config("sequential"),
                   info={"status": "preempted"})
    summaries = [report.analyze_run(d) for d in (pre, four_runs["seq-seed1"], four_runs["al-seed0"])]
    _, _, notes = compare.predict_runs(summaries)
    assert [n.split(":")[0] for n in notes] == ["predicted from seq-seed1"], notes


# ------------------------------------------------------------------------------ writing again

def test_writing_again_replaces_the_report_and_nothing_else(four_runs, tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    assert report.main(list(four_runs.values()) + ["--out", str(out), "--no-figures"]) == 0
    (out / "notes.txt").write_text("mine")
    (out / "mine").mkdir()
    assert report.main([four_runs["seq-seed0"], four_runs["al-seed0"], "--out", str(out), "--no-figures"]) == 0
    assert not (out / "al-seed1").exists() and not (out / "seq-seed1").exists()
    assert (out / "al-seed0" / "report.md").exists()
    assert (out / "notes.txt").read_text() == "mine" and (out / "mine").is_dir()
    assert "al-seed1" not in (out / "report.md").read_text()
    assert not [n for n in os.listdir(tmp_path) if ".writing-" in n]

    # a failure halfway leaves the previous report whole
    before = (out / "report.md").read_text()

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(figures, "plot_scaling", broken)
    assert report.main(list(four_runs.values()) + ["--out", str(out)]) == 2
    assert (out / "report.md").read_text() == before
    assert (out / "al-seed0" / "report.md").exists() and not (out / "al-seed1").exists()
    assert not [n for n in os.listdir(tmp_path) if ".writing-" in n]


def test_a_folder_of_the_users_is_never_replaced(four_runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    (out / "al-seed0").mkdir(parents=True)
    (out / "al-seed0" / "data.bin").write_text("precious")
    assert report.main([four_runs["seq-seed0"], four_runs["al-seed0"], "--out", str(out), "--no-figures"]) == 2
    assert "is not part of an earlier mpff report" in capsys.readouterr().err
    assert (out / "al-seed0" / "data.bin").read_text() == "precious"


def test_problem_differences_resolve_shards_and_paths():
    fed = make_config("federated").to_dict()
    seq = make_config("sequential", data={"shards": 4}).to_dict()
    assert summary.problem_differences(fed, seq, 4, 1) == []
    assert summary.problem_differences(fed, seq, 2, 1) == ["data.shards"]
    a = make_config().to_dict()
    b = json.loads(json.dumps(a))
    a["data"]["path"], b["data"]["path"] = "/home/me/data/fashion", "/scratch/fashion/"
    assert summary.problem_differences(a, b) == []


# ------------------------------------------------------------------------------ the sweep's axes

def _dry_run(tmp_path, **env):
    sweep = tmp_path / "sweep"
    e = dict(os.environ, MPFF_SWEEP_DRY_RUN="1", MPFF_SWEEP_DIR=str(sweep), **env)
    proc = subprocess.run(["bash", os.path.join(ROOT, "jobs", "paper_sweep.sh")], cwd=ROOT, env=e,
                          capture_output=True, text=True)
    lines = [ln for ln in proc.stderr.splitlines() if " sbatch " in f" {ln} "]
    return proc, lines, sweep


def test_sweep_seed_and_rank_axes(tmp_path):
    proc, lines, sweep = _dry_run(tmp_path, MPFF_SWEEP_SCHEDULES="sequential all_layers",
                                  MPFF_SWEEP_NEGATIVES="random", MPFF_SWEEP_CLASSIFIERS="goodness",
                                  MPFF_SWEEP_SEEDS="0 1 2", MPFF_SWEEP_RANKS="2 4 8")
    assert proc.returncode == 0, proc.stderr
    # one array per schedule and rank count, each over the seeds; then the report
    assert len(lines) == 5, proc.stderr
    for line, (schedule, ranks) in zip(lines, [("sequential", 1), ("all_layers", 2), ("all_layers", 4),
                                               ("all_layers", 8)]):
        assert f"--job-name=mpff-{schedule}" in line and f"--ntasks-per-node={ranks}" in line
        assert "--array=0-2" in line and "--nodes=1" in line
        assert re.search(r"MPFF_ARRAY_RUNS=.*train.seed=2", line)
    assert re.search(r"--dependency=afterany(:DRYRUN\d+){4} ", lines[4])
    runs = (sweep / "sweep.runs").read_text().split()
    assert runs == [f"sequential-random-goodness-seed{s}" for s in range(3)] + [
        f"all_layers-random-goodness-n{n}-seed{s}" for n in (2, 4, 8) for s in range(3)]


def test_sweep_spreads_ranks_over_nodes(tmp_path):
    proc, lines, _ = _dry_run(tmp_path, MPFF_SWEEP_SCHEDULES="all_layers", MPFF_SWEEP_NEGATIVES="random",
                              MPFF_SWEEP_CLASSIFIERS="goodness", MPFF_SWEEP_NP_ALL_LAYERS="4 16",
                              MPFF_SWEEP_RANKS_PER_NODE="4")
    assert proc.returncode == 0, proc.stderr
    assert "--nodes=1 --ntasks=4 --ntasks-per-node=4" in lines[0]
    assert "--nodes=4 --ntasks=16 --ntasks-per-node=4" in lines[1]
    assert "--array=0-0" in lines[1]


@pytest.mark.parametrize("env, fragment", [
    ({"MPFF_SWEEP_SEEDS": "0 x"}, "MPFF_SWEEP_SEEDS"),
    ({"MPFF_SWEEP_RANKS": "2 0"}, "must be a positive number"),
    ({"MPFF_SWEEP_RANKS_PER_NODE": "four"}, "MPFF_SWEEP_RANKS_PER_NODE"),
])
def test_sweep_rejects_bad_axes(tmp_path, env, fragment):
    proc, _, _ = _dry_run(tmp_path, **env)
    assert proc.returncode == 2 and fragment in proc.stderr, proc.stderr


# ------------------------------------------------------------------------------ FF against backprop

def test_the_cost_table_by_hand(tmp_path):
    """Three chapters, evaluated after each: accuracies 0.50, 0.92, 0.97 at 4, 7 and 10 s; each
    evaluation takes 1 s, training starts at 1 s. Training seconds until an evaluation: its end,
    less the start of training, less the evaluation time until then: 2, 4 and 6 s."""
    spans = [("setup", -1, -1, 0.0, 1.0)]
    for c in range(3):
        t = 1.0 + 3 * c
        spans += [("train", c, 0, t, t + 2.0), ("eval", c, -1, t + 2.0, t + 3.0)]
    spans.append(("io", 2, -1, 10.0, 10.2))
    cfg = make_config("sequential", dims=(784, 8), chapters=3, algorithm="ff")
    run = make_run(tmp_path / "ff", [spans], cfg, attrs=[{"train_start": 1.0, "train_end": 10.0}],
                   info={"ranks": [{"memory": {"rss_peak_bytes": 3 * 2 ** 20}}]}, accuracy=0.97)
    with h5py.File(tmp_path / "ff" / "trace" / "rank0000.h5", "a") as fh:  # scalars at times we choose
        ds = fh["scalars"]
        rows = ds[()]
        extra = np.zeros(3, dtype=rows.dtype)
        for i, (t, acc) in enumerate([(4.0, 0.5), (7.0, 0.92), (10.0, 0.97)]):
            extra[i] = (b"test_accuracy", i + (1 if int(fh.attrs["format_version"]) >= 2 else 0), -1, t, acc)
        ds.resize((0,))
        ds.resize((3,))
        ds[...] = extra
    s = report.analyze_run(run)
    assert summary.accuracy_timeline(s) == [(2.0, 0.5), (4.0, 0.92), (6.0, 0.97)]
    rec = compare.cost_record(s, (0.9, 0.95, 0.98))
    assert rec["training_seconds_per_epoch"] == pytest.approx((9.0 - 3.0) / 3)
    assert rec["seconds_to_accuracy"] == {"90%": 4.0, "95%": 6.0, "98%": None}
    assert rec["peak_rss_bytes"] == 3 * 2 ** 20 and rec["algorithm"] == "ff"
    table = compare.cost_table([rec])
    assert "| ff | ff | sequential | 1 | 2.00 | 4.00 | 6.00 | not reached | 3.0 MiB | 0 B | 97.00 % |" in table
