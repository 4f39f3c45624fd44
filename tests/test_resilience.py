"""Preemption, crashes and damaged checkpoints, with real runs of ``mpff train``.

With ``run.exchange = "full"`` every schedule computes bit for bit the weights of the
sequential run, and a run stopped at a chapter boundary and resumed from its checkpoint must
end with those same weights. So one uninterrupted sequential run is the reference for all of
these tests (when a comparison fails, the test also runs the schedule uninterrupted to say
whether the resume or the schedule is at fault).

Each process pays seconds of CPU for importing torch, so the runs go in two batches, a few
at a time (a small machine finishes a batch sooner than its runs one after another):

1. ``first_runs``: the reference; per schedule a run that gets SIGTERM as soon as its checkpoint
   c00002 (two chapters done) is complete; an all_layers run whose rank 1 gets SIGKILL once c00001 is complete.
2. ``resumed``: copies of those runs resumed (one after a simulated interrupted checkpoint
   write, on 1 rank; the killed one on 3 ranks).

The tests check what the batches left. Runs are small but take seconds, so a stop lands
mid-run; if a run finishes before it is signalled, make BASE bigger rather than skipping.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from mpff.checkpoint import complete_checkpoints
from mpff.config import tomllib
from mpff.modelfile import weights_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.toml")
PY = sys.executable
MPIEXEC = os.path.join(os.path.dirname(PY), "mpiexec")
ENV = dict(os.environ, MPIR_CVAR_ENABLE_HEAVY_YIELD="1")  # ranks outnumber cores here
ENV.setdefault("OMP_NUM_THREADS", "1")
EXIT_PREEMPTED = 75
RUN_TIMEOUT = 400     # seconds for a batch of runs on a loaded machine
STOP_TIMEOUT = 60     # seconds from SIGTERM to the job's exit
KILL_TIMEOUT = 30     # seconds from SIGKILL of one rank to the job's exit
SLOTS = 3             # ranks running at once in a batch (2 cores; more only adds contention)

#: 12 chapters of 1 epoch on 2000 samples, a checkpoint after every chapter.
BASE = ["--config", TINY, "-q"] + [x for kv in (
    "run.exchange=full", "run.report=false", "run.checkpoint_every=1", "train.epochs=12",
    "train.chapters=12", "data.train_subset=2000", "data.test_subset=500", "model.dims=[784,64,64]")
    for x in ("--set", kv)]
CHAPTERS = 12
LAYERS = 2

SCHEDULES = [("sequential", 1), ("single_layer", 2), ("all_layers", 2)]

pytestmark = [
    pytest.mark.mpi,
    pytest.mark.skipif(not (os.path.exists(MPIEXEC) and importlib.util.find_spec("mpi4py")),
                       reason="needs mpi4py and mpiexec beside the interpreter (pip install mpi4py mpich)"),
]


# ---------------------------------------------------------------------------- running


class Job:
    """``mpff train`` on ``ranks`` ranks (a plain process for 1), in a session of its own."""

    def __init__(self, ranks: int, out: str, *args: str, logs: str) -> None:
        train = ["-m", "mpff", "train", *args, "--out", out]
        cmd = [PY, *train] if ranks == 1 else [MPIEXEC, "-n", str(ranks), PY, "-m", "mpi4py", *train]
        self.ranks = ranks
        self.out = out
        self.log = os.path.join(logs, f"{os.path.basename(out)}-{time.monotonic_ns()}")
        self.signalled_at: float | None = None
        self.ended_at: float | None = None
        with open(self.log + ".out", "w") as out_fh, open(self.log + ".err", "w") as err_fh:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdin=subprocess.DEVNULL,
                                         stdout=out_fh, stderr=err_fh, start_new_session=True)
        _started.append(self.proc)

    def wait(self, timeout: float = RUN_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout}s\n{self.output()}") from None

    @property
    def stdout(self) -> str:
        with open(self.log + ".out") as fh:
            return fh.read()

    @property
    def stderr(self) -> str:
        with open(self.log + ".err") as fh:
            return fh.read()

    def output(self) -> str:
        return f"exit {self.proc.poll()}\n--- stdout\n{self.stdout[-4000:]}\n--- stderr\n{self.stderr[-4000:]}"


_started: list[subprocess.Popen] = []


@pytest.fixture(autouse=True, scope="module")
def _end_leftover_jobs():
    """A failed test may leave a job running: end the process groups this module started."""
    yield
    for proc in _started:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def checkpoint_complete(run_dir: str, chapter: int, world: int) -> bool:
    d = os.path.join(run_dir, "checkpoints", f"c{chapter:05d}")
    return all(os.path.exists(os.path.join(d, f"rank{r:04d}.h5")) for r in range(world))


def newest_complete(run_dir: str) -> int:
    found = complete_checkpoints(run_dir)
    assert found, f"no complete checkpoint in {run_dir}"
    return found[0][0]


def run_json(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "run.json")) as fh:
        return json.load(fh)


def tree_digest(path: str) -> dict[str, str]:
    out = {}
    for d, dirs, files in os.walk(path):
        for name in dirs:
            out[os.path.relpath(os.path.join(d, name), path)] = "dir"
        for name in files:
            with open(os.path.join(d, name), "rb") as fh:
                out[os.path.relpath(os.path.join(d, name), path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def copy_run(src: str, dst: str) -> str:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def differing(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> list[str]:
    return sorted(k for k in a.keys() | b.keys()
                  if k not in a or k not in b or a[k].shape != b[k].shape or not np.array_equal(a[k], b[k]))


def rank_pids(root_pid: int) -> dict[int, int]:
    """{MPI rank: pid} of the ranks below ``root_pid`` (mpiexec), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.split("/")[2]))
    ranks, todo = {}, list(children.get(root_pid, []))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                env = dict(kv.split(b"=", 1) for kv in fh.read().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if b"PMI_RANK" in env:
            ranks[int(env[b"PMI_RANK"])] = pid
    return ranks


def sigterm(job: Job) -> None:
    job.proc.send_signal(signal.SIGTERM)  # mpiexec forwards it to every rank


def sigkill_rank_1(job: Job) -> None:
    pids = rank_pids(job.proc.pid)
    assert sorted(pids) == list(range(job.ranks)), f"ranks found: {pids}"
    os.kill(pids[1], signal.SIGKILL)


def interrupt_newest_write(run_dir: str) -> None:
    """As if rank 1 died writing the newest checkpoint (its temporary file is left, its rank file
    is missing) and a later checkpoint had just been begun (a temporary file only)."""
    newest = newest_complete(run_dir)
    ckpt = os.path.join(run_dir, "checkpoints")
    os.unlink(os.path.join(ckpt, f"c{newest:05d}", "rank0001.h5"))
    for path in (os.path.join(ckpt, f"c{newest:05d}", ".tmp-interrupted.h5"),
                 os.path.join(ckpt, f"c{newest + 1:05d}", ".tmp-begun.h5")):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(b"\x89HDF\r\n\x1a\n" + os.urandom(300))  # a cut-off HDF5 file


# ---------------------------------------------------------------------------- the two batches


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("resilience"))


class Spec:
    """A job to start in a batch, and optionally what to do once checkpoint ``chapter`` of its
    run is complete (``act(job)``)."""

    def __init__(self, ranks: int, out: str, *args: str, chapter: int | None = None, act=None) -> None:
        self.ranks, self.out, self.args = ranks, out, args
        self.chapter, self.act = chapter, act


def run_batch(specs: dict[str, Spec], logs: str) -> dict[str, Job]:
    """Runs the specs, in order as far as they fit, with at most SLOTS ranks at a time (a job
    bigger than that runs alone), acts on each as its checkpoint completes, and waits for all."""
    jobs: dict[str, Job] = {}
    queue = list(specs)
    deadline = time.monotonic() + RUN_TIMEOUT
    while True:
        now = time.monotonic()
        running = [j for j in jobs.values() if j.ended_at is None]
        busy = sum(j.ranks for j in running)
        for name in list(queue):  # first fit
            spec = specs[name]
            if running and busy + spec.ranks > SLOTS:
                continue
            queue.remove(name)
            jobs[name] = job = Job(spec.ranks, spec.out, *spec.args, logs=logs)
            running.append(job)
            busy += job.ranks
        for name, job in jobs.items():
            spec = specs[name]
            if (spec.act is not None and job.signalled_at is None and job.ended_at is None
                    and checkpoint_complete(job.out, spec.chapter, job.ranks)):
                spec.act(job)
                job.signalled_at = now
            if job.ended_at is None and job.proc.poll() is not None:
                job.ended_at = now
                if spec.act is not None and job.signalled_at is None:
                    raise AssertionError(f"{name}: the run ended before its checkpoint c{spec.chapter:05d} "
                                         f"was complete; if it finished, make BASE bigger\n{job.output()}")
        if not queue and all(j.ended_at is not None for j in jobs.values()):
            return jobs
        stuck = [n for n, j in jobs.items() if j.ended_at is None and (
            now > deadline or (j.signalled_at is not None and now - j.signalled_at > STOP_TIMEOUT))]
        if stuck:
            return jobs  # the tests report what did not end
        time.sleep(0.02)


@pytest.fixture(scope="module")
def first_runs(work) -> dict[str, Job]:
    """Keys: the schedules (stopped by SIGTERM after c00002), "killed", "reference"."""
    specs = {"killed": Spec(2, os.path.join(work, "killed"), *BASE, "--set", "run.schedule=all_layers",
                            chapter=1, act=sigkill_rank_1)}
    for schedule, ranks in reversed(SCHEDULES):
        specs[schedule] = Spec(ranks, os.path.join(work, f"stopped-{schedule}"), *BASE,
                               "--set", f"run.schedule={schedule}", chapter=2, act=sigterm)
    specs["reference"] = Spec(1, os.path.join(work, "reference"), *BASE)
    return run_batch(specs, work)


#: name -> (run of the first batch, ranks to resume on)
RESUMES = {
    "killed-on-3": ("killed", 3),
    "single_layer": ("single_layer", 2),
    "all_layers": ("all_layers", 2),
    "sequential": ("sequential", 1),
    "interrupted-write": ("all_layers", 1),
}


@pytest.fixture(scope="module")
def resumed(first_runs, work) -> dict[str, tuple[Job, int]]:
    """name -> (the resumed job, the newest complete checkpoint it should resume after).
    Each resumes a copy, so the first batch's directories stay as they were left."""
    specs, newest = {}, {}
    for name, (source, ranks) in RESUMES.items():
        run_dir = copy_run(first_runs[source].out, os.path.join(work, f"resumed-{name}"))
        if name == "interrupted-write":
            interrupt_newest_write(run_dir)
        newest[name] = newest_complete(run_dir)
        specs[name] = Spec(ranks, run_dir, "--resume", "-q")
    jobs = run_batch(specs, work)
    return {name: (job, newest[name]) for name, job in jobs.items()}


@pytest.fixture(scope="module")
def reference_run(first_runs) -> str:
    job = first_runs["reference"]
    assert job.proc.returncode == 0, job.output()
    return job.out


@pytest.fixture(scope="module")
def reference(reference_run) -> dict[str, np.ndarray]:
    """Final weights of the uninterrupted sequential run."""
    return weights_of(os.path.join(reference_run, "model.h5"))


@pytest.fixture
def same_as_reference(reference, work):
    def check(run_dir: str, schedule: str, ranks: int) -> None:
        got = weights_of(os.path.join(run_dir, "model.h5"))
        bad = differing(got, reference)
        if not bad:
            return
        # which is it: the resume, or the schedule itself?
        plain = Job(ranks, os.path.join(work, f"uninterrupted-{schedule}-{ranks}-{time.monotonic_ns()}"),
                    *BASE, "--set", f"run.schedule={schedule}", logs=work)
        assert plain.wait() == 0, plain.output()
        schedule_bad = differing(weights_of(os.path.join(plain.out, "model.h5")), reference)
        cause = (f"the uninterrupted {schedule} run on {ranks} ranks differs from sequential too "
                 f"({schedule_bad}): a schedule bug, not a resume bug" if schedule_bad else
                 f"the uninterrupted {schedule} run matches sequential: the resume is at fault")
        raise AssertionError(f"{run_dir}: final weights differ from the uninterrupted run in {bad}; {cause}")
    return check


def assert_resumed_to_the_end(job: Job, chapter: int, old_world: int) -> None:
    """The resumed job ran to the end, starting after checkpoint ``chapter`` (chapters done,
    counted from 1 as the checkpoint directories are)."""
    assert job.proc.returncode == 0, job.output()
    assert (f"mpff: resuming after chapter {chapter} from a {old_world}-rank checkpoint"
            in job.stdout), job.output()
    state = run_json(job.out)
    assert state["status"] == "finished", state
    assert state["world_size"] == job.ranks
    assert os.path.exists(os.path.join(job.out, "model.h5"))
    assert not os.path.exists(os.path.join(job.out, ".lock"))


# ---------------------------------------------------------------------------- SIGTERM and resume


@pytest.mark.parametrize("schedule,ranks", SCHEDULES, ids=[s for s, _ in SCHEDULES])
def test_sigterm_stops_the_run(schedule, ranks, first_runs):
    """Exit 75, run.json "preempted" with the newest complete checkpoint, no model, no lock."""
    job = first_runs[schedule]
    assert job.proc.returncode == EXIT_PREEMPTED, f"want exit {EXIT_PREEMPTED} after SIGTERM\n{job.output()}"
    state = run_json(job.out)
    assert state["status"] == "preempted", state
    assert state["signal"] == signal.SIGTERM, state
    newest = newest_complete(job.out)
    assert newest >= 2 and state["newest_complete_checkpoint"] == newest, state
    assert newest < CHAPTERS and not os.path.exists(os.path.join(job.out, "model.h5")), \
        f"the run was not stopped mid-run; make BASE bigger\n{job.output()}"
    assert (f"mpff: stopped by signal {int(signal.SIGTERM)}; resume with --resume from after chapter "
            f"{newest}") in job.stdout, job.output()
    assert not os.path.exists(os.path.join(job.out, ".lock")), "a stopped run keeps its lock"
    assert job.stderr.strip() == "", job.output()


@pytest.mark.parametrize("schedule,ranks", SCHEDULES, ids=[s for s, _ in SCHEDULES])
def test_sigterm_then_resume_is_bit_identical(schedule, ranks, resumed, same_as_reference):
    job, newest = resumed[schedule]
    assert_resumed_to_the_end(job, newest, ranks)
    same_as_reference(job.out, schedule, ranks)


def test_single_layer_refuses_more_ranks_than_layers(first_runs, work, tmp_path):
    run_dir = copy_run(first_runs["single_layer"].out, str(tmp_path / "run"))
    before = tree_digest(run_dir)
    job = Job(LAYERS + 1, run_dir, "--resume", "-q", logs=work)
    assert job.wait() == 2, job.output()
    assert job.stderr.splitlines() == [
        f"mpff train: error: single_layer needs at most one rank per layer: {LAYERS + 1} ranks for "
        f"{LAYERS} layers; run with -n {LAYERS} or fewer, or use all_layers"], job.output()
    assert tree_digest(run_dir) == before


@pytest.mark.parametrize("schedule", [s for s, _ in SCHEDULES])
def test_resumed_run_keeps_the_accuracy_of_every_chapter(schedule, resumed, reference_run):
    """The finished run.json of a stopped-and-resumed run lists the test accuracy of every
    chapter, equal (bit-identical runs) to the uninterrupted run's; on several ranks too, where
    the other ranks' evaluations reach rank 0 as messages (a halt must not lose them)."""
    job, _ = resumed[schedule]
    assert job.proc.returncode == 0, job.output()
    assert run_json(job.out)["accuracy_per_chapter"] == run_json(reference_run)["accuracy_per_chapter"]


# ---------------------------------------------------------------------------- damaged checkpoints


def test_interrupted_checkpoint_write_falls_back(first_runs, resumed, same_as_reference):
    """Temporary files are ignored and a checkpoint missing a rank's file is incomplete: the
    resume starts from the one before (here on 1 rank, from the 2-rank checkpoint)."""
    job, newest = resumed["interrupted-write"]
    assert newest == newest_complete(first_runs["all_layers"].out) - 1
    assert_resumed_to_the_end(job, newest, 2)
    same_as_reference(job.out, "all_layers", 1)


@pytest.mark.parametrize("rank", [0, 1])
def test_corrupt_checkpoint_file_is_refused(rank, first_runs, work, tmp_path):
    """A complete checkpoint with a truncated rank file (disk trouble; atomic writes never leave
    one): refuse with exit 2 naming the file, change nothing, and say how to go on."""
    run_dir = copy_run(first_runs["all_layers"].out, str(tmp_path / "run"))
    newest = newest_complete(run_dir)
    d = os.path.join(run_dir, "checkpoints", f"c{newest:05d}")
    path = os.path.join(d, f"rank{rank:04d}.h5")
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)
    before = tree_digest(run_dir)
    job = Job(1, run_dir, "--resume", "-q", logs=work)
    assert job.wait() == 2, job.output()
    lines = job.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mpff train: error: "), job.output()
    assert f"checkpoint file {path!r} is corrupt or unreadable" in lines[0], job.output()
    assert f"delete {d!r} to resume from an older checkpoint" in lines[0], job.output()
    assert tree_digest(run_dir) == before
    shutil.rmtree(d)  # the advice: then the previous checkpoint is the newest complete one
    assert newest_complete(run_dir) == newest - 1


# ---------------------------------------------------------------------------- a rank killed


def test_sigkill_of_one_rank_ends_the_job(first_runs):
    job = first_runs["killed"]
    assert job.ended_at is not None and job.ended_at - job.signalled_at < KILL_TIMEOUT, \
        f"the job did not end within {KILL_TIMEOUT}s of SIGKILL to rank 1\n{job.output()}"
    assert job.proc.returncode != 0, job.output()
    assert not os.path.exists(os.path.join(job.out, "model.h5"))
    # never finished or preempted: "running" when no rank lived to say more, or "failed" with the
    # reason when a rank saw its peer vanish (an MPI error) before the job was taken down
    state = run_json(job.out)
    assert state["status"] in ("running", "failed"), state
    if state["status"] == "failed":
        assert state["reason"] and state["exit_code"] == 1, state
    lock = os.path.join(job.out, ".lock")
    if os.path.exists(lock):  # left behind: it must name the dead rank 0 on this host (stale)
        with open(lock) as fh:
            host, pid = fh.read().split()[:2]
        assert host == socket.gethostname()
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid), 0)


def test_sigkill_leaves_the_last_checkpoint_intact(first_runs):
    """Every file of the newest complete checkpoint opens and every array reads; together they
    hold every layer after that chapter."""
    run_dir = first_runs["killed"].out
    newest = newest_complete(run_dir)
    files = sorted(glob.glob(os.path.join(run_dir, "checkpoints", f"c{newest:05d}", "rank*.h5")))
    assert len(files) == 2
    arrays: dict[str, np.ndarray] = {}

    def read(name: str, obj) -> None:
        if isinstance(obj, h5py.Dataset):
            arrays[name] = obj[()]

    for path in files:
        with h5py.File(path, "r") as f:
            assert f.attrs["format"] == "mpff-checkpoint" and int(f.attrs["chapter"]) == newest
            assert int(f.attrs["world_size"]) == 2
            f.visititems(read)
    assert {f"buffers/layer/{k}" for k in range(LAYERS)} <= set(arrays), sorted(arrays)
    assert all(np.all(np.isfinite(a)) for a in arrays.values())


def test_sigkill_then_resume_on_more_ranks_is_bit_identical(resumed, same_as_reference):
    """The all_layers run whose rank was killed on 2 ranks is resumed on 3 (all_layers deals
    chapters round robin to any number of ranks): the dead job's lock, if left, is stale on this
    host, and the run ends with the uninterrupted run's weights. (Its SIGTERM twin resumes on 2
    ranks above, and on 1 rank in test_interrupted_checkpoint_write_falls_back.)"""
    job, newest = resumed["killed-on-3"]
    assert_resumed_to_the_end(job, newest, 2)
    same_as_reference(job.out, "all_layers", 3)


# ---------------------------------------------------------------------------- moved evaluations

#: Single Layer where evaluations outweigh training (2000 test samples, 1000 training): the
#: balanced placement moves every other one to rank 0, two chapters late, so checkpoints are
#: taken while a moved evaluation of an earlier chapter is still to run there
MOVED = BASE + [x for kv in ("run.schedule=single_layer", "data.train_subset=1000", "data.test_subset=2000")
                for x in ("--set", kv)]


def test_moved_evaluations_survive_a_stop_and_resume(work):
    from mpff.config import load
    from mpff.plan import build_plan
    cfg = load(TINY).replace(model={"dims": (784, 64, 64)}, train={"epochs": CHAPTERS, "chapters": CHAPTERS},
                             data={"train_subset": 1000, "test_subset": 2000},
                             run={"schedule": "single_layer", "exchange": "full"})
    moved = build_plan(cfg, 2, n_train=1000).moved_evals
    assert moved and set(moved.values()) == {0}, moved  # the case this test is about
    jobs = run_batch({"plain": Spec(2, os.path.join(work, "moved-plain"), *MOVED),
                      "stopped": Spec(2, os.path.join(work, "moved-stopped"), *MOVED, chapter=4, act=sigterm)},
                     work)
    plain, stopped = jobs["plain"], jobs["stopped"]
    assert plain.proc.returncode == 0, plain.output()
    assert stopped.proc.returncode == EXIT_PREEMPTED, stopped.output()
    newest = newest_complete(stopped.out)
    assert newest < CHAPTERS, stopped.output()
    resumed = run_batch({"resumed": Spec(2, stopped.out, "--resume", "-q")}, work)["resumed"]
    assert_resumed_to_the_end(resumed, newest, 2)
    want, got = run_json(plain.out), run_json(resumed.out)
    # every chapter evaluated, each with the network of its own chapter, as without the stop
    assert sorted(got["accuracy_per_chapter"], key=int) == [str(c) for c in range(1, CHAPTERS + 1)]
    assert got["accuracy_per_chapter"] == want["accuracy_per_chapter"]
    assert differing(weights_of(os.path.join(resumed.out, "model.h5")),
                     weights_of(os.path.join(plain.out, "model.h5"))) == []


def test_a_resume_that_changes_settings_is_what_the_next_resume_reads(work):
    """A run stopped on 1 rank (Sequential) is resumed on 2 ranks with another schedule, and
    stopped again: the resumed attempt wrote config.toml anew, so a plain --resume (as the SLURM
    scripts issue after every requeue) continues with the settings that ran last. (config.toml
    used to keep the first settings, and that --resume refused: Sequential runs on one rank.)"""
    out = os.path.join(work, "changed")
    first = run_batch({"first": Spec(1, out, *BASE, chapter=2, act=sigterm)}, work)["first"]
    assert first.proc.returncode == EXIT_PREEMPTED, first.output()
    after_first = newest_complete(out)
    second = run_batch({"second": Spec(2, out, "--resume", "-q", "--set", "run.schedule=all_layers",
                                       chapter=after_first + 2, act=sigterm)}, work)["second"]
    assert second.proc.returncode == EXIT_PREEMPTED, second.output()
    with open(os.path.join(out, "config.toml"), "rb") as fh:
        assert tomllib.load(fh)["run"]["schedule"] == "all_layers"
    after_second = newest_complete(out)
    assert after_second > after_first, second.output()
    third = run_batch({"third": Spec(2, out, "--resume", "-q")}, work)["third"]
    assert_resumed_to_the_end(third, after_second, 2)
    assert [a["world_size"] for a in run_json(out)["attempts"]] == [1, 2, 2]


def test_checkpoint_keep_is_honoured_on_every_rank_and_schedule(work):
    """run.checkpoint_keep = 2: only the newest two complete checkpoints remain, whichever rank
    wrote the last file of each. (Only rank 0 pruned, right after its own file: in a 2-rank
    Single Layer run it writes all of its files before rank 1 has written one, so nothing was
    ever pruned.)"""
    specs = {schedule: Spec(ranks, os.path.join(work, f"keep-{schedule}"), *BASE, "--set",
                            f"run.schedule={schedule}", "--set", "run.checkpoint_keep=2")
             for schedule, ranks in SCHEDULES}
    jobs = run_batch(specs, work)
    for schedule, job in jobs.items():
        assert job.proc.returncode == 0, job.output()
        # the last chapter is never checkpointed: the model is written right after it
        assert [c for c, _ in complete_checkpoints(job.out)] == [CHAPTERS - 1, CHAPTERS - 2], schedule
        assert sorted(os.listdir(os.path.join(job.out, "checkpoints"))) == [
            f"c{CHAPTERS - 2:05d}", f"c{CHAPTERS - 1:05d}"], schedule
