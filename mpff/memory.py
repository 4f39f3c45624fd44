"""Memory per rank, measured and analytic, for FF and backprop runs alike (SPEC section 4).

Measured (:func:`start` after the data is loaded, :func:`finish` at the end of the run):

- ``rss_baseline_bytes``: resident set size (psutil) once the data set is in memory;
- ``rss_peak_bytes``: the high-water mark of the resident set (Linux ``VmHWM``, which
  :func:`start` resets so that the peak counts from the baseline on, not the data loading's
  own peak; elsewhere ``resource.getrusage``, the peak since process start);
- ``rss_peak_delta_bytes``: their difference, what training added on top of the data;
- on a GPU, ``cuda_baseline_bytes`` (``torch.cuda.memory_allocated`` at the baseline),
  ``cuda_peak_bytes`` (``torch.cuda.max_memory_allocated``, reset at the baseline) and
  ``cuda_peak_delta_bytes``.

Analytic (:func:`analytic`, :func:`bp_analytic`, :func:`ff_analytic`): the figures a reader can
check by hand, float32 (4 bytes a value), for one rank:

- ``parameters``, ``optimizer_state`` (Adam: two values per trained parameter), ``gradients``;
- ``activations``: what one update keeps for its backward pass. Backprop: every layer's, for the
  rank's rows of the batch (the batch input, each hidden ReLU output, the log-softmax output).
  FF: one layer's, for positives and negatives (2 x batch rows): its input and its ReLU output;
- ``transient`` (FF): the squared activations and the previous step's output (by then its
  gradient), one layer's (2 of 2 x batch x d_out);
- ``chapter_data`` (FF only, stated apart): what mpff's FF keeps resident for a chapter, the
  chapter's data pushed through the layers below the one being trained: the shard's inputs,
  positives and negatives (3 x n x d0), the layer's inputs for positives and negatives and their
  normalised copies (4 x n x d_k), or while pushing, the layer below's and the next one's;
- ``peak``: the sum that coexists at a step's peak. Backprop frees each layer's activations as its
  backward pass makes that layer's gradient, and mpff frees the gradients before the next forward
  pass, so a sequential step peaks at parameters + optimizer + max(activations, gradients +
  batch input); DistributedDataParallel keeps the gradients in its all-reduce buckets all the
  time, so there it is the sum. FF (mpff's loop leaves each trained layer's last gradient
  allocated, so all trained layers' gradients are resident): parameters + optimizer + resident
  gradients + the largest layer's chapter data + activations + transient.

Not modelled: the allocator's slack, torch's own start-up allocations (kernels, thread pools),
communication buffers (gloo, NCCL) and evaluation's chunked forward passes (4096 rows at a time).
The benchmark ``benchmarks/ff_vs_bp.py --sweep-only`` sets measured against analytic.
"""

from __future__ import annotations

import re
import resource
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import psutil
import torch

from . import layers
from .dataspec import DEFAULT_CLASSES as NUM_CLASSES

#: float32
VALUE_BYTES = 4

_HWM = re.compile(r"^VmHWM:\s+(\d+)\s+kB", re.MULTILINE)


# ---------------------------------------------------------------------------------- measured
def rss_bytes() -> int:
    """Resident set size of this process now."""
    return int(psutil.Process().memory_info().rss)


def peak_rss_bytes() -> int:
    """High-water mark of the resident set: VmHWM on Linux, else getrusage's ru_maxrss."""
    try:
        with open("/proc/self/status") as fh:
            m = _HWM.search(fh.read())
        if m:
            return int(m.group(1)) * 1024
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024  # bytes vs KiB


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current resident set (Linux >= 4.0: write 5 to /proc/self/clear_refs).
    False where that is not possible; the peak then counts from process start."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


@dataclass(frozen=True)
class Baseline:
    rss: int
    peak_reset: bool
    cuda_allocated: int | None


def start(device: torch.device | str = "cpu") -> Baseline:
    """Call once the data set is loaded (before the model is built): resets the peaks and
    records the baseline."""
    device = torch.device(device)
    cuda = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        cuda = int(torch.cuda.memory_allocated(device))
    reset = reset_peak_rss()
    return Baseline(rss=rss_bytes(), peak_reset=reset, cuda_allocated=cuda)


def finish(base: Baseline, device: torch.device | str = "cpu") -> dict[str, int | str]:
    """The measured figures (bytes) since ``start``; a flat dict for run.json and trace scalars."""
    device = torch.device(device)
    peak = max(peak_rss_bytes(), base.rss)
    out: dict[str, int | str] = {
        "rss_baseline_bytes": base.rss,
        "rss_peak_bytes": peak,
        "rss_peak_delta_bytes": peak - base.rss,
        "rss_peak_since": "baseline" if base.peak_reset else "process start",
    }
    if device.type == "cuda" and base.cuda_allocated is not None:
        cuda_peak = int(torch.cuda.max_memory_allocated(device))
        out.update(cuda_baseline_bytes=base.cuda_allocated, cuda_peak_bytes=cuda_peak,
                   cuda_peak_delta_bytes=cuda_peak - base.cuda_allocated)
    return out


# ---------------------------------------------------------------------------------- analytic
def mlp_parameters(dims: Sequence[int], num_classes: int = NUM_CLASSES) -> int:
    """Parameters of backprop's MLP dims -> classes (weights and biases of every Linear)."""
    return layers.mlp_parameters(dims, num_classes)


def ff_layer_parameters(dims: Sequence[int], k: int, kind: str = layers.DEFAULT) -> int:
    return layers.layer_params(dims, k, kind)


def ff_head_parameters(dims: Sequence[int], num_classes: int = NUM_CLASSES) -> int:
    """The softmax head mpff's FFNet always holds (bias-free Linear from layers 2..L to the classes)."""
    return layers.head_params(dims, num_classes)


def bp_analytic(dims: Sequence[int], rows: int, *, ddp: bool = False, num_classes: int = NUM_CLASSES) -> dict[str, int]:
    """Backprop, one rank taking ``rows`` rows of every batch (bytes)."""
    p = mlp_parameters(dims, num_classes)
    out = {
        "parameters": VALUE_BYTES * p,
        "optimizer_state": VALUE_BYTES * 2 * p,
        "gradients": VALUE_BYTES * p,
        "activations": VALUE_BYTES * rows * (sum(dims) + num_classes),
    }
    state = out["parameters"] + out["optimizer_state"] + (out["gradients"] if ddp else 0)
    out["peak"] = state + VALUE_BYTES * _bp_step_values(dims, rows, grads_resident=ddp, num_classes=num_classes)
    return out


def _bp_step_values(dims: Sequence[int], r: int, *, grads_resident: bool, num_classes: int = NUM_CLASSES) -> int:
    """Most values alive at once during one backprop step besides parameters and Adam state,
    walking through what autograd allocates and frees. Forward: each Linear makes z, ReLU makes
    h and z is freed; h is kept. Backward, layer by layer from the top: the Linear makes its
    weight gradient and the gradient of its input, then the ReLU below makes the gradient of its
    pre-activation and frees the gradient of its output and its kept h. Gradients are freed
    before the forward pass (``zero_grad``), unless DDP keeps them in its buckets."""
    ext = (*dims, num_classes)
    n = len(ext) - 1  # Linear layers; layer j maps ext[j] -> ext[j + 1]
    linear = layers.get(layers.DEFAULT)
    kept = r * ext[0]  # the batch input buffer, always there
    peak = kept
    for j in range(n):
        peak = max(peak, kept + 2 * r * ext[j + 1])  # z and h (logits and log-softmax at the top)
        kept += r * ext[j + 1]
    kept -= r * ext[n]        # the log-softmax output, freed once its gradient is made
    grads = 0
    grad_out = r * ext[n]     # gradient of the output layer's output
    for j in reversed(range(n)):
        if not grads_resident:
            grads += linear.num_params(ext[j], ext[j + 1])
        if j == 0:  # the input needs no gradient
            peak = max(peak, kept + grads + grad_out)
            break
        grad_in = r * ext[j]
        peak = max(peak, kept + grads + grad_out + grad_in)
        # the ReLU below: its gradient appears, the Linear's output gradient goes
        peak = max(peak, kept + grads + grad_in + r * ext[j])
        kept -= r * ext[j]
        grad_out = r * ext[j]
    return peak


def ff_analytic(dims: Sequence[int], batch_size: int, n_rows: int = 0, *,
                trained_layers: Sequence[int] | None = None, softmax: bool = False,
                num_classes: int = NUM_CLASSES, layer: str = layers.DEFAULT) -> dict[str, int]:
    """FF as mpff runs it, one rank training ``trained_layers`` (default: all) with chapters of
    ``n_rows`` training samples (0: leave the chapter data out, a training step alone)."""
    num_layers = len(dims) - 1
    trained = list(range(num_layers)) if trained_layers is None else list(trained_layers)
    rows = 2 * batch_size  # positives and negatives go through one matrix product
    params = [ff_layer_parameters(dims, k, layer) for k in range(num_layers)]
    head = ff_head_parameters(dims, num_classes)
    resident_grads = sum(params[k] for k in trained)
    out = {
        "parameters": VALUE_BYTES * (sum(params) + head),
        "optimizer_state": VALUE_BYTES * 2 * (resident_grads + (head if softmax else 0)),
        "gradients": VALUE_BYTES * max(params[k] for k in trained),
        "gradients_resident": VALUE_BYTES * resident_grads,
        "activations": VALUE_BYTES * max(rows * (dims[k] + dims[k + 1]) for k in trained),
        "transient": 0,
        "chapter_data": VALUE_BYTES * max(_ff_chapter_values(dims, k, n_rows) for k in trained),
    }
    step = max(_ff_step_values(dims, k, rows) + _ff_chapter_values(dims, k, n_rows) for k in trained)
    out["peak"] = out["parameters"] + out["optimizer_state"] + out["gradients_resident"] + VALUE_BYTES * step
    out["transient"] = VALUE_BYTES * max(_ff_step_values(dims, k, rows) for k in trained) - out["activations"]
    return out


def _ff_step_values(dims: Sequence[int], k: int, r: int) -> int:
    """Most values alive at once while layer k takes a step on r rows (mpff.ff.train_epochs),
    besides parameters, Adam state and the resident gradients. The batch buffer (r x d_in) lives
    for the whole chapter. The step tapes nothing: its forward product makes h while the
    previous step's h (turned into its gradient in place) is still referenced, and h**2 is a
    temporary of the goodness: 3 r x d_out. The weight gradient's product reads h after the
    layer's previous gradient is freed, so it adds nothing to the resident gradients. Vectors
    of r values are left out. (Measured against the resident set: benchmarks/ff_vs_bp.py.)"""
    return r * dims[k] + 3 * r * dims[k + 1]


def _ff_chapter_values(dims: Sequence[int], k: int, n: int) -> int:
    """Values resident while layer k trains on a chapter of n samples (mpff.ffstate's order):
    the shard's x, x_pos, x_neg; then the layer's inputs (positives, negatives) and their
    normalised copies, or while the layer below is applied, its inputs and outputs."""
    if n == 0:
        return 0
    base = 3 * n * dims[0]
    if k == 0:
        return base + 2 * n * dims[0]  # the normalised copies of x_pos, x_neg
    pushing = 2 * n * (dims[k - 1] + dims[k]) if k >= 2 else 2 * n * dims[k]
    return base + max(4 * n * dims[k], pushing)


def analytic(cfg, n_train: int, world_size: int) -> dict[str, int | str]:
    """The analytic figures of one rank of the run ``cfg`` describes (bytes): the algorithm's
    breakdown and its peak, as its rank state answers them (:mod:`mpff.algorithms`)."""
    from .algorithms import state_class
    return state_class(cfg.train.algorithm).memory_figure(cfg, n_train, world_size)


def _classes(cfg) -> int:
    return cfg.data.num_classes or NUM_CLASSES  # an ImageFolder's count is known once it is read


def bp_rank(cfg, n_train: int, world_size: int) -> dict[str, int | str]:
    """Backprop: one rank's slice of every batch (the largest slice under strong scaling)."""
    dp = cfg.run.schedule == "data_parallel" and world_size > 1
    if dp and cfg.run.scaling == "strong":
        rows = -(-cfg.train.batch_size // world_size)
    else:
        rows = cfg.train.batch_size
    return {"algorithm": "backprop", "rows_per_update": rows,
            **bp_analytic(cfg.model.dims, rows, ddp=dp, num_classes=_classes(cfg))}


def ff_rank(cfg, n_train: int, world_size: int) -> dict[str, int | str]:
    """FF: the rank trains every layer (Sequential, All Layers, Federated) or its block of
    layers (Single Layer, the block with the most parameters); chapter data is for its shard,
    or with train.chapter_batches for one slice of the chapter (the data set itself is the
    baseline either way)."""
    dims, kind = cfg.model.dims, cfg.model.layer
    trained = None
    if cfg.run.schedule == "single_layer" and world_size > 1:
        from .plan import build_plan
        owner = build_plan(cfg, world_size).owner
        trained = max(([k for k, r in enumerate(owner) if r == rank] for rank in range(world_size)),
                      key=lambda ks: sum(ff_layer_parameters(dims, k, kind) for k in ks))
    shards = cfg.resolved_shards(world_size)
    rows = -(-n_train // shards)
    t = cfg.train
    if t.chapter_batches:  # a chapter's samples, pushed through the layers a slice at a time
        rows = min(rows, t.batch_size * min(t.chapter_batches, t.slice_batches))
    return {"algorithm": "ff", "chapter_rows": rows,
            **ff_analytic(dims, cfg.train.batch_size, rows, trained_layers=trained,
                          softmax=cfg.train.classifier == "softmax", num_classes=_classes(cfg), layer=kind)}
