"""The FF network: label overlay, the layer stack, goodness and softmax classifiers, negatives. No MPI.

Both classifiers skip the first hidden layer (its goodness mostly tells whether a label is
overlaid at all, not which). Layers are of the kind ``model.layer`` names (:mod:`mpff.layers`).
Labels are written over one input entry per class (10 for MNIST, the data set's count
otherwise): the last ones (the paper's author code) or the first ones (Hinton, loeweX); a
neutral sample has 0.1 in all of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import layers as layer_kinds
from .dataspec import DEFAULT_CLASSES as NUM_CLASSES
from .ff import FORWARD_CHUNK, FFLayer, Linear, epochs, generator, linear, seed_for


def label_slice(dim: int, position: str, num_classes: int = NUM_CLASSES) -> slice:
    return slice(dim - num_classes, dim) if position == "last" else slice(0, num_classes)


def overlay(x: torch.Tensor, labels: torch.Tensor | None, position: str = "last",
            neutral_value: float = 0.1, out: torch.Tensor | None = None,
            num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """Copy of ``x`` with a one-hot label (or the neutral value when labels is None) written in."""
    out = x.clone() if out is None else out.copy_(x)
    sl = label_slice(x.shape[1], position, num_classes)
    if labels is None:
        out[:, sl] = neutral_value
    else:
        out[:, sl] = 0.0
        cols = labels.to(device=x.device, dtype=torch.long) + sl.start
        out[torch.arange(x.shape[0], device=x.device), cols] = 1.0
    return out


def wrong_label_offsets(n: int, *parts: int, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Offsets in 1..num_classes-1 drawn from a seed; (y + offset) % num_classes is a wrong
    label for any y.

    Drawn for the whole training set from the seed alone, so every rank (and every shard)
    gets the same draw without knowing the other ranks' labels.
    """
    g = generator(*parts)
    return torch.randint(1, num_classes, (n,), generator=g).numpy().astype(np.int64)


def random_negatives(y: np.ndarray, indices: np.ndarray, n_total: int, *parts: int,
                     num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Wrong labels for the samples ``indices`` of a training set of ``n_total`` samples."""
    off = wrong_label_offsets(n_total, *parts, num_classes=num_classes)[indices]
    return (y + off) % num_classes


def hardest_wrong_label(scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Adaptive negatives: the most-predicted label that is not the true one (top-2 of scores)."""
    top2 = scores.topk(2, dim=1).indices
    return torch.where(top2[:, 0] == y, top2[:, 1], top2[:, 0])


class FFNet(nn.Module):
    """The stack of FF layers (of kind ``layer``) plus the optional softmax head (a bias-free Linear)."""

    def __init__(self, dims: Sequence[int], *, threshold_coeff: float = 0.01, goodness: str = "mean",
                 norm_eps: float = 1e-4, label_position: str = "last", neutral_value: float = 0.1,
                 seed: int = 0, num_classes: int = NUM_CLASSES, layer: str = layer_kinds.DEFAULT) -> None:
        super().__init__()
        self.dims = tuple(int(d) for d in dims)
        if not 2 <= num_classes <= self.dims[0]:  # internal invariant: config and train check it
            raise ValueError(f"{num_classes} classes do not fit an input of {self.dims[0]} values")
        self.num_classes = int(num_classes)
        self.label_position = label_position
        self.neutral_value = neutral_value
        self.layer_kind = layer
        spec = layer_kinds.get(layer)
        self.layers = nn.ModuleList(
            spec.build(self.dims[k], self.dims[k + 1], threshold_coeff=threshold_coeff, goodness=goodness,
                       norm_eps=norm_eps, seed=seed_for(seed, k))
            for k in range(len(self.dims) - 1)
        )
        head_in = layer_kinds.head_inputs(self.dims)
        self.head = Linear(head_in, self.num_classes, bias=False)
        g = generator(seed, 0x4EAD)
        bound = 1.0 / head_in ** 0.5
        with torch.no_grad():
            self.head.weight.uniform_(-bound, bound, generator=g)

    @classmethod
    def from_config(cls, cfg, num_classes: int = NUM_CLASSES) -> FFNet:
        m = cfg.model
        return cls(m.dims, threshold_coeff=m.threshold_coeff, goodness=m.goodness, norm_eps=m.norm_eps,
                   label_position=m.label_position, neutral_value=m.neutral_value, seed=cfg.train.seed,
                   num_classes=num_classes, layer=m.layer)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def classifier_layers(self) -> range:
        """Layers whose activity the classifiers use: all but the first (unless there is only one)."""
        return range(1, self.num_layers) if self.num_layers > 1 else range(0, 1)

    # ----- whole-data-set passes (chunked, no grad) -----
    @torch.no_grad()
    def activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per-layer outputs for a chunk of inputs."""
        acts = []
        h = x
        for layer in self.layers:
            h = layer(h)
            acts.append(h)
        return acts

    @torch.no_grad()
    def goodness_scores(self, x: torch.Tensor, check: Callable[[], None] | None = None) -> torch.Tensor:
        """(n, classes): summed goodness of the classifier layers with each label overlaid. ``check``
        runs before each chunk and label (it raises to stop the run).

        The first layer's product is shared by the ten labels: the overlaid inputs differ only
        in which label column holds the 1, so they all have the norm of the image with its label
        columns zeroed plus that 1, and ``W (x_l / |x_l|) = (W x_0) / |x_l| + W[:, l] / |x_l|``.
        One product and ten column additions replace ten products (the first layer is 28 % of
        the scoring arithmetic at [784,1000,1000,1000], 12 % at the paper's width)."""
        n = x.shape[0]
        scores = torch.empty(n, self.num_classes, dtype=torch.float32, device=x.device)
        first, rest = self.layers[0], self.layers[1:]
        if not isinstance(first, FFLayer):  # a layer kind of another form: overlay every label
            return self._overlaid_scores(x, scores, check)
        sl = label_slice(x.shape[1], self.label_position, self.num_classes)
        for i in range(0, n, FORWARD_CHUNK):
            base = x[i:i + FORWARD_CHUNK].clone()
            base[:, sl] = 0.0
            scale = 1.0 / (torch.sqrt(base.pow(2).sum(dim=1, keepdim=True) + 1.0) + first.norm_eps)
            shared = linear(base * scale, first.weight, first.bias)   # (m, out), all labels
            for label in range(self.num_classes):
                if check is not None:
                    check()
                column = first.weight[:, sl.start + label]
                h = torch.relu(torch.addcmul(shared, scale, column))    # layer 0 with `label` overlaid
                acts = [h]
                for layer in rest:
                    h = layer(h)
                    acts.append(h)
                scores[i:i + FORWARD_CHUNK, label] = sum(
                    self.layers[k].goodness(acts[k]) for k in self.classifier_layers)
        return scores

    def _overlaid_scores(self, x: torch.Tensor, scores: torch.Tensor,
                         check: Callable[[], None] | None) -> torch.Tensor:
        """:meth:`goodness_scores` computed the plain way: each label overlaid, every layer applied."""
        for i in range(0, x.shape[0], FORWARD_CHUNK):
            chunk = x[i:i + FORWARD_CHUNK]
            for label in range(self.num_classes):
                if check is not None:
                    check()
                labels = torch.full((chunk.shape[0],), label, dtype=torch.long, device=x.device)
                acts = self.activations(overlay(chunk, labels, self.label_position,
                                                num_classes=self.num_classes))
                scores[i:i + FORWARD_CHUNK, label] = sum(
                    self.layers[k].goodness(acts[k]) for k in self.classifier_layers)
        return scores

    @torch.no_grad()
    def head_features(self, x: torch.Tensor, check: Callable[[], None] | None = None) -> torch.Tensor:
        """Concatenated activity of the classifier layers on neutral samples."""
        n = x.shape[0]
        feats = torch.empty(n, self.head.in_features, dtype=torch.float32, device=x.device)
        for i in range(0, n, FORWARD_CHUNK):
            if check is not None:
                check()
            xc = overlay(x[i:i + FORWARD_CHUNK], None, self.label_position, self.neutral_value,
                         num_classes=self.num_classes)
            acts = self.activations(xc)
            feats[i:i + FORWARD_CHUNK] = torch.cat([acts[k] for k in self.classifier_layers], dim=1)
        return feats

    @torch.no_grad()
    def scores(self, x: torch.Tensor, method: str, check: Callable[[], None] | None = None) -> torch.Tensor:
        if method == "goodness":
            return self.goodness_scores(x, check)
        if method == "softmax":
            return self.head(self.head_features(x, check))
        raise ValueError(f"unknown classifier {method!r}: use 'goodness' or 'softmax'")

    @torch.no_grad()
    def predict(self, x: torch.Tensor, method: str = "goodness",
                check: Callable[[], None] | None = None) -> torch.Tensor:
        """Class predictions for *normalised* inputs (n, input_dim) with no label written in."""
        return self.scores(x, method, check).argmax(dim=1)

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, y: torch.Tensor, method: str,
                 check: Callable[[], None] | None = None) -> float:
        return float((self.predict(x, method, check) == y.to(x.device)).float().mean().item())

    @torch.no_grad()
    def adaptive_negatives(self, x: torch.Tensor, y: torch.Tensor, method: str,
                           check: Callable[[], None] | None = None) -> torch.Tensor:
        """The most-predicted wrong label of each sample under the current network."""
        return hardest_wrong_label(self.scores(x, method, check), y.to(x.device))


def train_head(net: FFNet, opt: torch.optim.Optimizer, feats: torch.Tensor, y: torch.Tensor, *,
               batch_size: int, lrs: list[float], seeds: list[int],
               check: Callable[[], None] | None = None) -> float:
    """Train the softmax head (FF layers frozen: ``feats`` are detached) with cross-entropy."""
    n = feats.shape[0]
    y = y.to(feats.device)
    total = torch.zeros((), dtype=torch.float64, device=feats.device)
    steps = 0
    for perm in epochs(opt, n, feats.device, lrs, [generator(seed) for seed in seeds]):
        total.zero_()
        steps = 0
        for i in range(0, n, batch_size):
            if check is not None:
                check()
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(net.head(feats[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach()
            steps += 1
    return float(total.item()) / max(steps, 1)


#: the MLP's initial weights: a stream of its own (mpff.ff.generator)
MLP_INIT_STREAM = 0xB1


def train_head_batches(net: FFNet, opt: torch.optim.Optimizer, feats: torch.Tensor, y: torch.Tensor,
                       batches, total: torch.Tensor, check: Callable[[], None] | None = None) -> int:
    """The softmax head's steps on consecutive batches of ``feats`` in order ((start, rows, lr)
    triples: a slice of a chapter of train.chapter_batches); the loss accumulates in ``total``.
    Returns the number of steps."""
    y = y.to(feats.device)
    lr_now, steps = None, 0
    for start, rows, lr in batches:
        if check is not None:
            check()
        if lr != lr_now:
            for group in opt.param_groups:
                group["lr"] = lr
            lr_now = lr
        loss = F.cross_entropy(net.head(feats[start:start + rows]), y[start:start + rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.detach()
        steps += 1
    return steps


class MLP(nn.Module):
    """``dims[0] -> ... -> dims[-1] -> classes``: Linear and ReLU per hidden layer, a linear output."""

    def __init__(self, dims: Sequence[int], *, seed: int = 0, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.dims = tuple(int(d) for d in dims)
        self.num_classes = int(num_classes)
        ext = (*self.dims, self.num_classes)
        self.layers = nn.ModuleList(
            nn.utils.skip_init(Linear, ext[k], ext[k + 1]) for k in range(len(ext) - 1))
        # PyTorch's default Linear init (uniform in +-1/sqrt(fan_in)), drawn from a generator of
        # our own per layer, so every rank builds the same MLP without communicating.
        with torch.no_grad():
            for k, layer in enumerate(self.layers):
                g = generator(seed, MLP_INIT_STREAM, k)
                bound = 1.0 / math.sqrt(layer.in_features)
                layer.weight.uniform_(-bound, bound, generator=g)
                layer.bias.uniform_(-bound, bound, generator=g)

    @classmethod
    def from_config(cls, cfg, num_classes: int = NUM_CLASSES) -> MLP:
        return cls(cfg.model.dims, seed=cfg.train.seed, num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs for a whole data set, in fixed-size chunks."""
        out = torch.empty(x.shape[0], self.num_classes, dtype=torch.float32, device=x.device)
        for i in range(0, x.shape[0], FORWARD_CHUNK):
            out[i:i + FORWARD_CHUNK] = self(x[i:i + FORWARD_CHUNK])
        return out

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class predictions (argmax of the output) for *normalised* inputs (n, dims[0])."""
        return self.logits(x).argmax(dim=1)

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return float((self.predict(x) == y.to(x.device)).float().mean().item())
