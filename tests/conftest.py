"""Shared test fixtures.

Sections are self-contained; add new ones below rather than editing others.
"""

from __future__ import annotations

# ----------------------------------------------------------------------------------------------
# mpff command line runs (tests/test_config.py, test_model_io.py, test_e2e.py, test_mpi.py)
# ----------------------------------------------------------------------------------------------
import os
import shutil
import signal
import subprocess
import sys
import types

import pytest

MPFF_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPFF_PYTHON = sys.executable
#: $MPFF_MPIEXEC if set, else the virtualenv's mpiexec (jobs/setup_env.sh), else the one on PATH
#: (a machine whose Python is not ours: the GPU check, benchmarks/gpu_check.sh).
MPFF_MPIEXEC = next((m for m in (os.environ.get("MPFF_MPIEXEC"), os.path.join(os.path.dirname(sys.executable),
                                 "mpiexec"), shutil.which("mpiexec")) if m and os.path.exists(m)),
                    os.path.join(os.path.dirname(sys.executable), "mpiexec"))

#: A network and data set small enough that a run is mostly process start-up. The paper's lr:
#: the tiny preset's 0.1 suits its 256-unit layers, but kills 16-unit ones (every ReLU dead, the
#: weights never move, and runs that should differ end identical).
MPFF_TINY_SETTINGS = (
    "model.dims=[784,16,16,16]",
    "data.train_subset=300",
    "data.test_subset=200",
    "train.lr=0.01",
    "run.report=false",
)


def _mpff_register_markers(config) -> None:
    config.addinivalue_line(
        "markers", "mpi: launches mpiexec with several ranks (slow; deselect with -m 'not mpi')")
    config.addinivalue_line(
        "markers", "cuda: needs a CUDA GPU (skips without one); select with -m cuda")


#: Warnings raised from mpff's own modules fail the test that triggers them (tests' own calls and
#: third-party internals are left alone), so a warning on the normal path cannot creep back.
#: Subprocess runs get the same through PYTHONWARNINGS (:func:`mpff_env`).
MPFF_WARNING_FILTER = r"error::UserWarning:mpff(\..*)?$"


def _mpff_python_warnings() -> str:
    """PYTHONWARNINGS naming every mpff module (its module field is an exact name, not a pattern)."""
    import pkgutil

    import mpff
    names = ["mpff", *(m.name for m in pkgutil.walk_packages(mpff.__path__, "mpff."))]
    return ",".join(f"error::UserWarning:{name}" for name in names)


def pytest_configure(config):
    _mpff_register_markers(config)
    config.addinivalue_line("filterwarnings", MPFF_WARNING_FILTER)
    own = _mpff_python_warnings()
    os.environ["PYTHONWARNINGS"] = ",".join(w for w in (os.environ.get("PYTHONWARNINGS"), own) if w)


def mpff_env() -> dict[str, str]:
    """Environment for subprocess runs: MPICH must not busy-wait (more ranks than cores)."""
    env = dict(os.environ)
    env["MPIR_CVAR_ENABLE_HEAVY_YIELD"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def mpff_command(args, ranks: int = 1, module: tuple[str, ...] = ("-m", "mpff")) -> list[str]:
    """The command line of ``python -m mpff ARGS`` on ``ranks`` ranks (mpiexec when ranks > 1)."""
    if ranks == 1:
        return [MPFF_PYTHON, *module, *args]
    return [MPFF_MPIEXEC, "-n", str(ranks), MPFF_PYTHON, "-m", "mpi4py", *module, *args]


def tiny_train_args(out, *settings: str, config: str = "configs/tiny.toml", force: bool = True,
                    tiny: bool = True) -> list[str]:
    """``train`` arguments: the tiny preset, the tiny overrides, then ``settings`` (later wins)."""
    args = ["train", "--config", config, "--out", str(out), "-q"]
    for s in (MPFF_TINY_SETTINGS if tiny else ()) + tuple(settings):
        args += ["--set", s]
    if force:
        args.append("--force")
    return args


def start_mpff(args, ranks: int = 1, module: tuple[str, ...] = ("-m", "mpff"),
               **kwargs) -> subprocess.Popen:
    """Start mpff (or, with ``module``, a script) in the background, in a session of its own, with
    text pipes for stdout and stderr; for runs side by side. Finish it with :func:`finish_mpff`."""
    kwargs.setdefault("start_new_session", True)
    return subprocess.Popen(mpff_command(args, ranks, module), cwd=MPFF_ROOT, env=mpff_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def finish_mpff(proc: subprocess.Popen, timeout: float = 600) -> subprocess.CompletedProcess:
    """Wait for a started run; past ``timeout`` kill its whole process group (mpiexec and every
    rank) and fail the test."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        stdout, stderr = proc.communicate()
        pytest.fail(f"{' '.join(map(str, proc.args))} still running after {timeout} s\n"
                    f"stdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def run_mpff(args, ranks: int = 1, timeout: float = 600, check: bool = False) -> subprocess.CompletedProcess:
    """Run mpff as a subprocess in the repository root; ``check`` fails the test on a non-zero exit."""
    proc = finish_mpff(start_mpff(args, ranks), timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"mpff {' '.join(map(str, args))} on {ranks} rank(s) exited {proc.returncode}\n"
                    f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def mpff_finish():
    """The :func:`finish_mpff` helper."""
    return finish_mpff


@pytest.fixture(scope="session")
def mpff_start():
    """The :func:`start_mpff` helper."""
    return start_mpff


@pytest.fixture(scope="session")
def mpff_launch():
    """What a test needs to launch its own command line: mpiexec, python, the repository root and
    the environment mpff runs get."""
    return types.SimpleNamespace(mpiexec=MPFF_MPIEXEC, python=MPFF_PYTHON, root=MPFF_ROOT, env=mpff_env())


def run_file_on_ranks(launch, test_file: str, ranks: int, tmp_path, min_tests: int) -> None:
    """``test_file``'s in-process tests (``-m "not mpi"``) under ``mpiexec -n ranks``, every rank
    running them on its communicators and writing its own JUnit report; every report must show
    at least ``min_tests`` run and none failed."""
    from xml.etree import ElementTree

    per_rank = (f'exec "$0" -m pytest -q -p no:cacheprovider {test_file} -m "not mpi" '
                '--junitxml="$1/rank-$$.xml"')
    proc = subprocess.run([launch.mpiexec, "-n", str(ranks), "sh", "-c", per_rank, launch.python,
                           str(tmp_path)], cwd=launch.root, env=launch.env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    reports = sorted(tmp_path.glob("rank-*.xml"))
    assert len(reports) == ranks, (reports, proc.stdout[-4000:])
    for report in reports:
        suite = ElementTree.parse(report).getroot().find("testsuite")
        counts = {key: int(suite.get(key)) for key in ("tests", "failures", "errors", "skipped")}
        assert counts["failures"] == counts["errors"] == 0, (report.name, counts)
        assert counts["tests"] - counts["skipped"] >= min_tests, (report.name, counts)


@pytest.fixture(scope="session")
def mpff_run():
    """The :func:`run_mpff` helper (conftest modules are not imported by the tests themselves)."""
    return run_mpff


@pytest.fixture(scope="session")
def mpff_tiny_args():
    """The :func:`tiny_train_args` helper."""
    return tiny_train_args


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A finished single-process run of the tiny network (fixed negatives, softmax head), shared."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    run_mpff(tiny_train_args(out, "train.negatives=fixed", "train.classifier=softmax"), check=True)
    return out


# ----------------------------------------------------------------------------------------------
# SLURM job scripts (tests/test_slurm.py): the `slurm` marker
# ----------------------------------------------------------------------------------------------
_pytest_configure_before_slurm = pytest_configure


def pytest_configure(config):  # noqa: F811  (chains the hook above)
    _pytest_configure_before_slurm(config)
    config.addinivalue_line(
        "markers", "slurm: submits the jobs/ scripts to a real (throw-away) SLURM; select with -m slurm")
    config.addinivalue_line(
        "markers", "multinode: on an emulated cluster of hosts in network namespaces (tests/test_cluster.py)")


# ----------------------------------------------------------------------------------------------
# Processes of a running job (tests/test_faults.py, test_resilience.py)
# ----------------------------------------------------------------------------------------------
def rank_pids(root_pid: int) -> dict[int, int]:
    """{MPI rank: pid} of the ranks below ``root_pid`` (mpiexec), from /proc (PMI_RANK)."""
    import glob as _glob
    children: dict[int, list[int]] = {}
    for stat in _glob.glob("/proc/[0-9]*/stat"):
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


@pytest.fixture(scope="session")
def mpff_rank_pids():
    """The :func:`rank_pids` helper."""
    return rank_pids


# ----------------------------------------------------------------------------------------------
# The fast loop: the `unit` marker (in-process tests; `bash tests/run.sh -m unit`, about a minute)
# ----------------------------------------------------------------------------------------------
#: fixtures that start processes (mpff subprocesses, mpiexec)
PROCESS_FIXTURES = {"mpff_run", "mpff_start", "mpff_finish", "mpff_launch", "tiny_run", "mpff_rank_pids"}
#: names whose use in a test, or in a module-level function it calls, means it starts a process
PROCESS_NAMES = {"subprocess", "Popen", "run_mpff", "start_mpff", "finish_mpff", "check_output", "system"}
_MARKED_SLOW = ("mpi", "slurm", "cuda")
#: programs a unit test must not start (mpff itself, MPI, the job scripts)
LAUNCHERS = {"mpiexec", "mpirun", "hydra_pmi_proxy", "bash", "sh", "srun", "sbatch", "salloc", MPFF_PYTHON}


def _starts_processes(fn, seen: set | None = None) -> bool:
    """Whether ``fn``'s code, or a module-level function or class of its module it names (followed
    transitively), uses one of PROCESS_NAMES."""
    import inspect
    seen = set() if seen is None else seen
    code = getattr(fn, "__code__", None)
    if code is None or code in seen:
        return False
    seen.add(code)
    names = set(code.co_names) | {n for c in code.co_consts if inspect.iscode(c) for n in _all_names(c)}
    if names & PROCESS_NAMES:
        return True
    module = inspect.getmodule(fn)
    for name in names:
        target = getattr(module, name, None)
        if inspect.isfunction(target) and target.__module__ == fn.__module__ and _starts_processes(target, seen):
            return True
    return False


def _all_names(code) -> set[str]:
    import inspect
    names = set(code.co_names)
    for c in code.co_consts:
        if inspect.iscode(c):
            names |= _all_names(c)
    return names


def pytest_collection_modifyitems(config, items):
    for item in items:
        fn = getattr(item, "function", None)
        if fn is None or any(item.get_closest_marker(m) for m in _MARKED_SLOW):
            continue
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())) or _starts_processes(fn):
            continue
        item.add_marker(pytest.mark.unit)


_pytest_configure_before_unit = pytest_configure


def pytest_configure(config):  # noqa: F811  (chains the hooks above)
    _pytest_configure_before_unit(config)
    config.addinivalue_line(
        "markers", "unit: runs in-process, starts no process (set at collection); `-m unit` is the fast loop")


@pytest.fixture(autouse=True)
def _unit_tests_start_no_process(request, monkeypatch):
    """A test marked `unit` that starts a process anyway fails: the classification above missed
    a name, and the fast loop would not be fast."""
    if request.node.get_closest_marker("unit") is None:
        return
    real = subprocess.Popen.__init__

    def refuse(self, args, *a, **kw):
        program = os.path.basename(str(args[0] if isinstance(args, (list, tuple)) else args).split()[0])
        if program.startswith("python") or program in LAUNCHERS:
            pytest.fail(f"{request.node.nodeid} is marked unit but starts {args!r}: add the name that "
                        "starts it to PROCESS_NAMES in tests/conftest.py")
        real(self, args, *a, **kw)  # a library's helper (matplotlib asks fc-list for fonts)
    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
