"""The offline report: exact figures on synthetic traces, output files, errors, and a real run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import h5py
import pytest

from mpff.analysis import report, summary
from mpff.config import Config, ConfigError
from mpff.plan import build_plan
from mpff.predict.simulate import SimResult, simulate
from mpff.trace import Tracer, trace_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")


def make_config(schedule="single_layer", dims=(784, 8, 8, 8, 8), chapters=4, epochs=4,
                negatives="fixed", classifier="goodness", **train) -> Config:
    return Config().replace(model={"dims": tuple(dims)}, run={"schedule": schedule},
                            train={"chapters": chapters, "epochs": epochs, "negatives": negatives,
                                   "classifier": classifier, **train})


def make_run(path, ranks, *, cfg=None, wall=None, status="finished", run_json=True, scalars=None):
    """A run directory written with the real Tracer.

    ranks: one list of spans (kind, chapter, layer, start, end[, bytes, peer]) per rank;
    wall: (wall_start, wall_end), the same for every rank, or one pair per rank;
    scalars: per rank, a list of (name, chapter, layer, value).
    """
    cfg = cfg or make_config(schedule="sequential" if len(ranks) == 1 else "single_layer")
    world_size = len(ranks)
    walls = wall if wall and isinstance(wall[0], tuple) else [wall or (0.0, 10.0)] * world_size
    for rank, spans in enumerate(ranks):
        meta = {"world_size": world_size, "host": f"node{rank // 2}", "device": "cpu",
                "config": cfg.to_json()}
        tracer = Tracer(trace_path(str(path), rank), rank, meta)
        for span in spans:
            tracer.add_span(*span)
        for name, chapter, layer, value in (scalars or {}).get(rank, []):
            tracer.scalar(name, chapter, layer, value)
        tracer.close(status)
        with h5py.File(trace_path(str(path), rank), "a") as fh:  # times we control
            fh.attrs["wall_start"], fh.attrs["wall_end"] = walls[rank]
    if run_json:
        (path / "run.json").write_text(json.dumps({
            "status": status, "world_size": world_size, "schedule": cfg.run.schedule}))
    (path / "config.toml").write_text(cfg.to_toml())
    return str(path)


def single_layer_pipeline(num_chapters, num_layers, t=1.0):
    """Spans of a perfect Single Layer pipeline with equal task times: T(c, k) on rank k at c + k."""
    return [[("train", c, k, (c + k) * t, (c + k + 1) * t) for c in range(num_chapters)]
            for k in range(num_layers)]


def stand_in_simulate(cfg, world_size, durations):
    """A tiny Single Layer list scheduler (layer k on rank k), independent of mpff.plan."""
    num_layers = cfg.model.num_layers
    finish = {}
    busy = [0.0] * world_size
    for c in range(cfg.train.chapters):
        for k in range(num_layers):
            d = durations.get(("train", c, k), 0.0)
            finish[c, k] = max(finish.get((c - 1, k), 0.0), finish.get((c, k - 1), 0.0)) + d
            busy[k] += d
    return SimResult(makespan=max(finish.values()), busy=busy)


# The 7-of-10-seconds rank: busy = setup 1 + train 4 + send 0.5 + recv 0.5 + eval 1 = 7,
# idle = wait 1.5 + untraced 1.5 = 3.
BUSY7 = [
    ("setup", -1, -1, 0.0, 1.0),
    ("train", 0, 0, 1.0, 5.0),
    ("send", 0, 0, 5.0, 5.5, 1000, 1),
    ("wait", 0, 1, 5.5, 7.0),
    ("recv", 0, 1, 7.0, 7.5, 250, 1),
    ("eval", 0, -1, 7.5, 8.5),
]


def test_pipeline_bubble():
    assert report.pipeline_bubble(100, 4) == pytest.approx(3 / 103, rel=1e-15)
    assert report.pipeline_bubble(100, 1) == 0.0


def test_breakdown_and_bubble_of_one_rank(tmp_path):
    run = make_run(tmp_path / "run", [BUSY7], cfg=make_config(schedule="sequential"))
    s = report.analyze_run(run, simulate=stand_in_simulate)
    (r,) = s.ranks
    assert r.wall == 10.0
    assert r.seconds == pytest.approx({"compute": 4.0, "communication": 1.0, "waiting": 1.5,
                                       "evaluation": 1.0, "other": 2.5})
    assert {c: r.percent(c) for c in report.CATEGORIES} == pytest.approx(
        {"compute": 40.0, "communication": 10.0, "waiting": 15.0, "evaluation": 10.0, "other": 25.0})
    assert r.uncovered == pytest.approx(1.5)
    assert r.busy == pytest.approx(7.0)
    assert r.bubble == pytest.approx(0.30)
    assert s.bubble_measured == pytest.approx(0.30)
    assert sum(r.seconds.values()) == pytest.approx(r.wall, rel=0.01)
    assert (r.bytes_sent, r.bytes_received) == (1000, 250)


def test_overall_bubble_uses_the_run_wall(tmp_path):
    # rank 0 busy 7 of [0, 10]; rank 1 busy 2 s in [2, 6]: idle inside its wall 2 s (50 %), and
    # idle for the 6 s of the run's wall it was not running.
    rank1 = [("train", 0, 1, 2.0, 3.0), ("wait", 0, 1, 3.0, 5.0), ("send", 0, 1, 5.0, 6.0, 40, 0)]
    run = make_run(tmp_path / "run", [BUSY7, rank1], wall=[(0.0, 10.0), (2.0, 6.0)])
    s = report.analyze_run(run, simulate=stand_in_simulate)
    assert [r.bubble for r in s.ranks] == pytest.approx([0.3, 0.5])
    assert s.wall == 10.0
    assert s.bubble_measured == pytest.approx(1 - (7 + 2) / (2 * 10))
    assert (s.bytes_sent, s.bytes_received) == (1040, 250)


def test_spans_outside_the_wall_or_overlapping_are_not_counted_twice(tmp_path):
    spans = [("train", 0, 0, -1.0, 4.0), ("forward", 0, 0, 3.0, 6.0), ("wait", 0, 0, 9.0, 12.0)]
    run = make_run(tmp_path / "run", [spans], cfg=make_config(schedule="sequential"))
    s = report.analyze_run(run, simulate=stand_in_simulate)
    (r,) = s.ranks
    assert r.seconds["compute"] == pytest.approx(6.0)   # [0, 6]
    assert r.seconds["waiting"] == pytest.approx(1.0)   # [9, 10]
    assert sum(r.seconds.values()) == pytest.approx(10.0)
    assert r.clipped == pytest.approx(1.0 + 1.0 + 2.0)
    assert any("not counted" in n for n in s.notes)


def test_modelled_bubble_with_a_stand_in_simulator(tmp_path):
    num_chapters, num_layers = 5, 4
    cfg = make_config(chapters=num_chapters, epochs=num_chapters)
    run = make_run(tmp_path / "run", single_layer_pipeline(num_chapters, num_layers),
                   cfg=cfg, wall=(0.0, num_chapters + num_layers - 1.0))
    s = report.analyze_run(run, simulate=stand_in_simulate)
    expected = report.pipeline_bubble(num_chapters, num_layers)  # 3/8
    assert s.bubble_measured == pytest.approx(expected)
    assert s.bubble_modelled == pytest.approx(expected)
    assert summary.analytic_bubble(s) == pytest.approx(expected)


def test_modelled_bubble_with_the_real_plan_is_3_over_103(tmp_path):
    cfg = make_config(chapters=100, epochs=100)
    durations = {("train", c, k): 1.0 for c in range(100) for k in range(4)}
    res = simulate(build_plan(cfg, 4), durations)
    assert 1 - sum(res.busy) / (4 * res.makespan) == pytest.approx(3 / 103, rel=1e-12)
    # and through the report, from the spans of a trace
    run = make_run(tmp_path / "run", single_layer_pipeline(100, 4), cfg=cfg, wall=(0.0, 103.0))
    s = report.analyze_run(run)
    assert s.bubble_modelled == pytest.approx(3 / 103, rel=1e-12)
    assert s.bubble_measured == pytest.approx(3 / 103, rel=1e-12)


def test_task_durations_count_forward_only_on_the_training_rank(tmp_path):
    rank0 = [("forward", 0, 1, 0.0, 0.5), ("train", 0, 0, 0.5, 1.5), ("negatives", 0, -1, 1.5, 1.7)]
    rank1 = [("forward", 0, 1, 0.0, 0.25), ("train", 0, 1, 1.5, 3.5), ("eval", 0, -1, 3.5, 4.0)]
    run = report.load_run(make_run(tmp_path / "run", [rank0, rank1]))
    assert summary.task_durations(run) == pytest.approx({
        ("train", 0, 0): 1.0, ("train", 0, 1): 2.0, ("forward", 0, 1): 0.25,
        ("negatives", 0, -1): 0.2, ("eval", 0, -1): 0.5})


def test_killed_run_is_modelled_over_its_complete_chapters(tmp_path):
    cfg = make_config(chapters=10, epochs=10)
    spans = single_layer_pipeline(3, 4)
    spans[0].append(("train", 3, 0, 3.0, 4.0))  # chapter 3 started, not finished
    run = make_run(tmp_path / "run", spans, cfg=cfg, wall=(0.0, 6.0), status="running", run_json=False)
    seen = {}

    def simulate(cfg, world_size, durations):
        seen["chapters"] = cfg.train.chapters
        return stand_in_simulate(cfg, world_size, durations)

    s = report.analyze_run(run, simulate=simulate)
    assert seen["chapters"] == 3
    assert s.bubble_modelled == pytest.approx(report.pipeline_bubble(3, 4))
    assert "3 of 10 chapters" in s.model_note
    assert any("status 'running'" in n for n in s.notes)
    assert any("no run.json" in n for n in s.notes)
    with open(os.devnull, "w") as devnull:
        out = report.run_report(run, simulate=stand_in_simulate, stream=devnull, figures=False)
    assert "status 'running'" in (tmp_path / "run" / "report" / "report.md").read_text()
    assert out == os.path.join(run, "report")


def test_speedup_and_efficiency_against_a_baseline(tmp_path, capsys):
    base = make_run(tmp_path / "seq", [[("train", 0, 0, 0.0, 20.0)]], wall=(0.0, 20.0),
                    cfg=make_config(schedule="sequential"))
    run = make_run(tmp_path / "pipe", [BUSY7, BUSY7], wall=(0.0, 8.0))
    b = report.analyze_run(base, simulate=stand_in_simulate)
    s = report.analyze_run(run, simulate=stand_in_simulate)
    assert summary.speedup(b, s) == pytest.approx(2.5)
    assert summary.efficiency(b, s) == pytest.approx(1.25)
    assert report.main([run, "--baseline", base, "--no-figures"]) == 0
    text = (tmp_path / "pipe" / "report" / "report.md").read_text()
    assert "| speedup | 2.50 |" in text
    assert "| parallel efficiency | 125.0 % |" in text
    assert "| speedup | 2.50 |" in capsys.readouterr().out


def test_single_run_outputs(tmp_path, capsys):
    scalars = {1: [("test_accuracy", 0, -1, 0.5), ("test_accuracy", 1, -1, 0.75),
                   ("peak_host_mem", -1, -1, 3 * 2**20)]}
    run = make_run(tmp_path / "run", [BUSY7, BUSY7[:3]], scalars=scalars)
    assert report.main([run]) == 0
    out = tmp_path / "run" / "report"
    for name in ("report.md", "timeline.png", "accuracy.png", "breakdown.png", "trace.json"):
        assert (out / name).stat().st_size > 0, name
    for name in ("timeline.png", "accuracy.png", "breakdown.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "report.md").read_text()
    assert "| 2 | 75.00 % |" in text            # accuracy per chapter, counted from 1
    assert "| 1 | 3.0 MiB | – |" in text          # peak memory
    assert "| total | 2.0 KiB | 250 B |" in text   # bytes moved: 2 x 1000 sent
    assert ("| 0 | 10.00 | 4.00 (40.0 %) | 1.00 (10.0 %) | 1.50 (15.0 %) | 1.00 (10.0 %) | 2.50 (25.0 %) | 1.50 |"
            in text)
    printed = capsys.readouterr().out
    assert "4.00 (40.0 %)" in printed and "bubble, measured" in printed

    events = json.loads((out / "trace.json").read_text())["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert names == {0: "rank 0 (node0, cpu)", 1: "rank 1 (node0, cpu)"}
    spans = [e for e in events if e["ph"] == "X"]
    assert len(spans) == len(BUSY7) + 3
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in spans)
    send = next(e for e in spans if e["name"] == "send c1 L0" and e["pid"] == 0)
    assert send["ts"] == 5e6 and send["dur"] == 5e5
    assert send["args"] == {"chapter": 1, "layer": 0, "bytes": 1000, "peer": 1}


def test_comparison_of_several_runs(tmp_path, capsys):
    seq = make_run(tmp_path / "seq", [[("train", 0, 0, 0.0, 20.0)]], wall=(0.0, 20.0),
                   cfg=make_config(schedule="sequential"),
                   scalars={0: [("test_accuracy", 3, -1, 0.9)]})
    a = make_run(tmp_path / "a", [BUSY7, BUSY7])
    b = make_run(tmp_path / "b", [BUSY7] * 4, cfg=make_config(negatives="random"))
    out = tmp_path / "cmp"
    assert report.main([seq, a, b, "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    table = text.split("## Training cost")[0]  # that section has a table of the same runs
    rows = [line for line in table.splitlines() if line.startswith("| ") and "schedule" not in line]
    assert len(rows) == 3
    assert rows[0].startswith("| seq | sequential | fixed | goodness | 1 | 20.00 | 90.00 % | 1.00 |")
    assert rows[1].startswith("| a | single_layer | fixed | goodness | 2 | 10.00 | – | 2.00 | 100.0 % | 30.0 % |")
    assert "| b | single_layer | random | goodness | 4 | 10.00 | – | – | – | 30.0 % |" in rows[2]
    for name in ("comparison.png", "accuracy.png", "seq/report.md", "a/timeline.png", "b/trace.json"):
        assert (out / name).stat().st_size > 0, name
    assert rows[1] in capsys.readouterr().out
    # the default output directory for several runs
    assert report.default_out([a, b]) == str(tmp_path / "comparison-report")


def test_comparison_with_baseline_and_same_run_names(tmp_path):
    base = make_run(tmp_path / "seq", [[("train", 0, 0, 0.0, 30.0)]], wall=(0.0, 30.0),
                    cfg=make_config(schedule="sequential"))
    (tmp_path / "x").mkdir()
    a = make_run(tmp_path / "run", [BUSY7, BUSY7])
    b = make_run(tmp_path / "x" / "run", [BUSY7] * 4)  # the same problem as the baseline (see test_compare)
    out = tmp_path / "cmp"
    assert report.main([a, b, "--baseline", base, "--out", str(out), "--no-figures"]) == 0
    text = (out / "report.md").read_text()
    assert "| run | single_layer | fixed | goodness | 2 | 10.00 | – | 3.00 | 150.0 % |" in text
    assert "| run | single_layer | fixed | goodness | 4 | 10.00 | – | 3.00 | 75.0 % |" in text
    assert (out / "run" / "report.md").exists() and (out / "run-2" / "report.md").exists()


def _expect_error(capsys, argv, fragment):
    assert report.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mpff report: error: ") and err.count("\n") == 1, err
    assert fragment in err, err
    return err


def test_corrupt_trace(tmp_path, capsys):
    run = make_run(tmp_path / "run", [BUSY7])
    path = trace_path(run, 0)
    with open(path, "wb") as fh:
        fh.write(os.urandom(64) + b"not an hdf5 file" * 100)
    with pytest.raises(ConfigError, match="corrupt or truncated"):
        report.load_run(run)
    _expect_error(capsys, [run], path)


def test_truncated_trace(tmp_path, capsys):
    run = make_run(tmp_path / "run", [BUSY7 * 50])
    path = trace_path(run, 0)
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(ConfigError, match="corrupt or truncated"):
        report.load_run(run)
    _expect_error(capsys, [run], path)


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_a_missing_or_damaged_rank_file_is_named_and_the_rest_reported(damage, tmp_path, capsys):
    """One bad trace file must not cost the report of the others (nor advice to delete a run
    directory that holds a good model): the report names the file and reports the rest."""
    run = make_run(tmp_path / "run", [BUSY7, BUSY7])
    path = trace_path(run, 1)
    if damage == "missing":
        os.remove(path)
    else:
        with open(path, "r+b") as fh:
            fh.truncate(os.path.getsize(path) // 2)
    loaded = report.load_run(run)
    assert [rt.status for rt in loaded.ranks] == ["finished", "damaged"]
    note = next(n for n in loaded.notes if path in n)
    assert ("missing" if damage == "missing" else "corrupt or truncated") in note and "Rank 1 is left out" in note
    assert report.main([run, "--no-figures"]) == 0
    text = (tmp_path / "run" / "report" / "report.md").read_text()
    assert path in text and "delete" not in text
    s = report.analyze_run(run)
    assert s.ranks[0].seconds["compute"] > 0 and s.ranks[1].busy == 0


def test_not_a_run_directory(tmp_path, capsys):
    (tmp_path / "some-dir").mkdir()
    (tmp_path / "some-dir" / "notes.txt").write_text("hello")
    with pytest.raises(ConfigError, match="not an mpff run directory"):
        report.load_run(str(tmp_path / "some-dir"))
    _expect_error(capsys, [str(tmp_path / "some-dir")], str(tmp_path / "some-dir"))
    _expect_error(capsys, [str(tmp_path / "nowhere")], str(tmp_path / "nowhere"))


def test_a_file_is_not_a_run_directory(tmp_path, capsys):
    # a file was "does not exist"; a run's own file names the run directory to pass instead
    from mpff import predict
    from mpff.analysis import export
    (tmp_path / "notes.txt").write_text("hello")
    err = _expect_error(capsys, [str(tmp_path / "notes.txt")], "notes.txt is a file, not a run directory; "
                        "pass the --out directory of an 'mpff train' run")
    assert "does not exist" not in err
    run = make_run(tmp_path / "run", [BUSY7])
    inside = os.path.join(run, "run.json")
    _expect_error(capsys, [inside], f"{inside} is a file, not a run directory; pass the run directory "
                  f"that holds it, {run}")
    _expect_error(capsys, [run, "--baseline", inside], "pass the run directory that holds it")
    for main, extra in ((predict.main, []), (export.main, ["--format", "chrome"])):  # they read runs alike
        assert main([inside, *extra]) == 2
        assert f"is a file, not a run directory; pass the run directory that holds it, {run}" in \
            capsys.readouterr().err
    assert not (tmp_path / "run" / "report").exists()
    # and a file as --out (it was "cannot write ... (File exists)")
    _expect_error(capsys, [run, "--out", str(tmp_path / "notes.txt")], "notes.txt is a file; a report is a "
                  "directory of files, choose another --out")
    assert predict.main([run, "--out", str(tmp_path / "notes.txt")]) == 2  # said before anything is read
    assert "notes.txt is a file; the prediction is a directory" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "hello"


def test_a_bad_baseline_is_an_error_too(tmp_path, capsys):
    run = make_run(tmp_path / "run", [BUSY7])
    _expect_error(capsys, [run, "--baseline", str(tmp_path)], str(tmp_path))


def test_usage_errors_return_2(capsys):
    assert report.main([]) == 2
    assert "usage: mpff report" in capsys.readouterr().err
    assert report.main(["--help"]) == 0


@pytest.mark.mpi
@pytest.mark.skipif(not (os.path.exists(MPIEXEC) and importlib.util.find_spec("mpi4py")),
                    reason="needs mpi4py and mpiexec beside the interpreter (pip install mpi4py mpich)")
def test_real_two_rank_run_adds_up(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, MPIR_CVAR_ENABLE_HEAVY_YIELD="1")  # 2 ranks may share fewer cores
    proc = subprocess.run(
        [MPIEXEC, "-n", "2", sys.executable, "-m", "mpi4py", "-m", "mpff", "train",
         "--config", os.path.join(ROOT, "configs", "tiny.toml"), "--set", "run.schedule=single_layer",
         "--set", "model.dims=[784,64,64,64]", "--set", "data.train_subset=2000",
         "--set", "data.test_subset=500", "--set", "run.report=false", "--out", str(out)],
        check=False, cwd=ROOT, env=env, timeout=600, capture_output=True, text=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    s = report.analyze_run(str(out))
    assert [r.rank for r in s.ranks] == [0, 1]
    for r in s.ranks:
        assert r.wall > 0
        assert sum(r.seconds.values()) == pytest.approx(r.wall, rel=0.01)
        assert r.clipped <= 0.01 * r.wall, "spans overlap or lie outside the rank's wall"
        assert r.seconds["compute"] > 0
    assert s.bytes_sent == s.bytes_received > 0
    assert s.bubble_modelled is not None and 0 <= s.bubble_modelled < 1, s.model_note
    assert sorted(s.accuracy_by_chapter) == [1, 2, 3, 4]
    assert report.main([str(out), "--no-figures"]) == 0
    assert (out / "report" / "trace.json").stat().st_size > 0


def test_a_run_recorded_before_a_setting_existed_is_rebuilt_as_it_ran(tmp_path):
    """Runs recorded before run.blocks, run.inputs and run.eval_placement existed ran with count
    blocks, recomputed inputs and every evaluation on the last rank: their task graph (bubble
    model, predictions) is rebuilt that way, not with today's defaults."""
    from fake_runs import make_config, make_run, sequential_spans

    from mpff.analysis.runs import load_run
    from mpff.trace import trace_path
    cfg = make_config("single_layer")
    old = make_run(tmp_path / "old", [sequential_spans(4)], cfg)
    with h5py.File(trace_path(old, 0), "a") as fh:  # as a trace of that time
        recorded = json.loads(fh.attrs["config"])
        for key in ("blocks", "inputs", "eval_placement"):
            del recorded["run"][key]
        fh.attrs["config"] = json.dumps(recorded)
    run = load_run(old)
    assert {k: run.config["run"][k] for k in ("blocks", "inputs", "eval_placement")} == \
        {"blocks": "count", "inputs": "recompute", "eval_placement": "last"}
    now = load_run(make_run(tmp_path / "new", [sequential_spans(4)],
                            cfg.replace(run={"eval_placement": "balanced", "blocks": "cost"})))
    assert now.config["run"]["eval_placement"] == "balanced" and now.config["run"]["blocks"] == "cost"
