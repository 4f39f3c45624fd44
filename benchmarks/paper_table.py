"""The paper's Table 1 trained as long as the paper trains it (issue 21): one row per invocation.

E = S = 100, batch 64, Adam lr 0.01 (FF layers) and 1e-4 (softmax head), the cooldown after
epoch 50, full MNIST, All Layers on 2 ranks with the paper's semantics (weights and biases
exchanged, each rank's Adaptive negatives made by itself N-1 = 1 chapter earlier:
``train.adaptive_lag = 1``), plus Single Layer and Sequential for Random/goodness.

    .venv/bin/python benchmarks/paper_table.py --list
    .venv/bin/python benchmarks/paper_table.py random-goodness                  # All Layers, 2 ranks
    .venv/bin/python benchmarks/paper_table.py random-goodness --seed 1         # the spread
    .venv/bin/python benchmarks/paper_table.py random-goodness-sequential
    .venv/bin/python benchmarks/paper_table.py random-goodness --time-limit 3000 # stop, resume later
    python3 benchmarks/paper_table.py adaptive-goodness --device cuda --dims 784 2000 2000 2000 2000

The network is ``[784,1000,1000,1000]`` by default: the paper's ``[784,2000,2000,2000,2000]``
takes about 165 s an epoch on one core here (a row would take about 5 hours on 2 ranks), so it
is the ``--dims`` of a GPU run (``benchmarks/gpu_check.sh``), where the ranks share the GPU.

Each row is its own run directory (``outputs/paper_table/<row>-s<seed>[-<dims>]``, checkpointed
every chapter): run the same command again after a stop, a ``--time-limit`` or a lost session and
it resumes from the newest checkpoint (a finished run is only read). Every invocation rewrites the
row's JSON (``benchmarks/results/paper_table/<row>-s<seed>[-<dims>].json``): status, test accuracy
per evaluated chapter, seconds per epoch, and the machine's load around each attempt, since
accuracy needs no quiet machine but times do.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

from _common import RESULTS, ROOT, VENV_BIN, read_json

#: The paper's Table 1 (SPEC section 1): test accuracy and wall time of the whole training,
#: [784, 2000, 2000, 2000, 2000] on its cluster, by (negatives, classifier) and schedule.
PAPER = {
    ("adaptive", "goodness"): {"sequential": (0.9852, 11191), "single_layer": (0.9843, 5255),
                               "all_layers": (0.9851, 2981)},
    ("random", "goodness"): {"sequential": (0.9833, 7179), "single_layer": (0.9826, 1974),
                             "all_layers": (0.9817, 2008)},
    ("fixed", "goodness"): {"sequential": (0.9795, 7143), "single_layer": (0.9794, 1921),
                            "all_layers": (0.9789, 1978)},
    ("adaptive", "softmax"): {"sequential": (0.9838, 8366), "single_layer": (0.9831, 2471),
                              "all_layers": (0.9830, 1886)},
    ("random", "softmax"): {"sequential": (0.9848, 8105), "single_layer": (0.9831, 1892),
                            "all_layers": (0.9833, 1786)},
}

#: row name -> (negatives, classifier, schedule, ranks)
ROWS = {
    "adaptive-goodness": ("adaptive", "goodness", "all_layers", 2),
    "random-goodness": ("random", "goodness", "all_layers", 2),
    "fixed-goodness": ("fixed", "goodness", "all_layers", 2),
    "adaptive-softmax": ("adaptive", "softmax", "all_layers", 2),
    "random-softmax": ("random", "softmax", "all_layers", 2),
    "random-goodness-single_layer": ("random", "goodness", "single_layer", 2),
    "random-goodness-sequential": ("random", "goodness", "sequential", 1),
}

DEFAULT_DIMS = [784, 1000, 1000, 1000]


def settings(row: str, *, dims: list[int], epochs: int, seed: int, eval_every: int, device: str,
             train_subset: int = 0, test_subset: int = 0) -> list[str]:
    negatives, classifier, schedule, ranks = ROWS[row]
    out = [f"model.dims=[{','.join(map(str, dims))}]", f"train.epochs={epochs}", f"train.chapters={epochs}",
           "train.batch_size=64", "train.lr=0.01", "train.head_lr=1e-4", f"train.negatives={negatives}",
           f"train.classifier={classifier}", f"train.seed={seed}", "train.threads=1",
           f"train.eval_every={eval_every}", f"run.schedule={schedule}", "run.exchange=weights",
           "run.checkpoint_every=1", "run.checkpoint_keep=2", f"run.device={device}",
           "data.dataset=mnist", f"data.train_subset={train_subset}", f"data.test_subset={test_subset}",
           "run.report=false"]
    if negatives == "adaptive" and ranks > 1 and schedule == "all_layers":
        out.append(f"train.adaptive_lag={ranks - 1}")   # the paper's All Layers: own negatives, N-1 old
    return out


def run_dir_name(row: str, seed: int, dims: list[int], epochs: int = 100, subset: int = 0) -> str:
    suffix = "" if dims == DEFAULT_DIMS else "-" + "x".join(map(str, dims[1:]))
    suffix += "" if epochs == 100 else f"-e{epochs}"
    suffix += f"-n{subset}" if subset else ""
    return f"{row}-s{seed}{suffix}"


def cpu_model() -> str | None:
    """The processor's name (/proc/cpuinfo): times of different sessions may come from different
    machines, and only times of one machine compare."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def attempt(out: str, sets: list[str], ranks: int, time_limit: float | None) -> tuple[int, dict]:
    """One `mpff train` (a resume when the run directory holds an unfinished run). A time limit
    stops it with SIGTERM, which mpff takes as a preemption: the newest checkpoint is kept."""
    from mpff.checkpoint import complete_checkpoints

    run = read_json(os.path.join(out, "run.json"))
    unfinished = run is not None and run.get("status") != "finished"
    resume = unfinished and bool(complete_checkpoints(out))
    cmd = [sys.executable, "-m", "mpi4py", "-m", "mpff", "train", "--out", out, "-q"]  # defaults: the paper's
    # stopped before its first checkpoint: nothing to keep, start again
    cmd += ["--resume"] if resume else ["--force"] if unfinished else []
    for s in sets:
        cmd += ["--set", s]
    if ranks > 1:
        cmd = [os.path.join(VENV_BIN, "mpiexec"), "-n", str(ranks)] + cmd
    env = dict(os.environ, MPIR_CVAR_ENABLE_HEAVY_YIELD="1", OMP_NUM_THREADS="1")
    load = {"loadavg_before": os.getloadavg(), "cpus": os.cpu_count(), "cpu_model": cpu_model(),
            "host": os.uname().nodename, "resumed": resume,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "chapters_before": int((run or {}).get("chapters_done") or 0)}
    print(f"paper_table: {'resuming' if resume else 'starting'} {out}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    try:
        code = proc.wait(timeout=time_limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        code = proc.wait()
        load["stopped_by_time_limit"] = True
    load.update(seconds=time.perf_counter() - t0, exit_code=code, loadavg_after=os.getloadavg())
    after = read_json(os.path.join(out, "run.json")) or {}
    load.update(chapters_after=int(after.get("chapters_done") or 0), status=after.get("status"),
                mpff_wall_time=after.get("wall_time"), mpff_training_seconds=after.get("training_seconds"))
    return code, load


def summarize(row: str, out: str, sets: list[str], epochs: int, attempts: list[dict]) -> dict:
    negatives, classifier, schedule, ranks = ROWS[row]
    run = read_json(os.path.join(out, "run.json")) or {}
    curve = {int(c): a for c, a in (run.get("accuracy_per_chapter") or {}).items()}
    paper_acc, paper_s = PAPER[(negatives, classifier)][schedule]
    done = int(run.get("chapters_done") or 0)
    # Every invocation's process time, start-up and re-done chapters (after a stop between two
    # checkpoints) included; per epoch over the chapters each invocation added.
    wall = sum(a["seconds"] for a in attempts) if attempts else None
    added = sum(max(0, a.get("chapters_after", 0) - a.get("chapters_before", 0)) for a in attempts)
    training = sum(a.get("mpff_training_seconds") or 0 for a in attempts) if attempts else None
    return {
        "row": row, "negatives": negatives, "classifier": classifier, "schedule": schedule,
        "ranks": ranks, "settings": sets, "run_dir": out,
        "status": run.get("status", "not started"), "chapters_done": done, "epochs": epochs,
        "test_accuracy": run.get("test_accuracy") if run.get("status") == "finished" else None,
        "accuracy_per_chapter": {str(c): curve[c] for c in sorted(curve)},
        "best_accuracy": max(curve.values()) if curve else None,
        "wall_time_s": wall,
        "seconds_per_epoch": wall / added if wall and added else None,
        "training_seconds": training,
        "training_seconds_per_epoch": training / added if training and added else None,
        "paper": {"test_accuracy": paper_acc, "wall_time_s": paper_s,
                  "dims": [784, 2000, 2000, 2000, 2000]},
        "invocations": attempts,
        "quiet": all(a["loadavg_before"][0] < ranks + 0.5 and a["loadavg_after"][0] < ranks + 1.0
                     for a in attempts if "loadavg_before" in a) if attempts else None,
    }


def plot(results: str) -> str | None:
    """Test accuracy per chapter of every row's JSON in one picture, each row's paper figure
    (at the paper's width) as a mark at E = 100: results/paper_table/curves.png and .pdf."""
    import glob

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [read_json(p) for p in sorted(glob.glob(os.path.join(results, "*.json")))]
    rows = [r for r in rows if r and r.get("accuracy_per_chapter")]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    for r in rows:
        pts = sorted((int(c), 100 * a) for c, a in r["accuracy_per_chapter"].items())
        name = os.path.basename(r["run_dir"])
        line, = ax.plot([c for c, _ in pts], [a for _, a in pts], marker=".", label=name)
        ax.plot([r["epochs"]], [100 * r["paper"]["test_accuracy"]], marker="*", markersize=11,
                color=line.get_color(), linestyle="none")
    ax.set_ylim(94, 99)
    ax.set_xlabel("chapter (E = S: one epoch a chapter)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("mpff per chapter; stars: the paper's final accuracy (4 x 2000 units)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = os.path.join(results, "curves")
    for ext in ("png", "pdf"):
        fig.savefig(f"{path}.{ext}")
    plt.close(fig)
    return path + ".png"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("row", nargs="?", choices=sorted(ROWS), help="the configuration to run")
    p.add_argument("--list", action="store_true", help="the rows and the state of each")
    p.add_argument("--plot", action="store_true", help="draw every row's accuracy curve (curves.png)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dims", type=int, nargs="+", default=DEFAULT_DIMS)
    p.add_argument("--epochs", type=int, default=100, help="E = S (100, the paper's)")
    p.add_argument("--eval-every", type=int, default=5,
                   help="chapters between test evaluations (default 5: 20 points, about 3 %% of the time)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds for this invocation; then stop at a checkpoint (resume later)")
    p.add_argument("--train-subset", type=int, default=0, help="first N training samples (0: all; a smoke run)")
    p.add_argument("--test-subset", type=int, default=0, help="first N test samples (0: all)")
    p.add_argument("--runs", default=os.path.join(ROOT, "outputs", "paper_table"),
                   help="where the run directories live (outside a fresh clone's reach: keep it)")
    args = p.parse_args()
    results = os.path.join(RESULTS, "paper_table")
    if args.plot:
        print(f"paper_table: wrote {plot(results)}")
        return 0
    if args.list or not args.row:
        for row in sorted(ROWS):
            name = run_dir_name(row, args.seed, args.dims, args.epochs, args.train_subset)
            got = read_json(os.path.join(results, f"{name}.json")) or {}
            acc = got.get("test_accuracy") or got.get("best_accuracy")
            print(f"{name:40s} {got.get('status', 'not started'):12s} "
                  f"{got.get('chapters_done', 0):>4}/{args.epochs}  {'' if acc is None else f'{acc:.2%}'}")
        return 0
    _, _, _, ranks = ROWS[args.row]
    name = run_dir_name(args.row, args.seed, args.dims, args.epochs, args.train_subset)
    out = os.path.join(args.runs, name)
    os.makedirs(args.runs, exist_ok=True)
    sets = settings(args.row, dims=args.dims, epochs=args.epochs, seed=args.seed,
                    eval_every=args.eval_every, device=args.device, train_subset=args.train_subset,
                    test_subset=args.test_subset)
    json_path = os.path.join(results, f"{name}.json")
    attempts = (read_json(json_path) or {}).get("invocations", [])
    run = read_json(os.path.join(out, "run.json"))
    code = 0
    if run is None or run.get("status") != "finished":
        code, info = attempt(out, sets, ranks, args.time_limit)
        attempts.append(info)
    summary = summarize(args.row, out, sets, args.epochs, attempts)
    os.makedirs(results, exist_ok=True)
    tmp = json_path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump({"benchmark": "paper_table", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **summary},
                  fh, indent=2)
        fh.write("\n")
    os.replace(tmp, json_path)
    acc = summary["test_accuracy"]
    print(f"paper_table: {name}: {summary['status']}, {summary['chapters_done']}/{args.epochs} chapters"
          + (f", test accuracy {acc:.2%} (paper {summary['paper']['test_accuracy']:.2%})" if acc else "")
          + f"; wrote {os.path.relpath(json_path, ROOT)}", flush=True)
    if summary["status"] != "finished":
        print("paper_table: not finished; run the same command again to resume", flush=True)
    return 0 if code in (0, 75) else code


if __name__ == "__main__":
    sys.exit(main())
