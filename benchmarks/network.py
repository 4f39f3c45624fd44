"""mpff across a network: PFF against data-parallel backprop over shaped links (not a test).

Issue 20, item 3 and 4. On the emulated cluster of .ci/slurm.sh (MPFF_SLURM_NET=netns: two
hosts in network namespaces, each link shaped by tbf; docs/cluster.md), for each link profile,
with one rank on each of the 2 hosts, at [784,1000,1000,1000] on full MNIST, E = S = --epochs:

- PFF All Layers, Single Layer recomputing its inputs, Single Layer shipping them
  (run.inputs = "ship"), against FF Sequential on one host;
- backprop data-parallel (DDP over gloo), strong and weak scaling, against backprop on one host;

seconds per training epoch (run.json's training_seconds / E), bytes that crossed the link
(the veth counters of both hosts), test accuracy after the same epochs. Where a DDP run would
take longer than --max-seconds at a profile's bandwidth, it trains on a subset of the training
set sized to fit, and its seconds per epoch are scaled to the full set (said in the JSON; its
accuracy is then not comparable and left out).

Then, per profile, the link measured by an MPI ping-pong between the hosts (latency: half the
round trip of 8 bytes; bandwidth: of 8 MiB messages) and `mpff predict` from the one-host runs
with that link, against the measured 2-host runs: the error of each schedule's training time.

    sudo MPFF_SLURM_NET=netns bash .ci/slurm.sh start          # the emulated cluster
    .venv/bin/python benchmarks/network.py                      # ~40 minutes at --epochs 3 here
    .venv/bin/python benchmarks/network.py --profiles 100mbit --epochs 2   # one profile

Writes benchmarks/results/network.json and network.png (speedup against link bandwidth per
method). Both emulated hosts share this machine's cores: the ranks do not share a core (2
cores, 2 ranks) but do share the memory bus, which one-host baselines do not see.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from _common import RESULTS, ROOT, write_result

PROFILES = ("unlimited", "10gbe", "1gbe", "100mbit")
RATE = {"unlimited": None, "10gbe": 10e9 / 8, "1gbe": 1e9 / 8, "100mbit": 100e6 / 8}  # bytes/s (nominal)
HOSTS = ("h1", "h2")
PY = sys.executable
NETNS = os.path.join(ROOT, ".ci", "netns.sh")
SLURM_SH = os.path.join(ROOT, ".ci", "slurm.sh")
FULL_TRAIN = 60000

FF = ("train.negatives=random", "train.classifier=goodness", "train.lr=0.01")
#: name -> (ranks, config, settings, the one-host run it is compared with)
METHODS = {
    "ff_sequential": (1, "workstation", (*FF, "run.schedule=sequential"), None),
    "all_layers": (2, "workstation", (*FF, "run.schedule=all_layers"), "ff_sequential"),
    "single_layer_recompute": (2, "workstation", (*FF, "run.schedule=single_layer", "run.inputs=recompute"),
                               "ff_sequential"),
    "single_layer_ship": (2, "workstation", (*FF, "run.schedule=single_layer", "run.inputs=ship"),
                          "ff_sequential"),
    "bp_sequential": (1, "backprop", ("run.schedule=sequential",), None),
    "bp_strong": (2, "backprop", ("run.schedule=data_parallel", "run.scaling=strong"), "bp_sequential"),
    "bp_weak": (2, "backprop", ("run.schedule=data_parallel", "run.scaling=weak"), "bp_sequential"),
}
#: bytes DDP all-reduces per step at [784,1000,1000,1000] -> 10 (fp32 gradients), and steps
GRADIENT_BYTES = 4 * (784 * 1000 + 1000 + 2 * (1000 * 1000 + 1000) + 1000 * 10 + 10)


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    e.update(MPIR_CVAR_ENABLE_HEAVY_YIELD="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
             # what mpff.mpienv sets for mpff's ranks across nodes; the ping-pong needs it too (UCX
             # would see the namespaces as one machine and use shared memory)
             MPIR_CVAR_CH4_NETMOD="ofi")
    return e


def sh(*cmd: str, timeout: float = 60) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout).stdout


def link_bytes() -> int:
    """Bytes the two hosts have sent, counted on their veths."""
    return sum(int(sh("bash", NETNS, "bytes", h).split()[1]) for h in HOSTS)


def srun(ranks: int, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    cmd = ["srun", f"-N{ranks}", f"-n{ranks}", "--ntasks-per-node=1", "--mpi=pmi2", "--kill-on-bad-exit=1",
           *(["-w", "h1"] if ranks == 1 else []), PY, "-m", "mpi4py", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


def ddp_subset(profile: str, epochs: int, max_seconds: float) -> int:
    """Training samples for a 2-rank DDP run that moves its gradients within ``max_seconds``."""
    rate = RATE[profile]
    if rate is None:
        return 0
    steps_fit = max_seconds * rate / GRADIENT_BYTES / epochs  # a 2-rank ring sends ~1x per step
    if steps_fit * 64 >= FULL_TRAIN:
        return 0
    return max(640, int(steps_fit) * 64)


def train(name: str, out: str, epochs: int, subset: int, timeout: float) -> dict:
    ranks, config, sets, _ = METHODS[name]
    common = ("model.dims=[784,1000,1000,1000]", f"train.epochs={epochs}", f"train.chapters={epochs}",
              "train.batch_size=64", "train.threads=1", f"train.eval_every={epochs}",
              f"data.train_subset={subset}", "data.test_subset=0", "run.report=false", "run.checkpoint_every=0")
    args = ["-m", "mpff", "train", "--config", config, "--out", out, "--force", "-q",
            *[x for s in (*common, *sets) for x in ("--set", s)]]
    before, t0 = link_bytes(), time.perf_counter()
    proc = srun(ranks, args, timeout)
    wall, moved = time.perf_counter() - t0, link_bytes() - before
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    with open(os.path.join(out, "run.json")) as fh:
        info = json.load(fh)
    scale = FULL_TRAIN / subset if subset else 1.0
    return {"run_dir": out, "ranks": ranks, "hosts": [r["host"] for r in info["ranks"]],
            "train_subset": subset or None, "epochs": epochs,
            "seconds_per_epoch": info["training_seconds"] / epochs * scale,
            "seconds_per_epoch_scaled_from_subset": bool(subset),
            "training_seconds": info["training_seconds"], "wall_seconds": wall,
            "bytes_sent_by_mpff": sum(r["bytes_sent"] for r in info["ranks"]),
            "bytes_on_the_link": moved,
            "test_accuracy": None if subset else info["test_accuracy"]}


PINGPONG = r"""
import json, time, sys
import numpy as np
from mpi4py import MPI
c = MPI.COMM_WORLD
def rounds(n, reps):
    buf = np.zeros(n, np.uint8)
    c.Barrier(); best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        if c.rank == 0:
            c.Send(buf, 1); c.Recv(buf, 1)
        else:
            c.Recv(buf, 0); c.Send(buf, 0)
        best = min(best, time.perf_counter() - t)
    return best
small = rounds(8, 200)
big_n = 8 << 20
big = rounds(big_n, 5)
if c.rank == 0:
    latency = small / 2
    print(json.dumps({"latency_s": latency, "bandwidth_Bps": big_n / (big / 2 - latency)}))
"""


def pingpong() -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:
        fh.write(PINGPONG)
    proc = srun(2, [fh.name], 300)
    os.unlink(fh.name)
    if proc.returncode != 0:
        raise RuntimeError(f"ping-pong failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def predict(base: str, measured: list[str], schedules: str, link: dict, sets: tuple[str, ...]) -> list[dict]:
    cmd = [PY, "-m", "mpff", "predict", base, *measured, "--ranks", "2", "--schedules", schedules,
           "--latency", f"{link['latency_s']:.3e}s", "--bandwidth", f"{link['bandwidth_Bps']:.4e}B/s",
           "--json", "--out", tempfile.mkdtemp(prefix="mpff-predict-"), *[x for s in sets for x in ("--set", s)]]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return [{"error": proc.stderr.strip()[-500:]}]
    return [p for p in json.loads(proc.stdout)["predictions"] if p["ranks"] == 2]


def predictions(runs: dict) -> dict:
    out = {}
    ff_base, bp_base = runs["ff_sequential"]["run_dir"], runs["bp_sequential"]["run_dir"]
    for name, sets, schedules, base in (
            ("all_layers", (), "all_layers", ff_base),
            ("single_layer_recompute", ("run.inputs=recompute",), "single_layer", ff_base),
            ("single_layer_ship", ("run.inputs=ship",), "single_layer", ff_base),
            ("bp_strong", ("run.scaling=strong",), "data_parallel", bp_base),
            ("bp_weak", ("run.scaling=weak",), "data_parallel", bp_base)):
        if name not in runs or runs[name]["train_subset"]:
            continue
        preds = predict(base, [runs[name]["run_dir"]], schedules, runs["link"], sets)
        p = preds[0] if preds else {}
        measured = runs[name]["training_seconds"]
        out[name] = {"predicted_training_seconds": p.get("training_seconds"), "measured_training_seconds": measured,
                     "error": (p["training_seconds"] / measured - 1) if p.get("training_seconds") else None,
                     "prediction": p}
    return out


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    profiles = [p for p in PROFILES if p in result["profiles"]]
    xs = [result["profiles"][p]["link"]["bandwidth_Bps"] * 8 / 1e9 for p in profiles]  # as measured
    for name in METHODS:
        if METHODS[name][3] is None:
            continue
        ys = [result["profiles"][p]["runs"].get(name, {}).get("speedup") for p in profiles]
        pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=name.replace("_", " "))
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("link bandwidth, measured by MPI ping-pong (Gbit/s)")
    ax.set_ylabel("speedup over one host (seconds per epoch)")
    ax.set_title("2 hosts, one rank each, [784,1000,1000,1000], MNIST", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=200)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profiles", default=",".join(PROFILES))
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--max-seconds", type=float, default=90.0, help="longest DDP run before it takes a subset")
    ap.add_argument("--out", default=os.path.join(ROOT, "outputs", "bench-network"))
    args = ap.parse_args()
    if "h[1-2]" not in sh("sinfo", "-h", "-o", "%N"):
        print("network benchmark: needs the emulated cluster: sudo MPFF_SLURM_NET=netns bash .ci/slurm.sh start",
              file=sys.stderr)
        return 2
    result = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "command": " ".join(sys.argv),
              "epochs": args.epochs, "dims": [784, 1000, 1000, 1000], "profiles": {}}
    one_host: dict = {}
    sh("bash", SLURM_SH, "link", "unlimited")
    for name in ("ff_sequential", "bp_sequential"):
        print(f"network benchmark: {name} on one host", flush=True)
        one_host[name] = train(name, os.path.join(args.out, name), args.epochs, 0, 3600)
    result["one_host"] = one_host
    for profile in args.profiles.split(","):
        sh("bash", SLURM_SH, "link", profile)
        runs: dict = {"link": pingpong()}
        print(f"network benchmark: {profile}: link {runs['link']}", flush=True)
        for name, (ranks, _, _, base) in METHODS.items():
            if ranks == 1:
                continue
            subset = ddp_subset(profile, args.epochs, args.max_seconds) if name.startswith("bp_") else 0
            print(f"network benchmark: {profile}: {name}" + (f" on {subset} samples" if subset else ""), flush=True)
            r = train(name, os.path.join(args.out, profile, name), args.epochs, subset, 3600)
            r["speedup"] = one_host[base]["seconds_per_epoch"] / r["seconds_per_epoch"]
            runs[name] = r
        runs["ff_sequential"], runs["bp_sequential"] = one_host["ff_sequential"], one_host["bp_sequential"]
        runs["predicted"] = predictions(runs)
        del runs["ff_sequential"], runs["bp_sequential"]
        result["profiles"][profile] = {"runs": {k: v for k, v in runs.items() if k not in ("link", "predicted")},
                                       "link": runs["link"], "predicted": runs["predicted"]}
        write_result("network", result)  # after each profile: a partial result survives
    sh("bash", SLURM_SH, "link", "unlimited")
    plot(result, os.path.join(RESULTS, "network.png"))
    print(json.dumps({p: {k: round(v["speedup"], 2) for k, v in d["runs"].items()}
                      for p, d in result["profiles"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
