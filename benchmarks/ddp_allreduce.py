"""Where DDP's time goes on the emulated cluster (issue 20, item 4; not a test).

`mpff predict` underestimates data-parallel backprop on the two emulated hosts by 37-58 %
(RESULTS.md, "Across a network"). This takes a DDP step of the benchmark's network apart, one
rank on each host (srun, as mpff runs), [784,1000,1000,1000] -> 10, batch --rows, one thread,
Adam, for each mode, median milliseconds per step of each phase on rank 0:

- ``alone``: both ranks compute their steps, no communication (what the one-rank baseline and
  the model's compute term assume, plus the two ranks sharing the machine);
- ``ddp``: DistributedDataParallel over gloo, plain (the backward pass includes the all-reduce
  DDP waits for); ``ddp_views``: with gradient_as_bucket_view; ``ddp_pyhook``: and a Python comm
  hook that only forwards to the default all-reduce; ``ddp_mpff``: as mpff.backprop wraps it
  (bucket views, a Python hook whose callback times each bucket);
- ``allreduce``: the all-reduce only, DDP's two buckets (4.0 and 7.1 MB) back to back, both ranks
  idle otherwise and started together (a barrier first): what a probe of the link with gloo
  measures, the best case for the model's communication term.

    sudo MPFF_SLURM_NET=netns bash .ci/slurm.sh start
    .venv/bin/python benchmarks/ddp_allreduce.py            # about five minutes

Writes benchmarks/results/ddp_allreduce.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from _common import ROOT, write_result

STEP = r"""
import json, socket, statistics, sys, time
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from mpi4py import MPI
torch.set_num_threads(1)
c = MPI.COMM_WORLD
rows, mode, steps = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
addr = (socket.gethostname(), 29519) if c.rank == 0 else None
host, port = c.bcast(addr)
c.Barrier()
dist.init_process_group("gloo", init_method=f"tcp://{host}:{port}", rank=c.rank, world_size=c.size)
torch.manual_seed(0)
dims = [784, 1000, 1000, 1000, 10]
mods = []
for a, b in zip(dims[:-1], dims[1:]):
    mods += [torch.nn.Linear(a, b), torch.nn.ReLU()]
net = torch.nn.Sequential(*mods[:-1])
if mode == "ddp":
    model = DDP(net)
elif mode == "ddp_mpff":  # as mpff.backprop wraps it: bucket views and a Python hook that times
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    model = DDP(net, gradient_as_bucket_view=True)
    spans = []
    def hook(group, bucket):
        start = time.perf_counter()
        def done(fut):
            spans.append(time.perf_counter() - start)
            return fut.value()
        return default_hooks.allreduce_hook(group, bucket).then(done)
    model.register_comm_hook(None, hook)
elif mode == "ddp_pyhook":  # a Python hook that only forwards to the default all-reduce
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    model = DDP(net, gradient_as_bucket_view=True)
    model.register_comm_hook(None, lambda group, bucket: default_hooks.allreduce_hook(group, bucket))
elif mode == "ddp_views":
    model = DDP(net, gradient_as_bucket_view=True)
else:
    model = net
opt = torch.optim.Adam(model.parameters(), 1e-3)
x, y = torch.randn(rows, 784), torch.randint(0, 10, (rows,))
buckets = [torch.zeros(1_011_010), torch.zeros(1_786_000)]  # DDP's buckets of this net, fp32
phases = {"forward": [], "backward": [], "allreduce": [], "optimizer": []}
for i in range(steps + 10):
    t = [time.perf_counter()]
    if mode != "allreduce":
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        t.append(time.perf_counter())
        loss.backward()
        t.append(time.perf_counter())
        opt.step()
        t.append(time.perf_counter())
        got = {"forward": t[1] - t[0], "backward": t[2] - t[1], "optimizer": t[3] - t[2]}
    else:
        dist.barrier()
        t0 = time.perf_counter()
        for b in buckets:
            dist.all_reduce(b)
        got = {"allreduce": time.perf_counter() - t0}
    if i >= 10:
        for k, v in got.items():
            phases[k].append(v)
out = {k: 1000 * statistics.median(v) for k, v in phases.items() if v}
if c.rank == 0:
    print(json.dumps(out))
dist.destroy_process_group()
"""


def srun(args: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update(OMP_NUM_THREADS="1", MPIR_CVAR_CH4_NETMOD="ofi", MPIR_CVAR_ENABLE_HEAVY_YIELD="1")
    cmd = ["srun", "-N2", "-n2", "--ntasks-per-node=1", "--mpi=pmi2", sys.executable, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64, help="rows per rank and step (64: the weak-scaling runs)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--modes", default="alone,ddp,ddp_views,ddp_pyhook,ddp_mpff,allreduce")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of the modes, alternated")
    args = ap.parse_args()
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:
        fh.write(STEP)
    rounds: dict[str, list[dict]] = {m: [] for m in args.modes.split(",")}
    try:
        for _ in range(args.repeats):
            for mode in rounds:
                rounds[mode].append(srun([fh.name, str(args.rows), mode, str(args.steps)]))
    finally:
        os.unlink(fh.name)

    def med(mode: str, phase: str) -> float:
        values = sorted(r[phase] for r in rounds[mode])
        return values[len(values) // 2]

    steps = {m: {p: med(m, p) for p in rounds[m][0]} for m in rounds}
    result = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "command": " ".join(sys.argv), "rows": args.rows,
              "steps": args.steps, "rounds": rounds, "median_ms": steps,
              "step_ms": {m: sum(v.values()) for m, v in steps.items()}}
    if "alone" in steps:
        result["extra_over_alone_ms"] = {m: result["step_ms"][m] - result["step_ms"]["alone"]
                                         for m in steps if m not in ("alone", "allreduce")}
    write_result("ddp_allreduce", result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("rounds", "command")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
