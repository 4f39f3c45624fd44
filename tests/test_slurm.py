"""The job scripts in jobs/, checked statically and run for real under SLURM.

The ``slurm`` tests submit the real scripts with sbatch to the throw-away two-node
SLURM of ``.ci/slurm.sh`` (both "nodes" are this machine, each with its own slurmd;
4 CPUs and 4 pretend GPUs each) and check what the jobs leave behind. If that SLURM
is not running, the tests start it (root and apt-get needed; stopped again at the
end). Where that cannot be done they skip and say why, except under CI=true, where
they fail. ``pytest -m slurm`` selects them, ``-m "not slurm"`` leaves them out.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mpff import mpienv

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"
SCRIPTS = sorted(p for p in JOBS.iterdir() if p.suffix in (".sh", ".sbatch"))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
TEST_CLUSTER = "mpffci"  # ClusterName in the slurm.conf that .ci/slurm.sh writes
JOB_TIMEOUT = float(os.environ.get("MPFF_TEST_SLURM_TIMEOUT", "600"))
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "PREEMPTED", "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT"}

# What each sbatch script asks SLURM for, recorded: a change to a header must be a
# deliberate change here too (and in docs/cluster.md).
EXPECTED_HEADERS = {
    "slurm_single_node.sbatch": [
        "--job-name=mpff",
        "--nodes=1",
        "--ntasks-per-node=4",
        "--gpus-per-task=1",
        "--time=02:00:00",
        "--output=outputs/slurm-%j.out",
        "--open-mode=append",
        "--signal=B:USR1@120",
        "--requeue",
    ],
    "slurm_multi_node.sbatch": [
        "--job-name=mpff-multi",
        "--nodes=2",
        "--ntasks-per-node=4",
        "--gpus-per-task=1",
        "--time=02:00:00",
        "--output=outputs/slurm-%j.out",
        "--open-mode=append",
        "--signal=B:USR1@120",
        "--requeue",
    ],
}

# No script needs a shellcheck exclusion; keep this empty unless a false positive appears.
SHELLCHECK_EXCLUDES: dict[str, list[str]] = {}


def _unavailable(reason: str):
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: the SLURM tests must run in CI)", pytrace=False)
    pytest.skip(reason)


# ----------------------------------------------------------------- static checks


def test_every_script_is_here():
    names = {p.name for p in SCRIPTS}
    for want in ("workstation.sh", "slurm_single_node.sbatch", "slurm_multi_node.sbatch",
                 "paper_sweep.sh", "slurm_launch.sh", "site_setup.example.sh"):
        assert want in names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", SCRIPTS + [ROOT / ".ci" / "slurm.sh", ROOT / ".ci" / "netns.sh",
                                              ROOT / ".ci" / "run", ROOT / "tests" / "run.sh"], ids=lambda p: p.name)
def test_shellcheck(script):
    if shutil.which("shellcheck") is None:
        _unavailable("shellcheck is not installed (apt-get install shellcheck)")
    cmd = ["shellcheck", "--shell=bash", "--external-sources"]
    for code in SHELLCHECK_EXCLUDES.get(script.name, []):
        cmd += ["--exclude", code]
    proc = subprocess.run(cmd + [str(script)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def sbatch_header(path: Path) -> list[str]:
    """The #SBATCH options, as sbatch reads them: from the top, until the first command."""
    options = []
    for line in path.read_text().splitlines()[1:]:
        if line.startswith("#SBATCH"):
            options.append(line.split(None, 1)[1].strip())
        elif line.strip() and not line.startswith("#"):
            break
    return options


@pytest.mark.parametrize("name", sorted(EXPECTED_HEADERS))
def test_sbatch_header_is_the_recorded_one(name):
    assert sbatch_header(JOBS / name) == EXPECTED_HEADERS[name]


def test_sbatch_scripts_are_all_recorded():
    assert sorted(p.name for p in JOBS.glob("*.sbatch")) == sorted(EXPECTED_HEADERS)


def test_launcher_refuses_to_run_outside_slurm():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", str(JOBS / "slurm_launch.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "not inside a SLURM job" in proc.stderr


def test_workstation_rejects_an_unknown_preset():
    env = dict(os.environ, MPFF_CONFIG="no-such-preset")
    proc = subprocess.run(["bash", str(JOBS / "workstation.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "presets: backprop paper tiny workstation" in proc.stderr


def test_workstation_rejects_bad_rank_count():
    env = dict(os.environ, MPFF_NP="two")
    proc = subprocess.run(["bash", str(JOBS / "workstation.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "MPFF_NP" in proc.stderr


def test_paper_sweep_dry_run_submits_the_full_grid(tmp_path):
    """Without SLURM: the sbatch commands of the paper's sweep (3 arrays of 6, 1 report)."""
    sweep = tmp_path / "sweep"
    env = dict(os.environ, MPFF_SWEEP_DRY_RUN="1", MPFF_SWEEP_DIR=str(sweep))
    proc = subprocess.run(["bash", str(JOBS / "paper_sweep.sh"), "--set", "train.threads=2"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if " sbatch " in f" {ln} "]
    assert len(lines) == 4, proc.stderr
    for schedule, line, ranks in zip(("sequential", "single_layer", "all_layers"), lines, (1, 4, 4)):
        assert f"--job-name=mpff-{schedule}" in line
        assert "--array=0-5" in line
        assert f"--ntasks-per-node={ranks}" in line
        assert "--gpus-per-task=1" in line
        assert line.rstrip().endswith("jobs/slurm_single_node.sbatch --set train.threads=2")
        assert "MPFF_CONFIG=configs/paper.toml" in line
    report = lines[3]
    assert re.search(r"--dependency=afterany(:DRYRUN\d+){3} ", report)
    assert report.rstrip().endswith(f"jobs/paper_sweep.sh --report {sweep}")
    runs = (sweep / "sweep.runs").read_text().split()
    assert len(runs) == 18 and len(set(runs)) == 18
    assert {r.split("-")[0] for r in runs} == {"sequential", "single_layer", "all_layers"}
    assert "single_layer-adaptive-softmax" in runs


def test_paper_sweep_rejects_an_unknown_schedule(tmp_path):
    env = dict(os.environ, MPFF_SWEEP_DRY_RUN="1", MPFF_SWEEP_DIR=str(tmp_path / "s"),
               MPFF_SWEEP_SCHEDULES="sequential pipelined")
    proc = subprocess.run(["bash", str(JOBS / "paper_sweep.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown schedule 'pipelined'" in proc.stderr


# ----------------------------------------------------------------- the cluster


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def _cluster_name() -> str | None:
    """ClusterName of the SLURM that answers, or None if none does."""
    if shutil.which("scontrol") is None:
        return None
    conf = os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")
    if not os.path.exists(conf) and not os.path.exists("/etc/slurm-llnl/slurm.conf"):
        return None  # no configuration: scontrol would only time out
    try:
        proc = _run(["scontrol", "show", "config"], timeout=20)
    except subprocess.TimeoutExpired:
        return None
    if proc.returncode != 0:
        return None
    m = re.search(r"^ClusterName\s*=\s*(\S+)", proc.stdout, re.M)
    return m.group(1) if m else None


def _nodes_up() -> bool:
    proc = _run(["sinfo", "-h", "-N", "-o", "%N %t"], timeout=20)
    states = [ln.split()[1] for ln in proc.stdout.splitlines() if ln.strip()]
    return proc.returncode == 0 and len(states) >= 2 and all(
        s.rstrip("*") in ("idle", "mix", "alloc") for s in states)


@pytest.fixture(scope="module")
def cluster():
    """The throw-away SLURM of .ci/slurm.sh: used if running, else started (and stopped)."""
    started = False
    name = _cluster_name()
    if name is None:
        if os.geteuid() != 0 or (shutil.which("apt-get") is None and shutil.which("slurmctld") is None):
            _unavailable("no SLURM running, and it cannot be installed here (needs root and apt-get); "
                         "see .ci/slurm.sh")
        proc = _run(["bash", str(ROOT / ".ci" / "slurm.sh"), "start"], timeout=900)
        if proc.returncode != 0:
            _unavailable(f"could not start SLURM with .ci/slurm.sh: {proc.stderr.strip()[-2000:]}")
        started = True
        name = _cluster_name()
    if name != TEST_CLUSTER:
        _unavailable(f"the SLURM here is cluster {name!r}, not the throw-away {TEST_CLUSTER!r} "
                     "of .ci/slurm.sh; the tests do not submit to a real cluster")
    deadline = time.time() + 30
    while not _nodes_up():
        if time.time() > deadline:
            _unavailable(f"SLURM nodes are not up: {_run(['sinfo', '-N', '-l']).stdout}")
        time.sleep(0.5)
    yield
    if started:
        _run(["bash", str(ROOT / ".ci" / "slurm.sh"), "stop"], timeout=120)


#: Over the tiny preset: a smaller network on fewer samples, so that a job is mostly its start-up
#: (the jobs check the scripts, not learning).
SMALL = ("model.dims=[784,64,64,64]", "data.train_subset=2000", "data.test_subset=500")


def small(*args: str) -> list[str]:
    """``mpff train`` arguments after the script: the SMALL overrides, then ``args``."""
    return [x for kv in SMALL for x in ("--set", kv)] + list(args)


def job_env(**extra: str) -> dict:
    """The environment sbatch passes on to the job (it exports everything)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "MPFF_"))}
    env.update(
        MPFF_PYTHON=sys.executable,  # the interpreter running the tests has mpff installed
        MPFF_CONFIG="configs/tiny.toml",
        MPFF_SETUP="",  # no site set-up file, even if one exists in jobs/
        MPIR_CVAR_ENABLE_HEAVY_YIELD="1",  # more ranks than cores: yield, do not spin
        OMP_NUM_THREADS="1",
    )
    env.update(extra)
    return env


def sbatch(args: list[str], env: dict) -> str:
    proc = _run(["sbatch", "--parsable", *args], cwd=ROOT, env=env, timeout=60)
    assert proc.returncode == 0, f"sbatch {' '.join(args)} failed: {proc.stderr}"
    return proc.stdout.strip().split(";")[0]


def job_records(job_id: str) -> list[dict]:
    """One dict per job (per array task) from `scontrol show job -o`."""
    proc = _run(["scontrol", "show", "job", "-o", job_id], timeout=30)
    if proc.returncode != 0:
        return []
    records = []
    for line in proc.stdout.splitlines():
        fields = dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", line))
        if fields:
            records.append(fields)
    return records


def wait_for(job_id: str, log: Path | None = None, timeout: float = JOB_TIMEOUT,
             count: int | None = None) -> list[dict]:
    """Poll until every job of job_id (an array: every task, `count` of them) has ended."""
    deadline = time.time() + timeout
    records: list[dict] = []
    while time.time() < deadline:
        records = job_records(job_id)
        states = [r.get("JobState") for r in records]
        if records and all(s in TERMINAL for s in states) and (count is None or len(records) == count):
            return records
        time.sleep(1)
    _run(["scancel", job_id])
    tail = log.read_text()[-3000:] if log is not None and log.exists() else "(no log)"
    pytest.fail(f"job {job_id} did not end within {timeout:.0f} s: "
                f"{[(r.get('JobId'), r.get('JobState'), r.get('Reason')) for r in records]}\n{tail}")


def assert_completed(records: list[dict], log: Path | None = None) -> None:
    bad = [(r.get("JobId"), r.get("JobState"), r.get("ExitCode")) for r in records
           if r.get("JobState") != "COMPLETED" or r.get("ExitCode") != "0:0"]
    if bad:
        text = log.read_text()[-4000:] if log is not None and log.exists() else "(no log)"
        pytest.fail(f"jobs did not complete: {bad}\n--- {log}:\n{text}")


def assert_finished_run(run_dir: Path, world_size: int, schedule: str) -> dict:
    assert (run_dir / "model.h5").is_file(), sorted(p.name for p in run_dir.iterdir())
    assert (run_dir / "config.toml").is_file()
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "finished"
    assert info["world_size"] == world_size
    assert info["schedule"] == schedule
    assert 0.0 <= info["test_accuracy"] <= 1.0
    assert info["wall_time"] > 0
    traces = sorted(p.name for p in (run_dir / "trace").glob("rank*.h5"))
    assert traces == [f"rank{r:04d}.h5" for r in range(world_size)]
    assert (run_dir / "report" / "report.md").is_file()
    return info


def slurm_log(job_id: str) -> Path:
    return ROOT / "outputs" / f"slurm-{job_id}.out"


# ----------------------------------------------------------------- jobs under SLURM


@pytest.mark.slurm
@pytest.mark.parametrize("name", sorted(EXPECTED_HEADERS))
def test_sbatch_accepts_the_header_as_written(cluster, name):
    """`sbatch --test-only`: SLURM parses the header and could place the job (GPUs included)."""
    proc = _run(["sbatch", "--test-only", f"jobs/{name}"], cwd=ROOT, env=job_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"to start at .* using \d+ processors on nodes", proc.stderr), proc.stderr


@pytest.mark.slurm
def test_single_node_job_as_written(cluster, tmp_path):
    """The header unchanged: 1 node, 4 tasks, a (pretend) GPU per task; the log and the run
    directory where the script says: outputs/slurm-<jobid>.out and outputs/slurm-<jobid>/."""
    env = job_env()
    job = sbatch(["jobs/slurm_single_node.sbatch", *small("--set", "run.schedule=all_layers",
                  "--set", "train.threads=1", "--set", "run.device=cpu")], env)
    log = slurm_log(job)
    run_dir = ROOT / "outputs" / f"slurm-{job}"
    records = wait_for(job, log)
    assert_completed(records, log)
    rec = records[0]
    assert rec["NumNodes"] == "1" and rec["NumTasks"] == "4"
    assert "gres:gpu:1" in rec.get("TresPerTask", ""), rec
    assert_finished_run(run_dir, 4, "all_layers")
    text = log.read_text()
    assert "GPUs per task: 1" in text
    assert "srun --mpi=pmi2" in text
    assert re.search(r"^chapter +4/4 ", text, re.M), text  # rank 0's progress lines
    log.unlink()
    shutil.rmtree(run_dir)


@pytest.mark.slurm
def test_multi_node_job_on_a_cpu_only_request(cluster, tmp_path):
    """Two nodes (two slurmd), a rank on each, no GPUs requested (SBATCH_GPUS_PER_TASK=0)."""
    run_dir = tmp_path / "run"
    env = job_env(MPFF_OUT=str(run_dir), SBATCH_GPUS_PER_TASK="0")
    job = sbatch(["--ntasks-per-node=1", "jobs/slurm_multi_node.sbatch",
                  *small("--set", "run.schedule=all_layers", "--set", "train.threads=1")], env)
    log = slurm_log(job)
    records = wait_for(job, log)
    assert_completed(records, log)
    rec = records[0]
    assert rec["NumNodes"] == "2" and rec["NumTasks"] == "2", rec
    assert rec["NodeList"] == "n[1-2]", rec
    assert not re.search(r"gpu:[1-9]", rec.get("TresPerTask", "")), rec  # gres:gpu:0 or nothing
    info = assert_finished_run(run_dir, 2, "all_layers")
    assert "on 2 node(s) [n[1-2]]" in log.read_text()
    # The PyPI mpich's UCX address does not fit slurmstepd's PMI-1 lines (mpff.mpienv): a
    # two-node pmi2 step of that mpich runs on its OFI netmod, and run.json says so.
    if mpienv.pypi_mpich():
        assert info["provenance"]["environment"].get("MPIR_CVAR_CH4_NETMOD") == "ofi", info
    log.unlink()


@pytest.mark.slurm
def test_mpiexec_fallback_across_nodes(cluster, tmp_path):
    """MPFF_LAUNCHER=mpiexec: MPICH's Hydra starts the ranks inside the 2-node allocation."""
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        _unavailable(f"no {mpiexec} (pip package mpich) for the mpiexec fallback")
    run_dir = tmp_path / "run"
    env = job_env(MPFF_OUT=str(run_dir), SBATCH_GPUS_PER_TASK="0", MPFF_LAUNCHER="mpiexec",
                  MPFF_MPIEXEC=str(mpiexec))
    job = sbatch(["--ntasks-per-node=1", "jobs/slurm_multi_node.sbatch",
                  *small("--set", "run.schedule=single_layer", "--set", "train.threads=1")], env)
    log = slurm_log(job)
    assert_completed(wait_for(job, log), log)
    assert_finished_run(run_dir, 2, "single_layer")
    assert f"{mpiexec} -n 2 " in log.read_text()
    log.unlink()


@pytest.mark.slurm
def test_failed_training_fails_the_job(cluster, tmp_path):
    """Bad input: mpff exits 2, and so does the job (FAILED, exit code 2)."""
    env = job_env(MPFF_OUT=str(tmp_path / "run"), SBATCH_GPUS_PER_TASK="0")
    job = sbatch(["--ntasks-per-node=1", "jobs/slurm_single_node.sbatch",
                  "--set", "run.schedule=no_such_schedule"], env)
    log = slurm_log(job)
    rec = wait_for(job, log)[0]
    assert rec["JobState"] == "FAILED", (rec, log.read_text())
    assert rec["ExitCode"] == "2:0", rec
    assert "mpff train exited with 2" in log.read_text()
    log.unlink()


@pytest.mark.slurm
def test_time_limit_warning_checkpoints_requeues_and_resumes(cluster, tmp_path):
    """USR1 to the batch shell (what --signal=B:USR1@120 sends): the ranks checkpoint and
    stop, the job requeues itself, and the second attempt resumes and finishes the run."""
    run_dir = tmp_path / "run"
    env = job_env(MPFF_OUT=str(run_dir), SBATCH_GPUS_PER_TASK="0")
    job = sbatch(["--ntasks-per-node=2", "jobs/slurm_single_node.sbatch",
                  *small("--set", "run.schedule=all_layers", "--set", "train.threads=1",
                         "--set", "train.epochs=30", "--set", "train.chapters=30",
                         "--set", "run.checkpoint_every=1")], env)
    log = slurm_log(job)
    deadline = time.time() + JOB_TIMEOUT
    while not (log.exists() and re.search(r"^chapter +2/30 ", log.read_text(), re.M)):
        if time.time() > deadline or any(r["JobState"] in TERMINAL for r in job_records(job)):
            _run(["scancel", job])
            pytest.fail(f"job {job} never reached chapter 2: {log.read_text() if log.exists() else ''}")
        time.sleep(0.2)
    sig = _run(["scancel", "--batch", "--signal=USR1", job])
    assert sig.returncode == 0, sig.stderr
    records = wait_for(job, log)
    assert_completed(records, log)
    assert records[0]["Restarts"] == "1", records[0]
    text = log.read_text()
    assert "asking the ranks to checkpoint and stop" in text
    assert "mpff train exited with 75" in text  # the ranks' "preempted" exit code
    assert "requeueing job" in text
    attempt2 = text.split("restart 1", 1)[1]
    assert "--resume" in attempt2, text
    assert not re.search(r"^chapter +1/30 ", attempt2, re.M), "the second attempt started over"
    assert re.search(r"^chapter +30/30 ", attempt2, re.M), text
    assert_finished_run(run_dir, 2, "all_layers")
    log.unlink()


@pytest.mark.slurm
def test_paper_sweep_shrunk(cluster, tmp_path):
    """jobs/paper_sweep.sh on 2 schedules x 1 negatives x 2 classifiers: two job arrays (of 2
    tasks each) and the dependent report job over all four runs."""
    sweep = tmp_path / "sweep"
    env = job_env(
        MPFF_SWEEP_DIR=str(sweep),
        MPFF_SWEEP_CONFIG="configs/tiny.toml",
        MPFF_SWEEP_SCHEDULES="sequential all_layers",
        MPFF_SWEEP_NEGATIVES="random",
        MPFF_SWEEP_CLASSIFIERS="goodness softmax",
        MPFF_SWEEP_NP_ALL_LAYERS="2",
        MPFF_SWEEP_SET=" ".join(("train.threads=1", "run.device=cpu") + SMALL),
        MPFF_SWEEP_TIME="00:20:00",
        MPFF_GPUS_PER_TASK="0",
    )
    proc = _run(["bash", "jobs/paper_sweep.sh"], cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = dict(ln.split("=", 1) for ln in (sweep / "sweep.jobs").read_text().splitlines())
    arrays, report = jobs["arrays"].split(), jobs["report"]
    assert len(arrays) == 2
    pending = job_records(report)[0]
    if pending["JobState"] == "PENDING":  # the dependency, before it is fulfilled and cleared
        assert all(f"afterany:{a}" in pending["Dependency"] for a in arrays), pending
    report_log = sweep / "logs" / f"mpff-sweep-report-{report}.out"
    rec = wait_for(report, report_log)[0]
    for array, name in zip(arrays, ("sequential", "all_layers")):
        tasks = wait_for(array, count=2)
        logs = sorted((sweep / "logs").glob(f"mpff-{name}-{array}_*.out"))
        assert len(logs) == 2, logs
        assert_completed(tasks, logs[0])
    assert_completed([rec], report_log)
    runs = (sweep / "sweep.runs").read_text().split()
    assert runs == ["sequential-random-goodness", "sequential-random-softmax",
                    "all_layers-random-goodness", "all_layers-random-softmax"]
    for run in runs:
        schedule = run.split("-")[0]
        assert_finished_run(sweep / run, 1 if schedule == "sequential" else 2, schedule)
        config = tomllib.loads((sweep / run / "config.toml").read_text())
        assert config["train"]["classifier"] == run.split("-")[2]
        assert config["train"]["negatives"] == "random"
    text = (sweep / "report" / "report.md").read_text()
    for run in runs:
        assert run in text
    assert (sweep / "report" / "comparison.png").stat().st_size > 0
    log = report_log.read_text()
    assert "mpff report" in log and "report written to" in log


@pytest.mark.slurm
def test_a_missing_setup_file_fails_the_job(cluster, tmp_path):
    env = job_env(MPFF_OUT=str(tmp_path / "run"), SBATCH_GPUS_PER_TASK="0",
                  MPFF_SETUP=str(tmp_path / "no-such-setup.sh"))
    job = sbatch(["--ntasks-per-node=1", "jobs/slurm_single_node.sbatch"], env)
    log = slurm_log(job)
    rec = wait_for(job, log)[0]
    assert rec["JobState"] == "FAILED" and rec["ExitCode"] == "2:0", (rec, log.read_text())
    assert f"MPFF_SETUP={tmp_path / 'no-such-setup.sh'}: no such file" in log.read_text()
    assert not (tmp_path / "run").exists()
    log.unlink()


@pytest.fixture
def cluster_without_gpus(cluster):
    """The throw-away SLURM restarted with no GPUs at all (no GresTypes, no gres.conf), as a
    CPU-only site's; restarted as it was (4 pretend GPUs per node) afterwards."""
    env = dict(os.environ, MPFF_SLURM_GPUS="0")
    proc = _run(["bash", str(ROOT / ".ci" / "slurm.sh"), "start"], env=env, timeout=300)
    if proc.returncode != 0:
        _unavailable(f"could not restart SLURM without GPUs: {proc.stderr.strip()[-2000:]}")
    try:
        config = _run(["scontrol", "show", "config"], timeout=20).stdout
        assert not re.search(r"^GresTypes\s*=\s*\S*gpu", config, re.M), "the cluster still has GPUs"
        deadline = time.time() + 30
        while not _nodes_up():
            if time.time() > deadline:
                _unavailable("SLURM nodes are not up after the restart without GPUs")
            time.sleep(0.5)
        yield
    finally:
        _run(["bash", str(ROOT / ".ci" / "slurm.sh"), "start"], timeout=300)


@pytest.mark.slurm
def test_cpu_only_route_on_a_slurm_without_gpus(cluster_without_gpus, tmp_path):
    """A site with no GPUs: the scripts' #SBATCH --gpus-per-task=1 cannot be placed, and the
    documented CPU-only route (SBATCH_GPUS_PER_TASK=0) runs the job on the CPU. The site
    set-up file (MPFF_SETUP) is sourced inside the job before python is looked for."""
    as_written = _run(["sbatch", "--test-only", "jobs/slurm_single_node.sbatch"], cwd=ROOT,
                      env=job_env(), timeout=60)
    assert as_written.returncode != 0 and "gres" in as_written.stderr.lower(), as_written.stderr
    run_dir = tmp_path / "run"
    setup = tmp_path / "site_setup.sh"
    marker = tmp_path / "setup-ran"
    setup.write_text(f"# a site's set-up: modules, conda, ...\n"
                     f"export MPFF_PYTHON={sys.executable}\n"
                     f"echo \"$SLURM_JOB_ID\" > {marker}\n"
                     f"[ -n \"$UNSET_IN_A_MODULE_SCRIPT\" ] || true\n")
    env = job_env(MPFF_OUT=str(run_dir), SBATCH_GPUS_PER_TASK="0", MPFF_SETUP=str(setup))
    del env["MPFF_PYTHON"]  # only the set-up file names the interpreter
    job = sbatch(["--ntasks-per-node=2", "jobs/slurm_single_node.sbatch",
                  *small("--set", "run.schedule=all_layers", "--set", "train.threads=1")], env)
    log = slurm_log(job)
    records = wait_for(job, log)
    assert_completed(records, log)
    assert not re.search(r"gpu:[1-9]", records[0].get("TresPerTask", "")), records[0]  # gres:gpu:0
    info = assert_finished_run(run_dir, 2, "all_layers")
    assert all(r["device"] == "cpu" for r in info["ranks"]), info["ranks"]
    text = log.read_text()
    assert f"mpff-slurm: sourcing {setup}" in text
    assert f"srun --mpi=pmi2 --kill-on-bad-exit=1 {sys.executable} -m mpi4py -m mpff train" in text
    assert marker.read_text().strip() == job
    log.unlink()
