"""One Forward-Forward layer: normalise, linear, ReLU; goodness; loss; a chapter of training. No MPI.

Locality is the point of FF: a layer's input is the *detached* output of the layer below,
normalised to unit length so that only its direction (not the goodness the layer below
already expressed) is passed on. No gradient ever crosses layers.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

#: Rows per chunk when pushing a whole data set through a layer. Fixed (not a function of
#: the data size or the rank) so that every schedule computes bit-identical activations.
FORWARD_CHUNK = 4096


def seed_for(*parts: int) -> int:
    """A 63-bit seed derived from integers (seed, chapter, layer, epoch, ...), stable across runs."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def generator(*parts: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed_for(*parts))
    return g


def cooldown_lr(lr0: float, global_epoch: int, total_epochs: int, final: str = "hold") -> float:
    """The paper's learning-rate cooldown: lr0 for the first half, then linear towards 0,
    ``2 * lr0 * (E - e) / E`` for global epoch ``e > E / 2``.

    ``global_epoch`` is 1-based: e = chapter * C + mini_epoch + 1. The formula reaches 0 at the
    last epoch (e = E). ``final = "hold"`` keeps the rate the epoch before had instead, as the
    first author's FF code does (it skips setting a rate that is not positive), so the last
    epoch still trains; ``"zero"`` follows the formula to the letter (the last epoch's Adam
    steps then change nothing).
    """
    if final == "hold" and global_epoch >= total_epochs:
        global_epoch = total_epochs - 1
    if global_epoch > total_epochs / 2:
        return 2.0 * lr0 * (total_epochs - global_epoch) / total_epochs
    return lr0


def chapter_rates(lr0: float, chapter: int, epochs_per_chapter: int, total_epochs: int,
                  final: str = "hold") -> list[float]:
    """The cooled-down rate of each epoch of ``chapter`` (global epoch chapter * C + m + 1)."""
    return [cooldown_lr(lr0, chapter * epochs_per_chapter + m + 1, total_epochs, final)
            for m in range(epochs_per_chapter)]


def epochs(opt: torch.optim.Optimizer, n: int, device: torch.device, lrs: list[float],
           generators: list[torch.Generator]):
    """The epoch loop every trainer shares (FF layers, the softmax head, backprop): per epoch it
    sets the rate on every parameter group and yields the epoch's shuffle of ``n`` rows, drawn on
    the CPU from that epoch's generator, so it is the same on every rank and every device."""
    for lr, g in zip(lrs, generators, strict=True):
        for group in opt.param_groups:
            group["lr"] = lr
        yield torch.randperm(n, generator=g).to(device)


class FFLayer(nn.Module):
    """A fully connected FF layer with its own threshold and goodness (``bias=False``: none)."""

    def __init__(self, in_features: int, out_features: int, *, threshold_coeff: float = 0.01,
                 goodness: str = "mean", norm_eps: float = 1e-4, seed: int = 0, bias: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.threshold = threshold_coeff * out_features
        self.goodness_kind = goodness
        self.norm_eps = norm_eps
        # PyTorch's default Linear init (uniform in +-1/sqrt(fan_in)), from a generator of our own
        # so that every rank builds the same initial layer without communicating.
        bound = 1.0 / math.sqrt(in_features)
        g = generator(seed, 0xA11CE)  # callers pass a per-layer seed
        self.weight = nn.Parameter(torch.empty(out_features, in_features).uniform_(-bound, bound, generator=g))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound, generator=g))
        else:
            self.register_parameter("bias", None)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return x / (x.norm(p=2, dim=1, keepdim=True) + self.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(linear(self.normalize(x), self.weight, self.bias))

    def goodness(self, h: torch.Tensor) -> torch.Tensor:
        sq = h.pow(2)
        return sq.mean(dim=1) if self.goodness_kind == "mean" else sq.sum(dim=1)

    def loss(self, g_pos: torch.Tensor, g_neg: torch.Tensor) -> torch.Tensor:
        """softplus(cat([theta - g_pos, g_neg - theta])).mean(): -log sigmoid of being right."""
        return F.softplus(torch.cat([self.threshold - g_pos, g_neg - self.threshold])).mean()

    @torch.no_grad()
    def forward_all(self, x: torch.Tensor, out: torch.Tensor | None = None,
                    check: Callable[[], None] | None = None) -> torch.Tensor:
        """This layer's detached output for a whole data set, in fixed-size chunks (``check``
        runs before each: it raises to stop the run)."""
        if out is None:
            out = torch.empty(x.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        for i in range(0, x.shape[0], FORWARD_CHUNK):
            if check is not None:
                check()
            out[i:i + FORWARD_CHUNK] = self(x[i:i + FORWARD_CHUNK])
        return out

    @torch.no_grad()
    def normalize_all(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        for i in range(0, x.shape[0], FORWARD_CHUNK):
            out[i:i + FORWARD_CHUNK] = self.normalize(x[i:i + FORWARD_CHUNK])
        return out

    def make_optimizer(self, lr: float) -> torch.optim.Adam:
        return make_adam(self.parameters(), lr)


PRECISIONS = ("fp32", "bf16", "tf32")

#: True inside ``matmul_precision("bf16", <a CUDA device>)``: :func:`linear` then computes its
#: products on a GPU from bf16 inputs (see :class:`BF16Products`).
_cuda_bf16 = False


def matmul_precision(precision: str, device: torch.device):
    """A context in which fp32 matrix products are computed at ``precision`` (inputs rounded to
    it, products accumulated and returned in fp32); weights, activations, gradients and Adam's
    state stay fp32. 'bf16': bfloat16 products -- on a CPU ``torch.set_float32_matmul_precision
    ("medium")`` (oneDNN with AVX-512 BF16 or AMX); on a GPU :func:`linear` rounds the inputs of
    each product to bf16 and cuBLAS multiplies them with fp32 accumulation and output
    (:class:`BF16Products`), because torch's "medium" means TF32 on CUDA (bf16 would silently
    be tf32 there). 'tf32': CUDA's TF32 tensor cores ("high"). 'fp32': full precision.

    Not autocast: autocast returns each product *rounded to bf16*, and FF's signal is small
    against it -- positives and negatives differ only in 10 label inputs of 784, a few
    thousandths of a layer's output -- so with bf16 outputs the label was lost and training fell
    to chance (measured: 9.8 % test accuracy at [784,1000,1000,1000], E = 10, against 87 %)."""
    if precision == "bf16" and torch.device(device).type == "cuda":
        return _cuda_bf16_products()
    return _float32_matmul({"fp32": "highest", "bf16": "medium", "tf32": "high"}[precision])


def cpu_bf16_products() -> bool:
    """Whether torch computes fp32 products in bf16 on this CPU under matmul precision 'medium'
    (oneDNN with AVX-512 or AMX; elsewhere they silently stay fp32)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without the query: take it as absent
        return False


def cuda_bf16_products(device: torch.device) -> str | None:
    """Why bf16 products cannot run on this GPU, or None when they can: the GPU must compute in
    bf16 (Ampere on) and this torch must multiply bf16 matrices into fp32 (``torch.mm`` with
    ``out_dtype``, torch 2.8 on). Tried on a 1x1 product, so a torch that lacks it says so here
    and not in the middle of a run."""
    if not torch.cuda.is_bf16_supported():
        return f"{torch.cuda.get_device_name(device)} has no bf16 arithmetic"
    try:
        one = torch.ones(1, 1, dtype=torch.bfloat16, device=device)
        with _cuda_bf16_products():
            _mm_fp32_out(one, one)
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        return f"this torch cannot multiply bf16 matrices into fp32 on the GPU ({str(exc).splitlines()[0]})"
    return None


@contextlib.contextmanager
def _float32_matmul(level: str):
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(level)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


@contextlib.contextmanager
def _cuda_bf16_products():
    global _cuda_bf16
    matmul = torch.backends.cuda.matmul
    before = _cuda_bf16, matmul.allow_bf16_reduced_precision_reduction
    _cuda_bf16 = True
    matmul.allow_bf16_reduced_precision_reduction = False  # fp32 sums, no bf16 split-K partials
    try:
        with _float32_matmul("highest"):  # no product elsewhere falls back to TF32 unasked
            yield
    finally:
        _cuda_bf16, matmul.allow_bf16_reduced_precision_reduction = before


def _mm_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for bf16 a and b, accumulated in and returned as fp32 (cuBLAS; CUDA only)."""
    return torch.mm(a, b, out_dtype=torch.float32)


class BF16Products(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` for fp32 tensors whose three products (the output, the
    input's and the weight's gradient) take bf16-rounded inputs and return fp32 sums: what
    oneDNN does on a CPU under matmul precision "medium", and what tensor cores do fastest.
    The bias and its gradient stay fp32. ``mm`` multiplies two bf16 matrices into fp32 (cuBLAS
    on a GPU; a test passes an exact CPU stand-in)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mm=_mm_fp32_out):
        shape = x.shape
        xb = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        wb = weight.to(torch.bfloat16)
        y = mm(xb, wb.t())
        if bias is not None:
            y += bias
        ctx.save_for_backward(xb, wb)
        ctx.mm, ctx.shape, ctx.has_bias = mm, shape, bias is not None
        return y.view(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        xb, wb = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        gb = g.to(torch.bfloat16)
        gx = ctx.mm(gb, wb).view(ctx.shape) if ctx.needs_input_grad[0] else None
        gw = ctx.mm(gb.t(), xb) if ctx.needs_input_grad[1] else None
        gbias = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gbias, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, at the matmul precision of the enclosing :func:`matmul_precision`: every
    product mpff computes goes through here (FF layers, the softmax head, the backprop MLP)."""
    if _cuda_bf16 and x.is_cuda:
        return BF16Products.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) whose product is :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def make_adam(params, lr: float) -> torch.optim.Adam:
    """Adam with the fused kernel where torch has it (CPU since 2.4, CUDA): one pass over the
    parameters instead of several, ~8x faster per step for a 1000x1000 layer on one CPU thread,
    where the unfused update costs as much as the layer's matmuls. Deterministic either way."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):  # older torch or an unsupported device
        return torch.optim.Adam(params, lr=lr, foreach=False)


def adam_state(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> torch.Tensor | None:
    """Adam's state of ``params`` as one flat CPU tensor: the step, every exp_avg, every
    exp_avg_sq (parameters in order); None before the first step. The one serialiser of
    optimizer state (FF buffers and backprop's model buffer alike)."""
    states = [opt.state.get(p) for p in params]
    if not all(states):
        return None
    parts = ([states[0]["step"].reshape(1).cpu()] + [st["exp_avg"].reshape(-1).cpu() for st in states]
             + [st["exp_avg_sq"].reshape(-1).cpu() for st in states])
    return torch.cat(parts)


def load_adam_state(opt: torch.optim.Optimizer, params: list[torch.Tensor], flat: torch.Tensor,
                    device: torch.device) -> None:
    """Inverse of :func:`adam_state`: ``flat`` (step, exp_avgs, exp_avg_sqs) into ``opt``."""
    # fused Adam keeps `step` on the parameters' device, the single-tensor Adam on the CPU
    fused = any(g.get("fused") for g in opt.param_groups)
    step = flat[0].clone().to(params[0].device if fused else "cpu")
    i, avgs = 1, []
    for p in params:
        avgs.append(flat[i:i + p.numel()].view_as(p).to(device, copy=True))
        i += p.numel()
    for p, avg in zip(params, avgs, strict=True):
        sq = flat[i:i + p.numel()].view_as(p).to(device, copy=True)
        i += p.numel()
        opt.state[p] = {"step": step.clone(), "exp_avg": avg, "exp_avg_sq": sq}


class FFSteps:
    """Adam steps of one FF layer on batches of (normalised) positives and negatives, the loss
    accumulated on the device (no host sync per batch).

    The gradient is written out rather than taped: with ``z = s (g - theta)`` (s = -1 for a
    positive, +1 for a negative) and the loss ``mean(softplus(z))`` over the 2b rows,
    ``dL/dz = sigmoid(z) / 2b``, ``dg/dh = 2 h / out`` (mean goodness; ``2 h`` for sum), and ReLU's
    mask is h itself (zero exactly where ReLU passes no gradient), so the pre-activation's
    gradient is ``h * s sigmoid(z) 2 / (2b out)``: one element-wise product of h, then the weight
    gradient's matrix product. The same gradient as autograd's to fp32 rounding (tested), in
    half the element-wise kernels and none of the tape (8 % less time a step on one CPU thread).
    """

    def __init__(self, layer: FFLayer, opt: torch.optim.Optimizer, x: torch.Tensor, batch_size: int,
                 check: Callable[[], None] | None = None) -> None:
        self.layer, self.opt, self.batch_size, self.check = layer, opt, batch_size, check
        device = x.device
        # the batch buffer is allocated once
        self.buf = torch.empty(2 * batch_size, x.shape[1], dtype=x.dtype, device=device)
        self.signs = torch.cat([torch.full((batch_size,), -1.0, device=device),
                                torch.ones(batch_size, device=device)])
        self.per_unit = 1.0 / layer.out_features if layer.goodness_kind == "mean" else 1.0  # dg/dh = 2 h per_unit
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.steps = 0

    def reset(self) -> None:
        self.total.zero_()
        self.steps = 0

    def mean_loss(self) -> float:
        return float(self.total.item()) / max(self.steps, 1)  # note: one host sync

    def step(self, x_pos: torch.Tensor, x_neg: torch.Tensor, idx: torch.Tensor | slice) -> None:
        """One step on rows ``idx`` (an index tensor, or a slice of consecutive rows)."""
        if self.check is not None:
            self.check()
        layer, batch_size = self.layer, self.batch_size
        weight, bias, theta = layer.weight, layer.bias, layer.threshold
        if isinstance(idx, slice):
            b = x_pos[idx].shape[0]
            xb = self.buf[:2 * b]
            xb[:b].copy_(x_pos[idx])
            xb[b:].copy_(x_neg[idx])
        else:
            b = idx.shape[0]
            xb = self.buf[:2 * b]
            torch.index_select(x_pos, 0, idx, out=xb[:b])
            torch.index_select(x_neg, 0, idx, out=xb[b:])
        signs = self.signs
        s = signs if b == batch_size else torch.cat([signs[:b], signs[batch_size:batch_size + b]])
        with torch.no_grad():
            h = linear(xb, weight, bias).relu_()
            g = h.pow(2).mean(dim=1) if layer.goodness_kind == "mean" else h.pow(2).sum(dim=1)
            z = (g - theta).mul_(s)                      # theta - g_pos, g_neg - theta
            self.total += F.softplus(z).mean()
            coef = torch.sigmoid(z).mul_(s).mul_(2.0 * self.per_unit / (2 * b))
            grad = h.mul_(coef.unsqueeze(1))             # d loss / d pre-activation
            self.opt.zero_grad(set_to_none=True)         # the last gradient goes before the next is made
            weight.grad = linear(grad.t(), xb.t())       # grad.T @ xb, at the matmul precision
            if bias is not None:
                bias.grad = grad.sum(dim=0)
        self.opt.step()
        self.steps += 1


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def train_epochs(layer: FFLayer, opt: torch.optim.Optimizer, x_pos: torch.Tensor,
                 x_neg: torch.Tensor, *, batch_size: int, lrs: list[float],
                 seeds: list[int], check: Callable[[], None] | None = None) -> float:
    """Train ``layer`` for len(lrs) epochs on (x_pos, x_neg); returns the last epoch's mean loss.

    ``x_pos`` and ``x_neg`` are the layer's inputs for the whole chapter, *already normalised*
    (normalisation is row-wise, so doing it once per chapter equals doing it per batch).
    Positives and negatives of a batch go through one matrix product (:class:`FFSteps`).
    ``check`` runs before every step (about a microsecond): it raises to stop the run, so a stop
    takes effect within a step however many epochs the task has.
    """
    n = x_pos.shape[0]
    steps = FFSteps(layer, opt, x_pos, batch_size, check)
    for perm in epochs(opt, n, x_pos.device, lrs, [generator(seed) for seed in seeds]):
        steps.reset()
        for i in range(0, n, batch_size):
            steps.step(x_pos, x_neg, perm[i:i + batch_size])
    return steps.mean_loss()


def train_batches(steps: FFSteps, x_pos: torch.Tensor, x_neg: torch.Tensor, batches) -> None:
    """Steps on consecutive batches of (x_pos, x_neg), already normalised and in training order
    (a chapter of train.chapter_batches, :class:`mpff.chapters.Batch`: ``start``, ``rows`` and
    the rate ``lr``, given as (start, rows, lr) triples); the loss accumulates in ``steps``."""
    lr_now = None
    for start, rows, lr in batches:
        if lr != lr_now:
            set_lr(steps.opt, lr)
            lr_now = lr
        steps.step(x_pos, x_neg, slice(start, start + rows))
