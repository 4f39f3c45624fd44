"""Under mpiexec: every schedule gives the Sequential run's final weights bit for bit (SPEC section 2),
``mpff info`` sees every rank, and a rank that fails takes the job down.

The equivalence cases need: a deterministic negative policy (fixed, random, or adaptive with a
fixed lag), ``run.exchange = full`` (except Single Layer, whose owners keep their optimizer
state), one thread per rank and the same seed. Each Sequential reference runs once per session.

Every rank of every launch spends several CPU seconds importing torch, so a default selection
keeps the launches at 16: adaptive negatives on every (schedule, ranks) pair, fixed, random
and softmax once or twice; ``MPFF_TEST_FULL_MATRIX=1`` runs the whole cross product
(38 equivalence launches).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from xml.etree import ElementTree

import numpy as np
import pytest

from mpff.ff import cpu_bf16_products
from mpff.modelfile import weights_of

pytestmark = pytest.mark.mpi

FULL_MATRIX = os.environ.get("MPFF_TEST_FULL_MATRIX", "") not in ("", "0")

#: Over the tiny settings: 4 layers (Single Layer on up to 4 ranks), 4 chapters of 1 epoch.
BASE = ("model.dims=[784,16,16,16,16]", "train.epochs=4", "train.chapters=4", "train.threads=1",
        "train.seed=3")


@dataclass(frozen=True)
class Case:
    schedule: str
    ranks: int
    negatives: str
    classifier: str = "goodness"
    exchange: str = "full"
    inputs: str = "recompute"
    chapter_batches: int = 0   # 0: chapters of whole epochs

    @property
    def lag(self) -> int:
        if self.negatives != "adaptive":
            return 0
        return self.ranks - 1 if self.schedule == "federated" else 1

    @property
    def shards(self) -> int:
        return self.ranks if self.schedule == "federated" else 1

    @property
    def ref_key(self) -> tuple:
        return (self.negatives, self.classifier, self.lag, self.shards, self.chapter_batches)

    def settings(self) -> tuple[str, ...]:
        return BASE + (f"run.schedule={self.schedule}", f"run.exchange={self.exchange}",
                       f"train.negatives={self.negatives}", f"train.adaptive_lag={self.lag}",
                       f"train.classifier={self.classifier}", f"run.inputs={self.inputs}",
                       f"train.chapter_batches={self.chapter_batches}")

    def __str__(self) -> str:
        extra = "" if self.classifier == "goodness" else f"-{self.classifier}"
        extra += "" if self.exchange == "full" else f"-{self.exchange}"
        extra += "" if self.inputs == "recompute" else f"-{self.inputs}"
        extra += f"-k{self.chapter_batches}" if self.chapter_batches else ""
        return f"{self.schedule}-n{self.ranks}-{self.negatives}{extra}"


def reference_settings(key: tuple) -> tuple[str, ...]:
    negatives, classifier, lag, shards, chapter_batches = key
    return BASE + ("run.schedule=sequential", "run.exchange=full", f"train.negatives={negatives}",
                   f"train.adaptive_lag={lag}", f"train.classifier={classifier}", f"data.shards={shards}",
                   f"train.chapter_batches={chapter_batches}")


#: chapters of 50 batches (13 chapters of the 628 batches of 4 epochs, none aligned to an epoch)
SHORT_CHAPTERS = [Case("all_layers", 2, "random", chapter_batches=50),
                  Case("single_layer", 2, "adaptive", "softmax", chapter_batches=50),
                  Case("federated", 2, "adaptive", chapter_batches=50)]


def _equivalence_cases() -> list[Case]:
    pipelines = [(s, n) for s in ("single_layer", "all_layers") for n in (2, 3, 4)]
    if FULL_MATRIX:
        cases = [Case(s, n, neg) for neg in ("fixed", "random", "adaptive") for s, n in pipelines]
        cases += [Case("federated", n, neg) for neg in ("fixed", "random", "adaptive") for n in (2, 3)]
        cases += [Case(s, n, neg, "softmax") for neg in ("random", "adaptive") for s, n in pipelines]
        cases += [Case("federated", n, "adaptive", "softmax") for n in (2, 3)]
        return cases + SHORT_CHAPTERS
    # adaptive negatives (the demanding policy: negatives travel, made from a whole network) on
    # every pipeline shape; fixed and random once each (the weights-exchange tests below add
    # random on single_layer with 4 ranks and on all_layers with 2); softmax where the head
    # and its optimizer state travel around the ring
    cases = [Case(s, n, "adaptive") for s, n in pipelines]
    cases += [Case("single_layer", 2, "fixed"), Case("all_layers", 2, "random")]
    cases += [Case("federated", 3, "random"), Case("federated", 2, "adaptive"),
              Case("federated", 3, "adaptive")]
    cases += [Case("all_layers", 3, "adaptive", "softmax")]
    # shipped inputs: the next block's rank gets the outputs instead of recomputing them
    cases += [Case("single_layer", 2, "adaptive", inputs="ship"), Case("single_layer", 3, "random", inputs="ship")]
    cases += SHORT_CHAPTERS
    return cases


EQUIVALENCE = _equivalence_cases()
#: Single Layer owners keep their layer's optimizer state: shipping weights only changes nothing.
WEIGHTS_ONLY_SAME = Case("single_layer", 4, "random", exchange="weights")
#: All Layers hands each layer to another rank every chapter: without the Adam state it differs.
WEIGHTS_ONLY_DIFFERENT = Case("all_layers", 2, "random", exchange="weights")


@pytest.fixture(scope="session")
def references(request, tmp_path_factory, mpff_run, mpff_tiny_args):
    """Sequential reference runs: every one the selected tests need, two at a time."""
    keys = set()
    for item in request.session.items:
        case = getattr(item, "callspec", None) and item.callspec.params.get("case")
        if isinstance(case, Case):
            keys.add(case.ref_key)
    for case in (WEIGHTS_ONLY_SAME, WEIGHTS_ONLY_DIFFERENT):
        keys.add(case.ref_key)
    base = tmp_path_factory.mktemp("references")

    def run(key):
        out = base / "-".join(map(str, key))
        mpff_run(mpff_tiny_args(out, *reference_settings(key)), check=True, timeout=600)
        return key, out

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(run, sorted(keys)))


def _assert_same_weights(run_dir, ref_dir) -> None:
    got, want = weights_of(str(run_dir / "model.h5")), weights_of(str(ref_dir / "model.h5"))
    assert sorted(got) == sorted(want)
    assert any(k.startswith("layers/") for k in want) and "head/weight" in want
    different = [k for k in sorted(want) if not np.array_equal(got[k], want[k])]
    assert not different, f"arrays that differ from the sequential run: {different}"


def _run(case: Case, out, mpff_run, mpff_tiny_args):
    proc = mpff_run(mpff_tiny_args(out, *case.settings()), ranks=case.ranks, check=True, timeout=600)
    return proc


@pytest.mark.parametrize("case", EQUIVALENCE, ids=str)
def test_schedule_matches_sequential(case, references, tmp_path, mpff_run, mpff_tiny_args):
    out = tmp_path / "run"
    _run(case, out, mpff_run, mpff_tiny_args)
    ref = references[case.ref_key]
    _assert_same_weights(out, ref)
    status, ref_status = (json.loads((d / "run.json").read_text()) for d in (out, ref))
    assert status["status"] == "finished" and status["world_size"] == case.ranks
    assert status["schedule"] == case.schedule
    assert status["accuracy_per_chapter"] == ref_status["accuracy_per_chapter"]
    assert len(os.listdir(out / "trace")) == case.ranks


def test_references_differ(references):
    """The equivalence tests have power: the negative policy changes the final weights."""
    fixed = weights_of(str(references[("fixed", "goodness", 0, 1, 0)] / "model.h5"))
    others = [("random", "goodness", 0, 1, 0), ("adaptive", "goodness", 1, 1, 0), ("fixed", "goodness", 0, 2, 0)]
    random = weights_of(str(references[("random", "goodness", 0, 1, 0)] / "model.h5"))
    fifty = weights_of(str(references[("random", "goodness", 0, 1, 50)] / "model.h5"))
    assert not np.array_equal(fifty["layers/3/weight"], random["layers/3/weight"])  # chapters of 50 batches
    for key in others:
        if key in references:
            w = weights_of(str(references[key] / "model.h5"))
            assert not np.array_equal(w["layers/3/weight"], fixed["layers/3/weight"]), key


def test_single_layer_weights_exchange_matches_sequential(references, tmp_path, mpff_run, mpff_tiny_args):
    out = tmp_path / "run"
    _run(WEIGHTS_ONLY_SAME, out, mpff_run, mpff_tiny_args)
    _assert_same_weights(out, references[WEIGHTS_ONLY_SAME.ref_key])


def test_all_layers_weights_exchange_differs(references, tmp_path, mpff_run, mpff_tiny_args):
    out = tmp_path / "run"
    _run(WEIGHTS_ONLY_DIFFERENT, out, mpff_run, mpff_tiny_args)
    got = weights_of(str(out / "model.h5"))
    want = weights_of(str(references[WEIGHTS_ONLY_DIFFERENT.ref_key] / "model.h5"))
    # the first chapter starts from the same fresh Adam state everywhere; later ones do not
    assert not np.array_equal(got["layers/0/weight"], want["layers/0/weight"])


def test_info_lists_every_rank(mpff_run):
    proc = mpff_run(["info"], ranks=2)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "world size: 2" in lines
    host = socket.gethostname()
    for rank in (0, 1):
        row = [line for line in lines if line.strip().startswith(f"rank {rank}:")]
        assert len(row) == 1, proc.stdout
        assert f"host {host}" in row[0] and "device cpu" in row[0]
    assert any(line.startswith("MPI: ") for line in lines)


FAILING = textwrap.dedent("""
    import sys, time

    import mpff.ffstate
    import mpff.train  # noqa: F401  (the real training code, patched below)

    _original = mpff.ffstate.FFState._do_train

    def _do_train(self, task):
        if self.rank == 1 and task.chapter == 1:
            with open(sys.argv[1], "w") as fh:
                fh.write(repr(time.time()))
            raise RuntimeError("injected failure on rank 1")
        return _original(self, task)

    mpff.ffstate.FFState._do_train = _do_train

    import mpff.cli

    sys.exit(mpff.cli.main(sys.argv[2:]))
""")


def test_a_failing_rank_takes_the_job_down(tmp_path, mpff_tiny_args, mpff_start, mpff_finish):
    script = tmp_path / "failing.py"
    script.write_text(FAILING)
    stamp = tmp_path / "raised-at"
    out = tmp_path / "run"
    args = mpff_tiny_args(out, *BASE, "run.schedule=single_layer", "train.negatives=fixed")
    # mpiexec -n 2 python -m mpi4py failing.py STAMP train ...
    proc = mpff_start(args, ranks=2, module=(str(script), str(stamp)))
    done = mpff_finish(proc, timeout=180)  # fails the test if the job is still running then
    ended = time.time()
    stdout, stderr = done.stdout, done.stderr
    assert stamp.exists(), f"the failure was never injected\n{stderr[-3000:]}"
    raised = float(stamp.read_text())
    assert done.returncode != 0
    assert ended - raised < 30, f"the job took {ended - raised:.1f}s to end after rank 1 failed"
    assert "RuntimeError: injected failure on rank 1" in stderr + stdout
    assert "injected failure on rank 1" in (out / "failure-rank1.txt").read_text()
    assert '"status": "finished"' not in (out / "run.json").read_text()
    assert not (out / "model.h5").exists()


# Each rank leaves through mpff's own exit path; rank 1's wrapper lingers after its Python is gone
# (as a job epilogue or a slow exit would). MPICH sends PMI "finalize" from a C atexit hook: a
# rank that skipped it (os._exit) looked crashed to Hydra, which SIGKILLed the lingering rank
# and reported signal 9 for a job whose ranks had all exited cleanly (about half the launches).
LEAVE = textwrap.dedent("""
    import sys
    from mpi4py import MPI
    from mpff.__main__ import _exit
    MPI.COMM_WORLD.Barrier()
    _exit(int(sys.argv[1]))
""")
LINGER = '"$0" -m mpi4py "$@"; rc=$?; [ "$PMI_RANK" = 1 ] && sleep 0.3; exit $rc'


def test_ranks_leaving_apart_keep_their_exit_code(tmp_path, mpff_launch):
    script = tmp_path / "leave.py"
    script.write_text(LEAVE)
    for attempt, code in enumerate([0, 2] * 4):
        proc = subprocess.run([mpff_launch.mpiexec, "-n", "2", "sh", "-c", LINGER, mpff_launch.python, str(script),
                               str(code)], cwd=mpff_launch.root, env=mpff_launch.env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == code, f"launch {attempt}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}"
        assert "BAD TERMINATION" not in proc.stdout, proc.stdout


@pytest.mark.parametrize("ranks", [2, 3])
def test_executor_suite_at_several_sizes(ranks, tmp_path, mpff_launch):
    """tests/test_executor.py, whose bodies hold at any size, run under mpiexec as mpi4py runs its
    own suite at several -n (in this process it runs on one rank). Each rank writes its own JUnit
    report (named by its process id): the ranks' merged stdout can interleave two summaries on one
    line, so it is no record of what each rank ran."""
    per_rank = 'exec "$0" -m pytest -q -p no:cacheprovider tests/test_executor.py --junitxml="$1/rank-$$.xml"'
    proc = subprocess.run([mpff_launch.mpiexec, "-n", str(ranks), "sh", "-c", per_rank, mpff_launch.python,
                           str(tmp_path)], cwd=mpff_launch.root, env=mpff_launch.env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    reports = sorted(tmp_path.glob("rank-*.xml"))
    assert len(reports) == ranks, (reports, proc.stdout[-4000:])  # every rank ran the suite
    for report in reports:
        suite = ElementTree.parse(report).getroot().find("testsuite")
        counts = {key: int(suite.get(key)) for key in ("tests", "failures", "errors", "skipped")}
        assert counts["failures"] == counts["errors"] == 0, (report.name, counts)
        assert counts["tests"] - counts["skipped"] >= 10, (report.name, counts)  # the suite ran, not skipped


@pytest.mark.skipif(not cpu_bf16_products(), reason="this CPU computes no bf16 products (mpff refuses bf16 here)")
def test_bf16_products_are_bit_identical_across_schedules(tmp_path, mpff_run, mpff_tiny_args):
    """Within one matmul precision the schedules still give Sequential's weights bit for bit."""
    common = BASE + ("train.precision=bf16", "run.exchange=full", "train.negatives=random")
    seq, sl = tmp_path / "seq", tmp_path / "sl"
    mpff_run(mpff_tiny_args(seq, *common, "run.schedule=sequential"), check=True)
    mpff_run(mpff_tiny_args(sl, *common, "run.schedule=single_layer"), ranks=2, check=True)
    _assert_same_weights(sl, seq)
    fp32 = tmp_path / "fp32"
    mpff_run(mpff_tiny_args(fp32, *BASE, "run.exchange=full", "train.negatives=random",
                            "run.schedule=sequential"), check=True)
    assert not np.array_equal(weights_of(str(fp32 / "model.h5"))["layers/0/weight"],
                              weights_of(str(seq / "model.h5"))["layers/0/weight"])
