"""mpff across a network: the job scripts on an emulated cluster of two hosts.

``.ci/slurm.sh start`` with ``MPFF_SLURM_NET=netns`` makes each SLURM node a host of its own:
a network namespace with its own address and hostname and its own slurmd, linked to the
others through a veth pair on a bridge and shaped to a profile (``.ci/netns.sh``). Ranks on
different hosts then talk over TCP through the link, which these tests check by counting the
bytes on the veth. The module restarts the throw-away SLURM that way and, at the end, as it
was (the ``slurm`` tests use the one-host cluster). Marker ``multinode`` (and ``slurm``): under
CI=true they fail, not skip, when the emulation cannot start.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_slurm import (  # the one-host SLURM tests' helpers: same scripts, same checks
    JOB_TIMEOUT,
    ROOT,
    TERMINAL,
    _nodes_up,
    _run,
    _unavailable,
    assert_completed,
    assert_finished_run,
    job_env,
    job_records,
    sbatch,
    slurm_log,
    small,
    wait_for,
)
from test_slurm import cluster as cluster  # noqa: F401  (the fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.multinode]

SLURM_SH = str(ROOT / ".ci" / "slurm.sh")
NETNS_SH = str(ROOT / ".ci" / "netns.sh")
HOSTS = ("h1", "h2")
RATES = {"100mbit": 100e6 / 8, "1gbe": 1e9 / 8}  # bytes per second


def link_bytes(host: str) -> tuple[int, int]:
    """(received, sent) by ``host``, counted on its veth in the root namespace."""
    out = _run(["bash", NETNS_SH, "bytes", host], timeout=10).stdout.split()
    return int(out[0]), int(out[1])


def set_link(profile: str) -> None:
    proc = _run(["bash", SLURM_SH, "link", profile], timeout=30)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def hosts(cluster):  # noqa: F811
    """The throw-away SLURM restarted as two hosts in network namespaces; as before afterwards."""
    env = dict(os.environ, MPFF_SLURM_NET="netns", MPFF_SLURM_LINK="unlimited")
    proc = _run(["bash", SLURM_SH, "start"], env=env, timeout=300)
    if proc.returncode != 0:
        _unavailable(f"could not start the emulated cluster (.ci/slurm.sh with MPFF_SLURM_NET=netns): "
                     f"{proc.stderr.strip()[-2000:]}")
    try:
        deadline = time.time() + 30
        while not _nodes_up():
            if time.time() > deadline:
                _unavailable(f"the emulated hosts' slurmd are not up: {_run(['sinfo', '-N', '-l']).stdout}")
            time.sleep(0.5)
        yield HOSTS
    finally:
        env = {k: v for k, v in os.environ.items() if k not in ("MPFF_SLURM_NET", "MPFF_SLURM_LINK")}
        _run(["bash", SLURM_SH, "start"], env=env, timeout=300)


def two_host_job(tmp_path: Path, *settings: str, resume: bool = False, **env_extra: str) -> tuple[str, Path, Path]:
    run_dir = tmp_path / "run"
    env = job_env(MPFF_OUT=str(run_dir), SBATCH_GPUS_PER_TASK="0", **env_extra)
    job = sbatch(["--ntasks-per-node=1", "jobs/slurm_multi_node.sbatch",
                  *small("--set", "train.threads=1", *[x for s in settings for x in ("--set", s)]),
                  *(["--resume"] if resume else [])], env)
    return job, slurm_log(job), run_dir


def test_each_host_has_its_own_name_and_address(hosts):
    proc = _run(["srun", "-N2", "-n2", "-l", "sh", "-c",
                 "echo $(hostname) $SLURMD_NODENAME $(ip -4 -o addr show dev eth0 | awk '{print $4}')"],
                cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = sorted(line.split(":", 1)[1].split() for line in proc.stdout.splitlines())
    assert lines == [["h1", "h1", "10.77.0.11/24"], ["h2", "h2", "10.77.0.12/24"]], proc.stdout


def _stream(profile: str, nbytes: int) -> float:
    """Bytes per second of one TCP stream from h1 to h2 (a sink in h2's namespace)."""
    set_link(profile)
    sink = subprocess.Popen(
        ["ip", "netns", "exec", "mpffh2", sys.executable, "-c",
         "import socket\ns = socket.create_server(('10.77.0.12', 5299))\nc, _ = s.accept()\n"
         "while c.recv(1 << 20):\n    pass\n"])
    try:
        source = ("import socket, sys, time\n"
                  "for _ in range(100):\n"
                  "    try:\n        s = socket.create_connection(('10.77.0.12', 5299)); break\n"
                  "    except OSError:\n        time.sleep(0.05)\n"
                  f"block = bytes(1 << 20); t = time.perf_counter()\n"
                  f"for _ in range({nbytes >> 20}):\n    s.sendall(block)\n"
                  "s.shutdown(socket.SHUT_WR); s.recv(1); print(time.perf_counter() - t)\n")
        proc = _run(["ip", "netns", "exec", "mpffh1", sys.executable, "-c", source], timeout=120)
        assert proc.returncode == 0, proc.stderr
        return nbytes / float(proc.stdout)
    finally:
        sink.wait(timeout=30)
        set_link("unlimited")


@pytest.mark.parametrize("profile", ["100mbit"])
def test_a_link_profile_limits_the_bandwidth(hosts, profile):
    rate = _stream(profile, 12 << 20)
    assert 0.8 * RATES[profile] < rate < 1.05 * RATES[profile], f"{rate / 1e6:.1f} MB/s on {profile}"


def test_all_layers_on_two_hosts_goes_through_the_shaped_link(hosts, tmp_path):
    """One rank per host over 100 Mbit/s: every byte a rank sends or receives crosses its
    host's link (the veth counts at least the run's bytes_sent and bytes_received), and the
    run, its traces and its report name both hosts."""
    set_link("100mbit")
    try:
        before = {h: link_bytes(h) for h in hosts}
        job, log, run_dir = two_host_job(tmp_path, "run.schedule=all_layers")
        records = wait_for(job, log)
        after = {h: link_bytes(h) for h in hosts}
    finally:
        set_link("unlimited")
    assert_completed(records, log)
    assert records[0]["NodeList"] == "h[1-2]", records[0]
    info = assert_finished_run(run_dir, 2, "all_layers")
    assert [r["host"] for r in info["ranks"]] == list(hosts), info["ranks"]
    for r in info["ranks"]:
        received = after[r["host"]][0] - before[r["host"]][0]
        sent = after[r["host"]][1] - before[r["host"]][1]
        assert r["bytes_sent"] > 100_000 and sent >= r["bytes_sent"], (r, sent)
        assert received >= r["bytes_received"], (r, received)
    report = (run_dir / "report" / "report.md").read_text()
    assert re.search(r"^\| 0 \| h1 \|", report, re.M) and re.search(r"^\| 1 \| h2 \|", report, re.M), report
    assert "on 2 node(s) [h[1-2]]" in log.read_text()
    log.unlink()


@pytest.mark.parametrize("schedule", ["single_layer", "federated", "data_parallel"])
def test_every_schedule_on_two_hosts(hosts, tmp_path, schedule):
    """The multi-node script with one rank per host: Single Layer, Federated, and backprop
    data-parallel (DDP over gloo, its rendezvous on rank 0's host)."""
    extra = ("train.algorithm=backprop",) if schedule == "data_parallel" else ()
    job, log, run_dir = two_host_job(tmp_path, f"run.schedule={schedule}", *extra)
    assert_completed(wait_for(job, log), log)
    info = assert_finished_run(run_dir, 2, schedule)
    assert [r["host"] for r in info["ranks"]] == list(hosts), info["ranks"]
    if schedule != "data_parallel":  # DDP's all-reduce goes through gloo, not mpff's counters
        assert sum(r["bytes_sent"] for r in info["ranks"]) > 0, info["ranks"]
    log.unlink()


def test_preemption_on_two_hosts_requeues_and_resumes(hosts, tmp_path):
    """USR1 to the batch shell on h1: both hosts' ranks checkpoint and stop, the job requeues,
    and the second attempt resumes on the two hosts and finishes."""
    job, log, run_dir = two_host_job(tmp_path, "run.schedule=all_layers", "train.epochs=30",
                                     "train.chapters=30", "run.checkpoint_every=1")
    _wait_for_chapter(job, log, 2, 30)
    sig = _run(["scancel", "--batch", "--signal=USR1", job])
    assert sig.returncode == 0, sig.stderr
    records = wait_for(job, log)
    assert_completed(records, log)
    assert records[0]["Restarts"] == "1", records[0]
    text = log.read_text()
    assert "mpff train exited with 75" in text and "requeueing job" in text, text
    attempt2 = text.split("restart 1", 1)[1]
    assert "--resume" in attempt2 and re.search(r"^chapter +30/30 ", attempt2, re.M), text
    info = assert_finished_run(run_dir, 2, "all_layers")
    assert [r["host"] for r in info["ranks"]] == list(hosts)
    assert json.loads((run_dir / "run.json").read_text())["attempts"][-1]["resumed_after_chapter"] >= 2
    log.unlink()


# ------------------------------------------------------------------ faults between hosts

def _rank_processes(run_dir: Path) -> list[int]:
    """pids of the mpff ranks writing ``run_dir`` (on any host: one machine, one pid space)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"mpff" in args and str(run_dir).encode() in args and any(a.endswith(b"python") or b"python3" in a
                                                                      for a in args[:1]):
            pids.append(int(cmdline.parent.name))
    return pids


def _wait_for_chapter(job: str, log: Path, chapter: int, total: int) -> None:
    deadline = time.time() + JOB_TIMEOUT
    while not (log.exists() and re.search(rf"^chapter +{chapter}/{total} ", log.read_text(), re.M)):
        if time.time() > deadline or any(r["JobState"] in TERMINAL for r in job_records(job)):
            _run(["scancel", job])
            pytest.fail(f"job {job} never reached chapter {chapter}: {log.read_text() if log.exists() else ''}")
        time.sleep(0.2)


def _weights(path: Path) -> dict[str, bytes]:
    import h5py
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()].tobytes())
                     if isinstance(obj, h5py.Dataset) and name.startswith(("layers/", "head/")) else None)
    return out


LONG_RUN = ("run.schedule=all_layers", "train.lr=0.01", "train.epochs=40", "train.chapters=40",
            "run.checkpoint_every=1", "run.exchange=full")


def _reference(tmp_path: Path) -> dict[str, bytes]:
    """The same training uninterrupted: Sequential on one process (bit-identical to All Layers)."""
    from conftest import run_mpff
    out = tmp_path / "reference"
    settings = [x for s in (*[f"{k}" for k in
                              ("model.dims=[784,64,64,64]", "data.train_subset=2000", "data.test_subset=500",
                               "train.threads=1")], *LONG_RUN[1:], "run.schedule=sequential")
                for x in ("--set", s)]
    proc = run_mpff(["train", "--config", "configs/tiny.toml", "--out", str(out), "-q", *settings])
    assert proc.returncode == 0, proc.stderr
    return _weights(out / "model.h5")


def test_a_cut_link_ends_the_job_as_stalled_and_resume_is_bit_identical(hosts, tmp_path):
    """h2's link goes down mid-run: with run.stall_timeout = 8 both ranks end within 8 s and a
    few (exit 69), naming the silent rank and its host; the last checkpoint is intact, and once
    the link is back, --resume finishes bit-identical to an uninterrupted run."""
    stall = 8
    job, log, run_dir = two_host_job(tmp_path, *LONG_RUN, f"run.stall_timeout={stall}")
    _wait_for_chapter(job, log, 3, 40)
    _run(["bash", NETNS_SH, "cut", "h2"], timeout=10)
    cut = time.time()
    try:
        while _rank_processes(run_dir) and time.time() < cut + 120:
            time.sleep(0.2)
        ended = time.time() - cut
        left = _rank_processes(run_dir)
    finally:
        _run(["bash", NETNS_SH, "mend", "h2"], timeout=10)
    assert not left, f"ranks {left} still running 120 s after the cut"
    records = wait_for(job, log)
    text = log.read_text()
    assert records[0]["JobState"] == "FAILED" and records[0]["ExitCode"] == "69:0", (records[0], text)
    assert ended < stall + 10, f"the ranks ended {ended:.1f} s after the cut (stall_timeout {stall} s)"
    lines = [ln for ln in text.splitlines() if ln.startswith("mpff train:")]
    assert lines and re.search(rf"waited {stall} s .* rank \d on host h[12]", lines[0]), text
    state = json.loads((run_dir / "run.json").read_text())
    assert state["status"] == "failed" and state["exit_code"] == 69, state
    done = state["newest_complete_checkpoint"]
    assert done is not None and done >= 2, state
    log.unlink()
    job, log, _ = two_host_job(tmp_path, *LONG_RUN, f"run.stall_timeout={stall}", resume=True)
    assert_completed(wait_for(job, log), log)
    info = assert_finished_run(run_dir, 2, "all_layers")
    assert info["resumed_after_chapter"] == done, info
    assert _weights(run_dir / "model.h5") == _reference(tmp_path)
    log.unlink()


def _host_pids(host: str) -> list[int]:
    """Every process of an emulated host: those in its network namespace."""
    out = _run(["ip", "netns", "pids", f"mpff{host}"], timeout=10).stdout.split()
    return [int(p) for p in out]


def _start_slurmd(host: str) -> None:
    proc = _run(["bash", SLURM_SH, "start-slurmd", host], timeout=60)
    assert proc.returncode == 0, proc.stderr
    deadline = time.time() + 120
    while not _nodes_up():
        assert time.time() < deadline, _run(["sinfo", "-N", "-l"]).stdout
        time.sleep(0.5)


def _wait_until(what: str, cond, seconds: float) -> None:
    deadline = time.time() + seconds
    while not cond():
        if time.time() > deadline:
            pytest.fail(f"{what} did not happen within {seconds:.0f} s")
        time.sleep(0.5)


def test_a_host_crash_is_requeued_and_the_resume_is_bit_identical(hosts, tmp_path):
    """Every process of h1 (the batch host: slurmd, the batch script, its step and rank 0)
    SIGKILLed mid-run, as a crash would: rank 1 on h2 does not hang, SLURM marks h1 down
    (SlurmdTimeout) and requeues the job (--requeue); once h1 is back the job resumes from the
    last complete checkpoint and finishes bit-identical to an uninterrupted run."""
    job, log, run_dir = two_host_job(tmp_path, *LONG_RUN, "run.stall_timeout=8")
    try:
        _wait_for_chapter(job, log, 3, 40)
        for pid in _host_pids("h1"):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        crash = time.time()
        _wait_until("the end of rank 1 on h2", lambda: not _rank_processes(run_dir), 30)
        survivor_ended = time.time() - crash
        _wait_until("SLURM's requeue of the job",
                    lambda: any(r.get("Restarts") == "1" for r in job_records(job)), 300)
    finally:
        _start_slurmd("h1")
    assert survivor_ended < 20, f"rank 1 on h2 ran {survivor_ended:.1f} s after its peer's host crashed"
    records = wait_for(job, log)
    assert_completed(records, log)
    assert records[0]["Restarts"] == "1", records[0]
    info = assert_finished_run(run_dir, 2, "all_layers")
    assert [r["host"] for r in info["ranks"]] == list(hosts), info["ranks"]
    assert info["resumed_after_chapter"] >= 2, info
    assert _weights(run_dir / "model.h5") == _reference(tmp_path)
    log.unlink()


def test_a_crashed_slurmd_loses_nothing(hosts, tmp_path):
    """h2's slurmd SIGKILLed mid-run (its job steps live on): whatever SLURM then decides (the
    job finishes, or it ends and is requeued once the node is marked down), no data is lost: the
    run finishes, on its own or by --resume, bit-identical to an uninterrupted run."""
    job, log, run_dir = two_host_job(tmp_path, *LONG_RUN, "run.stall_timeout=8")
    try:
        _wait_for_chapter(job, log, 3, 40)
        proc = _run(["bash", SLURM_SH, "crash-slurmd", "h2"], timeout=30)
        assert proc.returncode == 0, proc.stderr
        _wait_until("the end of the ranks", lambda: not _rank_processes(run_dir), 300)
    finally:
        _start_slurmd("h2")
    records = wait_for(job, log)
    state = json.loads((run_dir / "run.json").read_text())
    if state["status"] != "finished":  # SLURM ended the job: resume it by hand
        assert state.get("newest_complete_checkpoint") is not None, state
        log.unlink()
        job, log, _ = two_host_job(tmp_path, *LONG_RUN, resume=True)
        records = wait_for(job, log)
    assert_completed(records, log)
    info = assert_finished_run(run_dir, 2, "all_layers")
    assert [r["host"] for r in info["ranks"]] == list(hosts), info["ranks"]
    assert _weights(run_dir / "model.h5") == _reference(tmp_path)
    log.unlink()
