"""Where a Sequential training step's time goes, against the machine's limit (not a test).

One epoch's steps of each layer of the accuracy benchmark's network (`[784,1000,1000,1000]`,
batch 64: 128 rows a step, positives and negatives), run through mpff's own `train_epochs`
on one thread, fp32, on inputs of the benchmark's shape (random, normalised: the time of a
step does not depend on the values). For each layer:

- the step time without a profiler (median of several epochs' steps),
- the arithmetic floor: the step's two GEMMs (forward and weight gradient, 4 · 128 · in · out
  flop) at the GEMM rate measured here in the same run, plus Adam's memory traffic (read the
  parameters, gradients and both moments, write back three: 28 bytes a parameter) at the
  bandwidth a streaming add over arrays of the layer's size reaches here (12 bytes an element),
- torch.profiler's self time by category: GEMM (addmm/mm), Adam (the fused kernel), the gather
  of the batch (index_select), the other element-wise operators (ReLU, goodness, softplus,
  their gradients, zeroing), and what no operator accounts for (Python, the dispatcher,
  autograd's bookkeeping), scaled to the unprofiled step time.

    .venv/bin/python benchmarks/profile_step.py [--steps 200]

Writes benchmarks/results/profile_step.json.
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import median, write_result
from precision import BATCH, DIMS, cpu_flags, gemm_rate

from mpff.ff import FFLayer, make_adam, train_epochs


def category(name: str) -> str:
    n = name.lower()
    if n in ("aten::addmm", "aten::mm", "aten::bmm"):
        return "gemm"
    if "adam" in n:
        return "adam"
    if n == "aten::index_select":
        return "gather"
    return "elementwise"


def stream_bandwidth(elements: int, repeats: int = 200) -> float:
    """Bytes/s of c = a + b over float32 arrays of ``elements`` (two reads, one write)."""
    a, b, c = torch.rand(elements), torch.rand(elements), torch.empty(elements)
    for _ in range(10):
        torch.add(a, b, out=c)
    t0 = time.perf_counter()
    for _ in range(repeats):
        torch.add(a, b, out=c)
    return 12 * elements * repeats / (time.perf_counter() - t0)


def one_layer(d_in: int, d_out: int, steps: int, epochs: int) -> dict:
    n = steps * BATCH
    g = torch.Generator().manual_seed(0)
    x_pos = torch.randn(n, d_in, generator=g)
    x_neg = torch.randn(n, d_in, generator=g)
    x_pos /= x_pos.norm(dim=1, keepdim=True)
    x_neg /= x_neg.norm(dim=1, keepdim=True)
    layer = FFLayer(d_in, d_out, seed=1)
    opt = make_adam(layer.parameters(), 0.01)

    def epoch(seed: int) -> None:
        train_epochs(layer, opt, x_pos, x_neg, batch_size=BATCH, lrs=[0.01], seeds=[seed])

    epoch(0)  # warm-up
    times = []
    for e in range(epochs):
        t0 = time.perf_counter()
        epoch(e + 1)
        times.append((time.perf_counter() - t0) / steps)
    step = median(times)

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        epoch(99)
        profiled = time.perf_counter() - t0
    by = {"gemm": 0.0, "adam": 0.0, "gather": 0.0, "elementwise": 0.0}
    for ev in prof.key_averages():
        by[category(ev.key)] += ev.self_cpu_time_total / 1e6
    # what the profiled epoch spent outside every operator, then everything per unprofiled step
    by["python_and_dispatch"] = max(profiled - sum(by.values()), 0.0)
    scale = step / (profiled / steps)
    shares = {k: v / steps * scale for k, v in by.items()}
    params = d_out * (d_in + 1)
    return {"in": d_in, "out": d_out, "step_seconds": step, "step_flop": 4 * 2 * BATCH * d_in * d_out,
            "adam_bytes": 28 * params, "stream_bandwidth": stream_bandwidth(params),
            "profiled_step_seconds": profiled / steps, "seconds_per_step": shares}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--epochs", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    rate = gemm_rate("fp32")
    layers = [one_layer(DIMS[k], DIMS[k + 1], args.steps, args.epochs) for k in range(len(DIMS) - 1)]
    step = sum(r["step_seconds"] for r in layers)
    floor = sum(r["step_flop"] / rate + r["adam_bytes"] / r["stream_bandwidth"] for r in layers)
    parts = {k: sum(r["seconds_per_step"][k] for r in layers) for k in layers[0]["seconds_per_step"]}
    for r in layers:
        r["gemm_floor_seconds"] = r["step_flop"] / rate
        r["adam_floor_seconds"] = r["adam_bytes"] / r["stream_bandwidth"]
        r["floor_seconds"] = r["gemm_floor_seconds"] + r["adam_floor_seconds"]
        r["ratio_to_floor"] = r["step_seconds"] / r["floor_seconds"]
        print(f"{r['in']}x{r['out']}: {r['step_seconds'] * 1e3:.2f} ms/step, floor {r['floor_seconds'] * 1e3:.2f} "
              f"ms (GEMM {r['gemm_floor_seconds'] * 1e3:.2f} + Adam {r['adam_floor_seconds'] * 1e3:.2f} at "
              f"{r['stream_bandwidth'] / 1e9:.1f} GB/s; {r['ratio_to_floor']:.2f}x); " + ", ".join(
                  f"{k} {v * 1e3:.2f}" for k, v in r["seconds_per_step"].items()), flush=True)
    write_result("profile_step", {
        "cpu_flags": cpu_flags(), "gemm_rate_flops": rate, "batch": BATCH, "layers": layers,
        "summary": {"step_seconds_all_layers": step, "floor_seconds_all_layers": floor,
                    "ratio_to_floor": step / floor,
                    "share_of_step": {k: v / step for k, v in parts.items()}}})


if __name__ == "__main__":
    main()
