"""FF against backpropagation: time, memory and accuracy, on one rank and data-parallel (not a test).

SPEC section 4 and issue 11. On full MNIST, [784,1000,1000,1000], E = S = 10, batch 64, one
thread per rank, accuracy after every epoch:

- FF Sequential (1 rank) and PFF All Layers (2 ranks): Random negatives, goodness classifier,
  lr 0.01 (the settings of benchmarks/accuracy.py and speedup.py);
- BP Sequential (1 rank) and BP data-parallel (2 ranks, strong scaling: global batch 64):
  configs/backprop.toml.

For each: training seconds per epoch (setup and evaluation apart), seconds of training to reach
given test accuracies, peak memory per rank, bytes sent per rank and epoch, final accuracy; a
time-to-accuracy picture. Then the memory sweep: FF and BP training steps at depth 2..8 and batch
64..1024, each point in a process of its own, measured peak resident memory above the baseline
against the analytic figure (mpff.memory), with a picture. Everything goes to
benchmarks/results/ff_vs_bp.json (one section per part, each with its own date and command)
and the pictures beside it.

    .venv/bin/python benchmarks/ff_vs_bp.py                  # all of it: about half an hour on 2 cores
    .venv/bin/python benchmarks/ff_vs_bp.py --paper-width    # 2000-wide layers (slower, ~4x)
    .venv/bin/python benchmarks/ff_vs_bp.py --sweep-only     # the memory sweep alone (~5 min)
    .venv/bin/python benchmarks/ff_vs_bp.py --sweep-only --quick      # a smoke test (~30 s)
    .venv/bin/python benchmarks/ff_vs_bp.py --lr-sweep       # BP learning rates on a subset
    .venv/bin/python benchmarks/ff_vs_bp.py --bp-inprocess   # BP Sequential through BPState only

The runs go through `mpff train` as users run it; the sweep, --lr-sweep and --bp-inprocess
drive mpff's training code in-process (no MPI).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

from _common import RESULTS, ROOT, mpff_train

RESULT = os.path.join(RESULTS, "ff_vs_bp.json")
THRESHOLDS = (0.95, 0.97, 0.98)
#: kinds whose time is training (FF: the layers' epochs, pushing data, negatives, head;
#: BP: the train task, whose all-reduce spans lie inside it)
TRAIN_KINDS = ("train", "forward", "negatives", "head")
NOT_TRAINING = ("eval", "checkpoint", "io")


# ------------------------------------------------------------------------------- the runs
def run_cases(width: int, epochs: int, train_subset: int, keep: str) -> dict:
    dims = f"[784,{width},{width},{width}]"
    common = [f"model.dims={dims}", f"train.epochs={epochs}", f"train.chapters={epochs}",
              "train.batch_size=64", "train.threads=1", "train.eval_every=1",
              f"data.train_subset={train_subset}", "data.test_subset=0", "run.report=false",
              "run.checkpoint_every=0"]
    ff = common + ["train.negatives=random", "train.classifier=goodness", "train.lr=0.01"]
    cases = [
        ("ff_sequential", "configs/workstation.toml", 1, ff + ["run.schedule=sequential"]),
        ("pff_all_layers", "configs/workstation.toml", 2, ff + ["run.schedule=all_layers"]),
        ("bp_sequential", "configs/backprop.toml", 1, common + ["run.schedule=sequential"]),
        ("bp_data_parallel", "configs/backprop.toml", 2,
         common + ["run.schedule=data_parallel", "run.scaling=strong"]),
    ]
    rows = {}
    for name, config, ranks, sets in cases:
        out = os.path.join(keep, name)
        print(f"ff_vs_bp: {name} on {ranks} rank(s) ...", flush=True)
        run = mpff_train(out, config=config, sets=sets, ranks=ranks)
        rows[name] = summarize_run(out, run, epochs, ranks)
        rows[name].update(config=config, sets=sets, ranks=ranks, run_dir=out)
        print(f"ff_vs_bp: {name}: {json.dumps(rows[name]['summary'])}", flush=True)
    seq, dp = rows["bp_sequential"]["summary"], rows["bp_data_parallel"]["summary"]
    return {"dims": dims, "epochs": epochs, "cases": rows,
            "bp_data_parallel_minus_sequential_points":
                None if None in (seq["final_accuracy"], dp["final_accuracy"])
                else 100 * (dp["final_accuracy"] - seq["final_accuracy"])}


def read_traces(run_dir: str) -> list[dict]:
    """Per rank: spans and scalars with 0-based chapters (the run read by mpff.analysis.runs,
    which gives them 1-based whatever the trace format)."""
    import numpy as np

    from mpff.analysis.runs import load_run
    out = []
    for rt in load_run(run_dir).ranks:
        spans, scalars = rt.spans.copy(), rt.scalars.copy()
        for arr in (spans, scalars):
            arr["chapter"] = np.where(arr["chapter"] >= 1, arr["chapter"] - 1, arr["chapter"])
        out.append({"spans": spans, "scalars": scalars, "kinds": rt.kinds, "names": rt.scalar_names})
    return out


def summarize_run(run_dir: str, run: dict, epochs: int, ranks: int) -> dict:
    """Training time per chapter with evaluation (and checkpoints, model writing) taken out,
    accuracy per chapter, time to the thresholds, bytes and memory per rank."""
    import numpy as np
    traces = read_traces(run_dir)
    # training starts when the last rank has finished setting up (or, without setup spans, at
    # the first train span)
    setup_ends = [float(t["spans"]["end"][t["kinds"] == "setup"].max()) for t in traces
                  if (t["kinds"] == "setup").any()]
    start = max(setup_ends) if setup_ends else min(
        float(t["spans"]["start"][t["kinds"] == "train"].min()) for t in traces)
    ends, pauses = {}, []
    for t in traces:
        s, k = t["spans"], t["kinds"]
        for c, end in zip(s["chapter"][k == "train"], s["end"][k == "train"]):
            ends[int(c)] = max(ends.get(int(c), start), float(end))
        mask = np.isin(k, NOT_TRAINING)
        pauses += list(zip(s["start"][mask], s["end"][mask]))
    # A pause on any rank is taken out of the clock: exact for one rank and for data-parallel
    # (rank 0 evaluates while the others wait in the next all-reduce); for All Layers an upper
    # bound, as the other rank may go on training meanwhile.
    train_at = {c: end - start - sum(max(0.0, min(e, end) - max(b, start)) for b, e in pauses)
                for c, end in sorted(ends.items())}
    acc = {}
    for t in traces:
        m = t["names"] == "test_accuracy"
        acc.update({int(c): float(v) for c, v in zip(t["scalars"]["chapter"][m], t["scalars"]["value"][m])})
    curve = [(train_at[c], acc[c]) for c in sorted(acc) if c in train_at]
    reach = {f"{100 * th:g}%": next((round(ts, 2) for ts, a in curve if a >= th), None) for th in THRESHOLDS}
    sent = []
    for t in traces:
        s, k = t["spans"], t["kinds"]
        sent_bytes = float(s["bytes"][k == "send"].sum())
        # all-reduce: the bucket payload; a ring all-reduce sends 2 (N-1)/N of it from each rank
        sent_bytes += float(s["bytes"][k == "allreduce"].sum()) * 2 * (ranks - 1) / ranks
        sent.append(sent_bytes / epochs)
    allreduce_s = [float((t["spans"]["end"] - t["spans"]["start"])[t["kinds"] == "allreduce"].sum())
                   for t in traces]
    mem = [r.get("memory", {}) for r in run.get("ranks", [])]
    total = train_at[max(train_at)] if train_at else None
    return {
        "summary": {
            "train_seconds_per_epoch": None if total is None else total / epochs,
            "seconds_to_accuracy": reach,
            "peak_rss_bytes_max_rank": max((m.get("rss_peak_bytes", 0) for m in mem), default=None),
            "peak_rss_delta_bytes_max_rank": max((m.get("rss_peak_delta_bytes", 0) for m in mem), default=None),
            "bytes_sent_per_epoch_max_rank": max(sent) if sent else None,
            "final_accuracy": run.get("test_accuracy"),
        },
        "accuracy_curve": [{"train_seconds": ts, "accuracy": a} for ts, a in curve],
        "allreduce_span_seconds_per_rank": allreduce_s,
        "memory_per_rank": mem,
        "memory_analytic_per_rank": [r.get("memory_analytic") for r in run.get("ranks", [])],
        "wall_time_s": run.get("wall_time"),
    }


def plot_time_to_accuracy(section: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, row in section["cases"].items():
        pts = row["accuracy_curve"]
        ax.plot([p["train_seconds"] for p in pts], [100 * p["accuracy"] for p in pts], marker="o",
                label=f"{name} ({row['ranks']} rank{'s' if row['ranks'] > 1 else ''})")
    ax.set_xlabel("training seconds (setup and evaluation apart)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"MNIST {section['dims']}, E = {section['epochs']}, batch 64")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(f"{path}.{ext}")
    plt.close(fig)


# ------------------------------------------------------------------------- the memory sweep
def _warm_up() -> None:
    """One tiny FF and BP step, so torch's kernels, thread pool and allocator arenas exist before
    the baseline: what is measured afterwards is what the training step itself keeps."""
    import torch
    import torch.nn.functional as F

    from mpff.ff import FFLayer, make_adam, train_epochs
    from mpff.model import MLP
    layer = FFLayer(16, 8)
    train_epochs(layer, make_adam(layer.parameters(), 0.01), torch.randn(8, 16), torch.randn(8, 16),
                 batch_size=4, lrs=[0.01], seeds=[0])
    net = MLP([16, 8])
    opt = make_adam(net.parameters(), 1e-3)
    F.cross_entropy(net(torch.randn(4, 16)), torch.zeros(4, dtype=torch.long)).backward()
    opt.step()


def measure_point(algorithm: str, dims: list[int], batch: int) -> dict:
    """In this process (run it in a fresh one): build the network after the baseline, take a few
    training steps as mpff does, return measured and analytic peak memory above the baseline."""
    import numpy as np
    import torch

    from mpff import memory
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    _warm_up()
    rng = np.random.default_rng(0)
    n = 2 * batch  # two steps an epoch
    if algorithm == "bp":
        from mpff.backprop import BPState
        from mpff.config import from_dict
        from mpff.data import Dataset
        from mpff.plan import Task
        from mpff.trace import Tracer
        cfg = from_dict({"model": {"dims": dims},
                         "train": {"algorithm": "backprop", "epochs": 2, "chapters": 2, "batch_size": batch}})
        ds = Dataset(name="synthetic", x_train=rng.standard_normal((n, dims[0]), dtype=np.float32),
                     y_train=rng.integers(0, 10, n), x_test=np.zeros((1, dims[0]), np.float32),
                     y_test=np.zeros(1, np.int64))
        gc.collect()
        base = memory.start()
        state = BPState(cfg, None, 0, 1, ds, Tracer(None, 0, {}, enabled=False), torch.device("cpu"))
        for c in range(2):
            state.run(Task("train", c, 0))
        measured = memory.finish(base)
        analytic = memory.bp_analytic(dims, batch)
    else:
        from mpff.ff import train_epochs
        from mpff.model import FFNet
        # each layer's (already normalised) inputs, made before the baseline: the sweep measures
        # the training step; FF's chapter data is the analytic "chapter_data" figure
        inputs = [(rng.standard_normal((n, d), dtype=np.float32), rng.standard_normal((n, d), dtype=np.float32))
                  for d in dims[:-1]]
        inputs = [(torch.from_numpy(p), torch.from_numpy(q)) for p, q in inputs]
        gc.collect()
        base = memory.start()
        net = FFNet(dims)
        opts = [layer.make_optimizer(0.01) for layer in net.layers]
        for chapter in range(2):
            for k, layer in enumerate(net.layers):
                train_epochs(layer, opts[k], *inputs[k], batch_size=batch, lrs=[0.01], seeds=[chapter * 100 + k])
        measured = memory.finish(base)
        analytic = memory.ff_analytic(dims, batch)
    return {"algorithm": algorithm, "dims": dims, "batch": batch, "measured": measured, "analytic": analytic}


#: glibc keeps memory that torch has freed and reuses it later; the resident set then counts it.
#: A fixed mmap threshold (glibc's own tunable) gives every tensor above 64 KiB its own mapping,
#: returned to the system when the tensor is freed, so that the resident set follows what is
#: alive. The sweep measures both ways.
ALLOCATORS = {"default": {}, "returned": {"MALLOC_MMAP_THRESHOLD_": "65536"}}


def run_sweep(width: int, depths: list[int], batches: list[int]) -> dict:
    points = []
    for algorithm in ("ff", "bp"):
        for depth in depths:
            for batch in batches:
                dims = [784] + [width] * depth
                point = {"algorithm": algorithm, "dims": dims, "batch": batch, "measured": {}}
                for allocator, extra_env in ALLOCATORS.items():
                    cmd = [sys.executable, os.path.abspath(__file__), "--point", algorithm,
                           ",".join(map(str, dims)), str(batch)]
                    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra_env}
                    proc = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True)
                    if proc.returncode != 0:
                        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
                    got = json.loads(proc.stdout.strip().splitlines()[-1])
                    point["analytic"] = got["analytic"]
                    point["measured"][allocator] = got["measured"]
                peak = point["analytic"]["peak"]
                point["measured_over_analytic"] = {
                    a: m["rss_peak_delta_bytes"] / peak for a, m in point["measured"].items()}
                points.append(point)
                print(f"ff_vs_bp: sweep {algorithm} depth {depth} batch {batch}: analytic "
                      f"{peak / 2**20:.1f} MiB, measured " + ", ".join(
                          f"{a} {m['rss_peak_delta_bytes'] / 2**20:.1f} MiB "
                          f"({point['measured_over_analytic'][a]:.2f}x)" for a, m in point["measured"].items()),
                      flush=True)
    return {"width": width, "depths": depths, "batches": batches, "points": points,
            "allocators": ALLOCATORS,
            "note": "peak resident memory above the baseline (data made, torch warmed up, model not "
                    "yet built) over a few training steps, one process per point and allocator "
                    "setting; FF's chapter data (the data pushed through the layers) is not part "
                    "of a step and is left out (analytic chapter_data gives it)"}


def plot_sweep(section: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pts = section["points"]
    depths, batches = section["depths"], section["batches"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"ff": "#1f77b4", "bp": "#d62728"}
    mib = 2 ** 20
    panels = ((axes[0], "batch", lambda p: len(p["dims"]) - 1 == depths[-1],
               f"depth {depths[-1]}, width {section['width']}"),
              (axes[1], "depth", lambda p: p["batch"] == batches[-1],
               f"batch {batches[-1]}, width {section['width']}"))
    for ax, xname, keep, title in panels:
        for alg in ("ff", "bp"):
            sel = sorted((p for p in pts if p["algorithm"] == alg and keep(p)),
                         key=lambda p: p["batch"] if xname == "batch" else len(p["dims"]))
            x = [p["batch"] if xname == "batch" else len(p["dims"]) - 1 for p in sel]
            ax.plot(x, [p["measured"]["default"]["rss_peak_delta_bytes"] / mib for p in sel], "o-",
                    color=colors[alg], label=f"{alg.upper()} measured")
            ax.plot(x, [p["measured"]["returned"]["rss_peak_delta_bytes"] / mib for p in sel], "s:",
                    color=colors[alg], label=f"{alg.upper()} measured, freed memory returned")
            ax.plot(x, [p["analytic"]["peak"] / mib for p in sel], "--", color=colors[alg],
                    label=f"{alg.upper()} analytic")
        ax.set_xlabel(xname if xname == "depth" else "batch size (FF: positives; + as many negatives)")
        if xname == "batch":
            ax.set_xscale("log", base=2)
        ax.set_xticks(batches if xname == "batch" else depths)
        ax.set_xticklabels([str(v) for v in (batches if xname == "batch" else depths)])
        ax.set_ylabel("peak memory above baseline (MiB)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(f"{path}.{ext}")
    plt.close(fig)


# -------------------------------------------------------------- BP through BPState, in-process
def bp_inprocess(dims: list[int], epochs: int, lrs: list[float], train_subset: int,
                 test_subset: int) -> list[dict]:
    """BP Sequential through BPState (no CLI, no MPI): accuracy and seconds per epoch per rate."""
    import torch

    from mpff.backprop import BPState
    from mpff.config import from_dict
    from mpff.data import load_dataset
    from mpff.plan import Task
    from mpff.trace import Tracer
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    out = []
    for lr in lrs:
        cfg = from_dict({"model": {"dims": dims},
                         "train": {"algorithm": "backprop", "epochs": epochs, "chapters": epochs,
                                   "batch_size": 64, "bp_lr": lr},
                         "data": {"train_subset": train_subset, "test_subset": test_subset}})
        ds = load_dataset(cfg.data)
        state = BPState(cfg, None, 0, 1, ds, Tracer(None, 0, {}, enabled=False), torch.device("cpu"))
        acc, secs, losses = [], [], []
        for c in range(epochs):
            t0 = time.perf_counter()
            losses.append(state.run(Task("train", c, 0))[0][3])
            secs.append(time.perf_counter() - t0)
            acc.append(state.run(Task("eval", c))[0][3])
            print(f"ff_vs_bp: bp lr {lr:g} epoch {c + 1}: loss {losses[-1]:.4f} test {100 * acc[-1]:.2f}% "
                  f"({secs[-1]:.1f} s)", flush=True)
        out.append({"bp_lr": lr, "test_accuracy_per_epoch": acc, "train_loss_per_epoch": losses,
                    "train_seconds_per_epoch": secs, "final_accuracy": acc[-1],
                    "best_accuracy": max(acc)})
    return out


# ------------------------------------------------------------------------------- results
def update_result(section: str, data: dict, path: str = RESULT) -> None:
    """ff_vs_bp.json holds one section per part; a part run alone replaces only its section."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with open(path) as fh:
            result = json.load(fh)
    except (OSError, ValueError):
        result = {"benchmark": "ff_vs_bp"}
    result[section] = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host_cpus": os.cpu_count(),
                       "command": " ".join(["benchmarks/ff_vs_bp.py", *sys.argv[1:]]), **data}
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2)
        fh.write("\n")
    print(f"ff_vs_bp: wrote section {section!r} of {path}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--paper-width", action="store_true", help="2000-wide layers (the paper's width) instead of 1000")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--train-subset", type=int, default=0, help="the runs: first N training samples (0: all)")
    p.add_argument("--sweep-only", action="store_true", help="only the memory sweep")
    p.add_argument("--no-sweep", action="store_true", help="only the runs")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: sweep at width 256, depths 2 4, batches 64 256, written under --keep")
    p.add_argument("--depths", type=int, nargs="+", default=[2, 3, 4, 5, 6, 7, 8])
    p.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    p.add_argument("--lr-sweep", action="store_true",
                   help="BP Sequential at lr 3e-4, 1e-3, 3e-3 (in-process; --lr-epochs on --lr-subset samples)")
    p.add_argument("--lr-epochs", type=int, default=3)
    p.add_argument("--lr-subset", type=int, default=20000)
    p.add_argument("--bp-inprocess", action="store_true",
                   help="BP Sequential through BPState, full MNIST, --epochs epochs, lr 1e-3")
    p.add_argument("--keep", default=os.path.join(ROOT, "outputs", "bench-ff-vs-bp"),
                   help="where the run directories are kept")
    p.add_argument("--point", nargs=3, metavar=("ALG", "DIMS", "BATCH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    width = 2000 if args.paper_width else 1000
    dims = [784, width, width, width]

    if args.point:  # one sweep point, in a process of its own
        alg, d, b = args.point
        print(json.dumps(measure_point(alg, [int(v) for v in d.split(",")], int(b))))
        return
    if args.lr_sweep:
        rows = bp_inprocess(dims, args.lr_epochs, [3e-4, 1e-3, 3e-3], args.lr_subset, 0)
        update_result("bp_lr", {"dims": dims, "epochs": args.lr_epochs, "train_subset": args.lr_subset,
                                "batch_size": 64, "rates": rows})
        return
    if args.bp_inprocess:
        rows = bp_inprocess(dims, args.epochs, [1e-3], 0, 0)
        update_result("bp_inprocess", {"dims": dims, "epochs": args.epochs, "batch_size": 64, **rows[0]})
        return
    if not args.sweep_only:
        section = run_cases(width, args.epochs, args.train_subset, args.keep)
        update_result("runs", section)
        plot_time_to_accuracy(section, os.path.join(RESULTS, "ff_vs_bp_time_to_accuracy"))
    if not args.no_sweep:
        if args.quick:  # a smoke test, not a result: kept beside the run directories
            section = run_sweep(256, [2, 4], [64, 256])
            where = os.path.join(args.keep, "quick")
            update_result("memory_sweep", section, os.path.join(where, "ff_vs_bp.json"))
            plot_sweep(section, os.path.join(where, "ff_vs_bp_memory"))
        else:
            section = run_sweep(width, args.depths, args.batches)
            update_result("memory_sweep", section)
            plot_sweep(section, os.path.join(RESULTS, "ff_vs_bp_memory"))


if __name__ == "__main__":
    main()
