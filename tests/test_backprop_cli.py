"""Backprop through ``mpff train``, as users run it: Sequential and data-parallel on 2 ranks give
the same outputs an FF run gives (run.json, traces, model.h5, progress lines, checkpoints,
preemption and resume), and FF-only settings are refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from mpff import load_model
from mpff.checkpoint import complete_checkpoints
from mpff.modelfile import weights_of

pytestmark = pytest.mark.mpi

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
MPIEXEC = os.path.join(os.path.dirname(PY), "mpiexec")
ENV = dict(os.environ, MPIR_CVAR_ENABLE_HEAVY_YIELD="1", OMP_NUM_THREADS="1")
BP = os.path.join(ROOT, "configs", "backprop.toml")
SMALL = ("model.dims=[784,64,64]", "data.train_subset=1200", "data.test_subset=300", "train.epochs=4",
         "train.chapters=4", "run.report=false")


def cmd(out, *settings, ranks=1, extra=()):
    args = ["train", "--config", BP, "--out", str(out), *extra]
    for s in SMALL + settings:
        args += ["--set", s]
    if ranks == 1:
        return [PY, "-m", "mpff", *args]
    return [MPIEXEC, "-n", str(ranks), PY, "-m", "mpi4py", "-m", "mpff", *args]


def run(c, timeout=300):
    return subprocess.run(c, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Sequential (1 rank) and data-parallel (2 ranks, strong and weak scaling) runs, two at a time."""
    base = tmp_path_factory.mktemp("bp")
    specs = {"seq": cmd(base / "seq"),
             "dp": cmd(base / "dp", "run.schedule=data_parallel", ranks=2),
             "weak": cmd(base / "weak", "run.schedule=data_parallel", "run.scaling=weak", ranks=2)}
    procs = {k: subprocess.Popen(c, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, c in list(specs.items())[:2]}
    out = {}
    for k, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        out[k] = (p.returncode, stdout, stderr, base / k)
    r = run(specs["weak"])
    out["weak"] = (r.returncode, r.stdout, r.stderr, base / "weak")
    return out


@pytest.mark.parametrize("name", ["seq", "dp", "weak"])
def test_a_backprop_run_writes_what_an_ff_run_writes(name, runs):
    rc, stdout, stderr, out = runs[name]
    assert rc == 0, stdout + stderr
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished" and info["algorithm"] == "backprop"
    ranks = 1 if name == "seq" else 2
    assert info["world_size"] == ranks and len(info["ranks"]) == ranks
    assert info["scaling"] == (None if name == "seq" else ("weak" if name == "weak" else "strong"))
    assert info["global_batch"] == (128 if name == "weak" else 64)
    assert sorted(info["accuracy_per_chapter"], key=int) == ["1", "2", "3", "4"]
    assert info["test_accuracy"] > 0.5  # 1200 samples, 4 epochs: well above chance
    for r in info["ranks"]:
        assert r["memory"]["rss_peak_bytes"] >= r["memory"]["rss_baseline_bytes"] > 0
        assert r["memory_analytic"]["algorithm"] == "backprop" and r["memory_analytic"]["peak"] > 0
    # progress lines, one per chapter, from rank 0 only
    assert [line.split()[1] for line in stdout.splitlines() if line.startswith("chapter")] == \
        ["1/4", "2/4", "3/4", "4/4"]
    # traces: training steps, eval, setup; gradient all-reduce on the data-parallel ranks
    for rank in range(ranks):
        with h5py.File(out / "trace" / f"rank{rank:04d}.h5", "r") as f:
            kinds = {k.decode() if isinstance(k, bytes) else str(k) for k in f["spans"]["kind"]}
        assert {"train", "setup"} <= kinds, kinds
        assert ("allreduce" in kinds) == (ranks > 1), kinds
        assert ("eval" in kinds) == (rank == 0), kinds
    # the model file reads back and predicts
    model = load_model(str(out / "model.h5"))
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28)).astype(np.uint8)
    assert model.predict(images).shape == (5,)


def test_data_parallel_strong_scaling_matches_sequential(runs):
    """The same global batch of 64: the same training, up to float summation order."""
    seq, dp = (weights_of(str(runs[k][3] / "model.h5")) for k in ("seq", "dp"))
    assert sorted(seq) == sorted(dp)
    for k in seq:
        if k.startswith("layers/"):
            np.testing.assert_allclose(dp[k], seq[k], rtol=0, atol=1e-4, err_msg=k)
    weak = weights_of(str(runs["weak"][3] / "model.h5"))
    assert any(not np.allclose(weak[k], seq[k], atol=1e-4) for k in seq if k.startswith("layers/"))


def test_data_parallel_preempted_and_resumed_ends_as_uninterrupted(runs, tmp_path):
    out = tmp_path / "run"
    settings = ("run.schedule=data_parallel", "train.epochs=40", "train.chapters=4", "run.checkpoint_every=1")
    proc = subprocess.Popen(cmd(out, *settings, ranks=2), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    while not any(c >= 1 for c, _ in complete_checkpoints(str(out))):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 75, stdout + stderr
    assert json.loads((out / "run.json").read_text())["status"] == "preempted"
    assert stderr.strip() == "", stderr
    resumed = run(cmd(out, *settings, ranks=2, extra=("--resume",)))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "mpff: resuming after chapter" in resumed.stdout
    plain = run(cmd(tmp_path / "plain", *settings, ranks=2))
    assert plain.returncode == 0, plain.stderr
    got, want = weights_of(str(out / "model.h5")), weights_of(str(tmp_path / "plain" / "model.h5"))
    for k in want:
        if k.startswith("layers/"):
            np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-5, err_msg=k)


@pytest.mark.parametrize("setting, message", [
    ("train.negatives=random", "train.negatives = 'random' is a Forward-Forward setting that backprop does not use"),
    ("run.schedule=all_layers", "run.schedule = 'all_layers' is a Forward-Forward schedule; backprop runs"),
    ("train.lr=0.1", "backprop's rate is train.bp_lr"),
])
def test_ff_only_settings_are_refused(setting, message, tmp_path):
    r = run(cmd(tmp_path / "run", setting))
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mpff train: error: ") and message in lines[0], r.stderr
    assert not (tmp_path / "run").exists()


def test_an_ff_preset_runs_as_backprop_with_one_note(tmp_path):
    """`--config workstation --set train.algorithm=backprop`: the preset's FF settings are set
    aside with one note line, and the same network trains as backprop."""
    out = tmp_path / "run"
    args = [PY, "-m", "mpff", "train", "--config", "workstation", "--out", str(out),
            "--set", "train.algorithm=backprop"]
    for s in SMALL[1:]:   # the preset's own dims
        args += ["--set", s]
    r = run(args)
    assert r.returncode == 0, r.stdout + r.stderr
    notes = [line for line in r.stdout.splitlines() if line.startswith("mpff: note:")]
    assert len(notes) == 1 and "train.negatives" in notes[0] and "run.schedule" in notes[0], r.stdout
    assert "Traceback" not in r.stderr
    with h5py.File(out / "model.h5", "r") as f:
        assert f.attrs["algorithm"] == "backprop" and list(f.attrs["dims"]) == [784, 500, 500]
    assert load_model(str(out / "model.h5")).predict(np.zeros((2, 784), np.uint8)).shape == (2,)


def _scalars(trace_file) -> dict[int, dict[str, float]]:
    """{chapter: {name: value}} of a trace's bp_* scalars."""
    out: dict[int, dict[str, float]] = {}
    with h5py.File(trace_file, "r") as f:
        for row in f["scalars"][()]:
            name = row["name"].decode() if isinstance(row["name"], bytes) else str(row["name"])
            if name.startswith("bp_"):
                out.setdefault(int(row["chapter"]), {})[name] = float(row["value"])
    return out


@pytest.mark.parametrize("name", ["seq", "dp", "weak"])
def test_step_phases_are_traced(name, runs):
    """Every chapter's steps, and the seconds of their forward, backward and optimizer phases,
    which lie within the chapter's train span."""
    out = runs[name][3]
    steps = 10 if name == "weak" else 19   # 1200 rows, global batch 128 or 64, one epoch a chapter
    for rank in range(1 if name == "seq" else 2):
        scalars = _scalars(out / "trace" / f"rank{rank:04d}.h5")
        with h5py.File(out / "trace" / f"rank{rank:04d}.h5", "r") as f:
            spans = f["spans"][()]
        train = {int(s["chapter"]): float(s["end"] - s["start"]) for s in spans if s["kind"] in (b"train", "train")}
        assert sorted(scalars) == sorted(train) == [1, 2, 3, 4]
        for c, values in scalars.items():
            assert values["bp_steps"] == steps
            phases = [values[f"bp_{p}_seconds"] for p in ("forward", "backward", "optimizer")]
            assert all(p > 0 for p in phases), values
            assert sum(phases) <= train[c], (values, train[c])


def _predict(*args):
    return run([PY, "-m", "mpff", "predict", *map(str, args)])


def test_predict_data_parallel_from_a_one_rank_run(runs, tmp_path):
    """mpff predict from a one-rank backprop run: Sequential and data-parallel rows, each
    data-parallel run compared with the prediction of its own scaling; DDP's buckets and bytes
    as the 2-rank run counted them; the source predicts itself closely."""
    seq, dp, weak = (runs[k][3] for k in ("seq", "dp", "weak"))
    for scaling, measured, global_batch in (("strong", dp, 64), ("weak", weak, 128)):
        r = _predict(seq, dp, weak, "--ranks", "1,2,4", "--ranks-per-node", "2", "--json",
                     "--set", f"run.scaling={scaling}", "--out", tmp_path / scaling)
        assert r.returncode == 0, r.stderr
        preds = {(p["schedule"], p["ranks"]): p for p in json.loads(r.stdout)["predictions"]}
        assert sorted(preds) == [("data_parallel", 2), ("data_parallel", 4), ("sequential", 1)]
        base, two = preds[("sequential", 1)], preds[("data_parallel", 2)]
        assert base["measured_run"] == str(seq) and base["speedup"] == 1.0
        assert abs(base["wall_error"]) < 0.1, base  # the source's own steps, evaluation and setup
        assert two["measured_run"] == str(measured), two
        assert two["details"]["global_batch"] == global_batch and preds[("data_parallel", 4)]["nodes"] == 2
        # DDP's buckets and bytes, as the measured run counted them
        info = json.loads((measured / "run.json").read_text())
        assert two["bytes_moved"] == sum(r["bytes_sent"] for r in info["ranks"])
        with h5py.File(measured / "trace" / "rank0000.h5", "r") as f:
            allreduces = sum(1 for k in f["spans"]["kind"] if k in (b"allreduce", "allreduce"))
        assert allreduces == two["details"]["buckets"] * two["details"]["steps"]
        assert (tmp_path / scaling / "prediction.md").exists()


@pytest.mark.parametrize("first, extra, message", [
    ("dp", (), "ran 2 ranks: predict backprop from a one-rank run"),
    ("seq", ("--schedules", "all_layers"), "is backprop: it predicts the schedules sequential, data_parallel"),
])
def test_predict_refuses_what_it_cannot_predict_from_backprop(first, extra, message, runs, tmp_path):
    r = _predict(runs[first][3], *extra, "--out", tmp_path / "p")
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mpff predict: error: ") and message in lines[0], r.stderr
    assert not (tmp_path / "p").exists()
