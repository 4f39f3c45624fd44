"""End to end, one process, through the command line: a small network on an MNIST subset learns.

FF learns slowly with the paper's learning rate (0.01): a few epochs of a small network on a
few thousand samples stay near chance. With lr 0.1 (and head_lr 0.01 for the softmax head)
the configurations below reach about 75-82 % test accuracy (seeds 0-3) in a few seconds of
training on one core. The assertion is 50 %: clearly better than chance (10 %).
"""

from __future__ import annotations

import json
import time

import pytest

E2E = {
    # classifier: settings (applied over configs/tiny.toml)
    "goodness": ("model.dims=[784,256,256]", "data.train_subset=6000", "data.test_subset=1000",
                 "train.epochs=8", "train.chapters=4", "train.lr=0.1", "train.negatives=random",
                 "train.classifier=goodness", "train.eval_every=2", "train.threads=1", "run.report=false"),
    "softmax": ("model.dims=[784,128,128]", "data.train_subset=5000", "data.test_subset=1000",
                "train.epochs=4", "train.chapters=4", "train.lr=0.1", "train.head_lr=0.01",
                "train.negatives=random", "train.classifier=softmax", "train.eval_every=2",
                "train.threads=1", "run.report=false"),
}


@pytest.fixture(scope="module")
def e2e_runs(tmp_path_factory, mpff_tiny_args, mpff_start, mpff_finish):
    """Both runs at once (one thread each: the machine has two cores)."""
    base = tmp_path_factory.mktemp("e2e")
    procs = {}
    for name, settings in E2E.items():
        args = mpff_tiny_args(base / name, *settings, tiny=False)
        procs[name] = (mpff_start(args), time.perf_counter())
    out = {}
    for name, (proc, start) in procs.items():
        done = mpff_finish(proc, timeout=600)
        out[name] = (done.returncode, done.stdout, done.stderr, time.perf_counter() - start, base / name)
    return out


@pytest.mark.parametrize("classifier", list(E2E))
def test_small_network_learns(e2e_runs, classifier):
    rc, stdout, stderr, wall, out = e2e_runs[classifier]
    assert rc == 0, stderr
    status = json.loads((out / "run.json").read_text())
    assert status["status"] == "finished"
    acc = status["test_accuracy"]
    print(f"{classifier}: test accuracy {acc:.3f}, training {status['wall_time']:.1f}s, process {wall:.1f}s")
    assert acc >= 0.5, f"{classifier} classifier reached only {100 * acc:.1f}% (chance: 10%)"
    per_chapter = {int(c): a for c, a in status["accuracy_per_chapter"].items()}
    assert sorted(per_chapter) == [2, 4]  # eval_every = 2 of 4 chapters, counted from 1
    assert per_chapter[4] == acc
    assert (out / "model.h5").is_file() and (out / "trace" / "rank0000.h5").is_file()
    assert "mpff: done in" in stdout and "test accuracy" in stdout
