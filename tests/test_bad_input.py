"""Bad input to ``mpff train``: one line on stderr, exit code 2, no training, nothing written.

Every case runs the real command line (``python -m mpff train ...``) in its own process.
A few representative ones run under ``mpiexec -n 2``, where a small shell wrapper records each
rank's exit code, to show that the message is printed once and that *both* ranks exit 2.

Importing torch costs seconds of CPU per process, so the single-rank cases run in processes
forked from one interpreter that has done the imports (see FORK_SERVER; two cases use plain
processes as a check), and one module fixture launches every selected case at once; each
test then checks its own outcome.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.toml")
PY = sys.executable
MPIEXEC = os.path.join(os.path.dirname(PY), "mpiexec")
HAVE_MPI = os.path.exists(MPIEXEC) and importlib.util.find_spec("mpi4py") is not None
ENV = dict(os.environ, MPIR_CVAR_ENABLE_HEAVY_YIELD="1")  # ranks may outnumber cores
ENV.setdefault("OMP_NUM_THREADS", "1")
TIMEOUT = 240


needs_mpi = [pytest.mark.mpi, pytest.mark.skipif(not HAVE_MPI, reason="needs mpi4py and mpiexec "
                                                 "beside the interpreter (pip install mpi4py mpich)")]


@dataclasses.dataclass(frozen=True)
class Case:
    """``args`` follow ``mpff train``; ``{out}``, ``{ws}`` (the case's folder), ``{tiny}``,
    ``{host}``, ``{pid}`` are filled in; ``out`` names how the run directory is prepared."""
    name: str
    args: tuple[str, ...]
    message: str          # a fragment of the error line, placeholders filled in
    out: str = "fresh"    # see prepare()
    ranks: int = 1
    config: bool = True   # pass --config configs/tiny.toml --set run.report=false
    usage: bool = False   # an argparse error: 'usage: ...' lines may precede the error line
    process: bool = False  # a plain `python -m mpff train` process rather than the fork server
    marks: tuple = ()
    out_arg: bool = True  # pass --out


def S(*pairs: str) -> tuple[str, ...]:
    """--set k=v for each pair."""
    return tuple(x for p in pairs for x in ("--set", p))


IDX = S("data.dataset=idx", "data.path={ws}/idx", "data.train_subset=0", "data.test_subset=0")

CASES = [
    # ----- the configuration
    Case("unknown-key", S("train.epoch=4"), "unknown config key train.epoch; known keys: epochs",
         process=True),
    Case("unknown-section", S("training.epochs=4"), "unknown config section [training]"),
    Case("wrong-type", S("train.epochs=four"), "train.epochs must be an integer, not 'four'"),
    Case("wrong-type-bool", S("run.trace=1"), "run.trace must be true or false, not 1"),
    Case("epochs-not-divisible", S("train.epochs=6", "train.chapters=4"),
         "train.epochs (6) must be divisible by train.chapters (4)"),
    Case("unknown-schedule", S("run.schedule=pipeline"),
         "run.schedule = 'pipeline' is not one of sequential, single_layer, all_layers, federated"),
    Case("negative-batch-size", S("train.batch_size=-1"), "train.batch_size must be at least 1"),
    Case("classifier-typo", S("train.classifier=softmx"),
         "train.classifier = 'softmx' is not one of goodness, softmax"),
    Case("set-without-equals", ("--set", "train.epochs"),
         "--set 'train.epochs' must look like section.key=value"),
    Case("missing-config-file", ("--config", "{ws}/nonexistent.toml"),
         "config file '{ws}/nonexistent.toml' not found", config=False),
    Case("invalid-toml", ("--config", "{ws}/bad.toml"), "config file '{ws}/bad.toml' is not valid TOML",
         config=False),
    # ----- the plan against the world size
    Case("sequential-on-2-ranks", (), "schedule 'sequential' runs on one rank, not 2", ranks=2,
         marks=tuple(needs_mpi)),
    Case("single-layer-more-ranks-than-layers", S("run.schedule=single_layer", "model.dims=[784,64]"),
         "single_layer needs at most one rank per layer: 2 ranks for 1 layers", ranks=2,
         marks=tuple(needs_mpi)),
    Case("federated-shards-not-ranks", S("run.schedule=federated", "data.shards=2"),
         "federated needs one data shard per rank: data.shards = 2 but 1 ranks"),
    # ----- the data
    Case("missing-data-path", S("data.dataset=idx", "data.path=/nonexistent"),
         "data.path '/nonexistent' does not exist"),
    Case("corrupt-dataset", IDX + S("run.schedule=all_layers"),
         "{ws}/idx/train-images-idx3-ubyte: truncated IDX file (expected 39200 bytes of data, found 100)",
         out="truncated-idx", ranks=2, marks=tuple(needs_mpi)),
    Case("mnist-wrong-input-size", S("model.dims=[100,64,64]"),
         "MNIST has 784 inputs: set model.dims[0] = 784"),
    Case("idx-wrong-input-size", IDX + S("model.dims=[100,64,64]"),
         "the data has 784 inputs but model.dims[0] = 100; set model.dims[0] = 784", out="idx"),
    Case("subset-larger-than-data", S("data.dataset=idx", "data.path={ws}/idx", "data.train_subset=2000"),
         "data.train_subset = 2000 exceeds its 50 training samples", out="idx"),
    # ----- the run directory
    Case("out-under-a-file", (), "cannot create '{out}' (Not a directory)", out="under-file"),
    Case("out-is-a-file", (), "--out '{out}' is a file, not a directory", out="file"),
    Case("out-not-writable", (), "cannot write to '{out}'", out="read-only",
         marks=(pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                                   reason="permission bits do not stop root; out-under-a-file "
                                          "covers an output directory that cannot be created"),)),
    Case("finished-without-force", (), "'{out}' already holds a finished run; pass --force",
         out="finished", process=True),
    # a directory holding what no mpff run wrote (no run.json) is not free, even with --force
    Case("users-own-model", (), "'{out}' holds files that are not an mpff run's (model.h5; no run.json)",
         out="foreign"),
    Case("users-own-model-force", ("--force",),
         "'{out}' holds files that are not an mpff run's (model.h5; no run.json)", out="foreign"),
    Case("run-files-without-run-json", (),
         "'{out}' holds files that are not an mpff run's (checkpoints/, config.toml, model.h5, trace/; "
         "no run.json)", out="finished-no-run-json"),
    Case("run-files-without-run-json-force", ("--force",),
         "'{out}' holds files that are not an mpff run's (checkpoints/, config.toml, model.h5, trace/; "
         "no run.json)", out="finished-no-run-json"),
    Case("in-use-by-live-job", ("--force",),
         "run directory '{out}' is in use by another job (pid {pid} on {host})", out="locked"),
    Case("in-use-by-live-job-2-ranks", ("--force", "--set", "run.schedule=all_layers"),
         "run directory '{out}' is in use by another job (pid {pid} on {host})", out="locked",
         ranks=2, marks=tuple(needs_mpi)),
    # ----- --resume
    Case("resume-without-checkpoints", ("--resume",), "no complete checkpoint in '{out}' to resume from",
         out="preempted-no-checkpoints", config=False),
    # the two answers for a run stopped before its first checkpoint agree (they used to send the
    # user from one to the other: "pass --resume", then "run without --resume")
    Case("resume-without-checkpoints-advice", ("--resume",),
         "start the run over with --force instead of --resume", out="preempted-no-checkpoints", config=False),
    Case("resume-without-checkpoints-or-run-json", ("--resume",),
         "no complete checkpoint in '{out}' to resume from, and no run.json: it holds no mpff run to "
         "continue or replace; move its files away", out="finished-no-run-json-no-checkpoints", config=False),
    Case("rerun-without-checkpoints", (),
         "'{out}' holds an unfinished run (status 'preempted') with no checkpoint to resume from; pass "
         "--force to start it over", out="preempted-no-checkpoints"),
    Case("resume-corrupt-checkpoint", ("--resume",),
         "checkpoint file '{out}/checkpoints/c00001/rank0000.h5' is corrupt or unreadable",
         out="preempted-corrupt", config=False),
    Case("resume-nothing-there", ("--resume",), "config file '{out}/config.toml' not found",
         config=False),
    Case("resume-other-settings", ("--resume", "--config", "{ws}/finished.toml", "--set", "train.lr=0.02"),
         "the checkpoint was made with different [train] settings (lr)", out="preempted",
         config=False),
    # ----- what cannot be stored or allocated
    Case("seed-beyond-64-bits", S("train.seed=123456789012345678901234"),
         "train.seed = 123456789012345678901234 does not fit in 64 bits"),
    Case("dims-beyond-64-bits", S("model.dims=[784,18446744073709551616]"),
         "model.dims = 18446744073709551616 does not fit in 64 bits"),
    Case("batch-that-cannot-be-allocated", S("train.batch_size=100000000000"),
         "for train.batch_size = 100000000000 and model.dims [784, 256, 256, 256]; lower train.batch_size"),
    # ----- the command line itself (argparse)
    Case("force-and-resume", ("--force", "--resume"),
         "mpff train: error: argument --resume: not allowed with argument --force", usage=True),
    Case("unknown-option-2-ranks", ("--epochs", "3"), "mpff train: error: unrecognized arguments: --epochs 3",
         ranks=2, marks=tuple(needs_mpi)),
    # ----- advice that names the cure (issue 24)
    Case("resume-without-out", ("--resume",), "--resume needs --out RUN_DIR (the run to continue)",
         out_arg=False),  # it resumed an invented outputs/tiny-sequential-n1-<time>
    Case("shards-more-than-samples", IDX + S("data.shards=60"),
         "data.shards = 60 but the data has 50 training samples; set data.shards to at most 50", out="idx"),
    Case("config-is-a-directory", ("--config", "{ws}"), "config file '{ws}' is a directory", config=False),
    Case("newline-in-set", S("train.epochs=2\ntrain.lr=0.5"), "holds a line break, which config.toml cannot hold"),
]

#: The finished run the run-directory cases copy: 2 chapters, a checkpoint after the first.
FINISHED = S("run.report=false", "train.epochs=2", "train.chapters=2", "run.checkpoint_every=1",
             "data.train_subset=500", "data.test_subset=100", "model.dims=[784,16,16]")


# ---------------------------------------------------------------------------- helpers


def tree_digest(path: str) -> dict[str, str] | None:
    """{relative path: sha256 or 'dir'} of everything under path (or the file itself);
    None when path does not exist."""
    if not os.path.lexists(path):
        return None
    if not os.path.isdir(path):
        with open(path, "rb") as fh:
            return {".": hashlib.sha256(fh.read()).hexdigest()}
    out = {}
    for d, dirs, files in os.walk(path):
        for name in dirs:
            out[os.path.relpath(os.path.join(d, name), path)] = "dir"
        for name in files:
            p = os.path.join(d, name)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_idx_dir(directory: str, truncate: bool = False) -> None:
    """50 training and 20 test images of 28x28; with truncate, the training images stop 100
    bytes after their header."""
    os.makedirs(directory)
    rng = np.random.default_rng(0)
    files = {
        "train-images-idx3-ubyte": idx_bytes(rng.integers(0, 256, (50, 28, 28))),
        "train-labels-idx1-ubyte": idx_bytes(np.arange(50) % 10),
        "t10k-images-idx3-ubyte": idx_bytes(rng.integers(0, 256, (20, 28, 28))),
        "t10k-labels-idx1-ubyte": idx_bytes(np.arange(20) % 10),
    }
    if truncate:
        files["train-images-idx3-ubyte"] = files["train-images-idx3-ubyte"][:16 + 100]
    for name, blob in files.items():
        with open(os.path.join(directory, name), "wb") as fh:
            fh.write(blob)


def set_status(run_dir: str, status: str) -> None:
    path = os.path.join(run_dir, "run.json")
    with open(path) as fh:
        data = json.load(fh)
    data["status"] = status
    with open(path, "w") as fh:
        json.dump(data, fh)


def prepare(case: Case, ws: str, finished: str) -> tuple[str, str]:
    """Create the case's files; returns (--out path, path that must be left untouched)."""
    with open(os.path.join(ws, "bad.toml"), "w") as fh:
        fh.write("[model]\ndims = [784, 64\n")
    shutil.copy(os.path.join(finished, "config.toml"), os.path.join(ws, "finished.toml"))
    out = os.path.join(ws, "run")
    kind = case.out
    if kind in ("idx", "truncated-idx"):
        write_idx_dir(os.path.join(ws, "idx"), truncate=kind == "truncated-idx")
    elif kind == "under-file":
        with open(os.path.join(ws, "file.txt"), "w") as fh:
            fh.write("not a directory\n")
        return os.path.join(ws, "file.txt", "sub"), os.path.join(ws, "file.txt")
    elif kind == "file":
        with open(out, "w") as fh:
            fh.write("a file\n")
    elif kind == "read-only":
        os.makedirs(os.path.join(ws, "ro"))
        os.chmod(os.path.join(ws, "ro"), 0o500)
        out = os.path.join(ws, "ro", "run")
        return out, os.path.join(ws, "ro")
    elif kind == "foreign":  # the user's own file, in a directory no run wrote
        os.makedirs(out)
        with open(os.path.join(out, "model.h5"), "wb") as fh:
            fh.write(b"the user's model\n")
    elif kind.startswith(("finished", "locked", "preempted")):
        shutil.copytree(finished, out, symlinks=True)
        if kind.startswith("finished-no-run-json"):  # a run's files, but not known to be one
            os.unlink(os.path.join(out, "run.json"))
        if kind == "finished-no-run-json-no-checkpoints":
            shutil.rmtree(os.path.join(out, "checkpoints"))
        if kind == "locked":
            with open(os.path.join(out, ".lock"), "w") as fh:
                fh.write(f"{socket.gethostname()} {os.getpid()}\n")  # this test process: alive
        if kind.startswith("preempted"):
            set_status(out, "preempted")
        if kind == "preempted-no-checkpoints":
            shutil.rmtree(os.path.join(out, "checkpoints"))
        if kind == "preempted-corrupt":
            path = os.path.join(out, "checkpoints", "c00001", "rank0000.h5")
            with open(path, "r+b") as fh:
                fh.truncate(os.path.getsize(path) // 3)
    else:
        assert kind == "fresh", kind
    return out, out


def fill(text: str, ws: str, out: str) -> str:
    return text.format(ws=ws, out=out, tiny=TINY, host=socket.gethostname(), pid=os.getpid())


def train_args(case: Case, ws: str, out: str) -> list[str]:
    args = ["--config", TINY, "--set", "run.report=false"] if case.config else []
    return ["train", *args, *(fill(a, ws, out) for a in case.args), *(["--out", out] if case.out_arg else []), "-q"]


# Runs under mpiexec: each rank records its exit code in $MPFF_EXIT_DIR/rank<r> and waits (30 s at
# most) for the others to do the same, so each rank's own code is seen even if Hydra tore the job
# down (it SIGKILLs the rest when a rank looks crashed, see test_mpi's ranks-leaving-apart test).
RANK_WRAPPER = """
"$0" -m mpi4py -m mpff "$@"; rc=$?
echo $rc > "$MPFF_EXIT_DIR/rank$PMI_RANK"
i=0; while [ "$(ls "$MPFF_EXIT_DIR" | wc -l)" -lt "$PMI_SIZE" ] && [ $i -lt 300 ]; do
  sleep 0.1; i=$((i+1)); done
exit $rc
"""

# Importing torch costs seconds of CPU per process on a small machine, so single-rank cases run
# ``python -m mpff`` (runpy, the same entry point and exit path) in processes forked from one
# interpreter that has imported torch, h5py and mpff once -- but not mpi4py.MPI, which each
# child initialises itself, as a fresh process would.
FORK_SERVER = r"""
import json, os, runpy, sys, traceback
import h5py, numpy, torch
import mpff.checkpoint, mpff.cli, mpff.data, mpff.train
assert "mpi4py.MPI" not in sys.modules
jobs = json.loads(sys.stdin.read())
running, codes = {}, {}
def reap():
    pid, status = os.wait()
    codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
for job in jobs:
    while len(running) >= int(os.environ["FORK_PARALLEL"]):
        reap()
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        sys.argv = [os.path.join(os.path.dirname(mpff.__file__), "__main__.py"), *job["argv"]]
        code = 0
        try:
            runpy.run_module("mpff", run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if not isinstance(exc.code, (int, type(None))):
                print(exc.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    running[pid] = job["name"]
while running:
    reap()
print(json.dumps(codes))
"""


@dataclasses.dataclass
class Outcome:
    ws: str
    out: str
    watched: str
    before: dict | None
    rc: int | None = None
    stdout: str = ""
    stderr: str = ""
    after: dict | None = None
    rank_codes: dict[int, int | None] = dataclasses.field(default_factory=dict)


def run_mpiexec(case: Case, o: Outcome) -> None:
    exit_dir = os.path.join(o.ws, "exit-codes")
    os.makedirs(exit_dir)
    cmd = [MPIEXEC, "-n", str(case.ranks), "sh", "-c", RANK_WRAPPER, PY, *train_args(case, o.ws, o.out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(ENV, MPFF_EXIT_DIR=exit_dir), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=TIMEOUT)
    o.rc, o.stdout, o.stderr = proc.returncode, proc.stdout, proc.stderr
    for name in os.listdir(exit_dir):
        with open(os.path.join(exit_dir, name)) as fh:
            text = fh.read().strip()
        o.rank_codes[int(name[len("rank"):])] = int(text) if text else None


def run_process(case: Case, o: Outcome) -> None:
    proc = subprocess.run([PY, "-m", "mpff", *train_args(case, o.ws, o.out)], cwd=ROOT, env=ENV,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT)
    o.rc, o.stdout, o.stderr = proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def fork_server():
    proc = subprocess.Popen([PY, "-c", FORK_SERVER], cwd=ROOT, env=dict(ENV, FORK_PARALLEL="3"),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("bad-input") / "finished")
    proc = subprocess.run([PY, "-m", "mpff", "train", "--config", TINY, *FINISHED, "--out", out, "-q"],
                          cwd=ROOT, env=ENV, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert os.path.exists(os.path.join(out, "checkpoints", "c00001", "rank0000.h5"))
    assert not os.path.exists(os.path.join(out, ".lock"))
    return out


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory, fork_server, finished_run):
    """Runs every selected case of test_bad_input: single-rank ones through the fork server,
    the others (mpiexec, plain processes) two at a time meanwhile."""
    selected = [item.callspec.params["case"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_bad_input" and item.module is request.module]
    selected = [c for c in selected if not any(m.name == "skipif" and m.args[0] for m in c.marks)]
    base = str(tmp_path_factory.mktemp("cases"))
    results, jobs, others = {}, [], []
    for case in selected:
        ws = os.path.join(base, case.name)
        os.makedirs(ws)
        out, watched = prepare(case, ws, finished_run)
        o = results[case.name] = Outcome(ws, out, watched, tree_digest(watched))
        if case.ranks == 1 and not case.process:
            jobs.append({"name": case.name, "argv": train_args(case, ws, out),
                         "stdout": os.path.join(ws, "stdout"), "stderr": os.path.join(ws, "stderr")})
        else:
            others.append((case, o))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(run_mpiexec if c.ranks > 1 else run_process, c, o) for c, o in others]
        codes, _ = fork_server.communicate(json.dumps(jobs), timeout=TIMEOUT)
        for f in futures:
            f.result()
    codes = json.loads(codes)
    for job in jobs:
        o = results[job["name"]]
        o.rc = codes[job["name"]]
        with open(job["stdout"]) as fh:
            o.stdout = fh.read()
        with open(job["stderr"]) as fh:
            o.stderr = fh.read()
    for o in results.values():
        o.after = tree_digest(o.watched)
    return results


# ---------------------------------------------------------------------------- the tests


def test_there_are_enough_cases():
    assert len({c.name for c in CASES}) == len(CASES) >= 15


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=c.marks) for c in CASES])
def test_bad_input(case, outcomes):
    r = outcomes[case.name]
    expected = fill(case.message, r.ws, r.out)
    shown = f"exit {r.rc}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"

    assert r.rc == 2, shown
    lines = r.stderr.splitlines()
    if case.usage:  # argparse's own format: usage lines, then one error line
        lines = [ln for ln in lines if not ln.startswith(("usage: ", " "))]
    assert len(lines) == 1, f"want exactly one error line on stderr\n{shown}"
    assert lines[0].startswith("mpff train: error: "), shown
    assert expected in lines[0], f"want {expected!r}\n{shown}"
    # nothing started: no banner, no progress
    assert "mpff: writing" not in r.stdout and "chapter" not in r.stdout, shown
    if case.ranks > 1:
        assert r.rank_codes == {rank: 2 for rank in range(case.ranks)}, shown
    # the run directory (or whatever --out names) is exactly as before
    assert r.after == r.before, f"{r.watched} changed\n{shown}"
    if r.before is None:
        assert not os.path.lexists(r.out), f"{r.out} was created\n{shown}"


# ---------------------------------------------------------------------------- advice, in process


@pytest.mark.parametrize("precision, has_bf16, cure", [
    ("bf16", False, "use train.precision=fp32 here, or run bf16 on a GPU (run.device=cuda) or a CPU that has them"),
    ("tf32", False, "use train.precision=fp32 (this CPU has no bf16 products either)"),
    ("tf32", True, "use train.precision=bf16 (this CPU computes bf16 products) or fp32"),
])
def test_precision_advice_fits_the_cpu(monkeypatch, precision, has_bf16, cure):
    # tf32 advised bf16 even on a CPU that cannot do it
    from mpff import train
    from mpff.config import Config, ConfigError
    monkeypatch.setattr(train, "cpu_bf16_products", lambda: has_bf16)
    with pytest.raises(ConfigError) as info:
        train.pick_device(Config().replace(train={"precision": precision}, run={"device": "cpu"}), 0)
    assert cure in str(info.value) and "\n" not in str(info.value), info.value


def test_resume_of_a_read_only_run_says_how_to_resume_it(tmp_path, monkeypatch):
    # "choose another --out" loses the checkpoints: they live only in this directory
    from mpff.config import ConfigError
    from mpff.rundir import RunDir
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"status": "preempted"}))
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if os.path.abspath(p) == str(run) else real(p, mode))
    with pytest.raises(ConfigError) as info:
        RunDir(str(run)).check(force=False, resume=True)
    text = str(info.value)
    assert "its checkpoints are there; make it writable (chmod -R u+w), or copy the directory somewhere " \
           "writable and pass --resume --out COPY" in text and "another --out" not in text, text
    with pytest.raises(ConfigError, match="choose another --out"):  # a new run may go anywhere
        RunDir(str(run)).check(force=True, resume=False)
