"""The final model in HDF5, written atomically, readable with plain h5py (or HDFView).

Layout (``docs/traces.md`` has the run directory as a whole)::

    /                      attrs: format="mpff-model", format_version, dims, num_classes, classifier,
                           label_position, neutral_value, threshold_coeff, goodness, norm_eps,
                           test_accuracy, config (JSON), versions and host facts
    /layers/<k>/weight     (out_features, in_features) float32, k = 0 .. L-1
    /layers/<k>/bias       (out_features,) float32
    /head/weight           (num_classes, sum(dims[2:])) float32 (the softmax head; bias-free)
    /input/mean, /input/std  (input_dim,) float32: raw pixel / 255 -> (x - mean) / std
    /config/<section>      attrs: the resolved configuration, one attribute per key

Every dataset says what it holds in its attributes: ``layout`` (the meaning of each axis,
e.g. ``(out_features, in_features)``: ``y = x @ weight.T + bias`` as torch.nn.Linear),
``units`` and ``description``. They are attributes only: a reader that ignores them (or a file
without them, format_version 1 either way) finds the same arrays.

Layers of a kind other than "linear" (``model.layer``, :mod:`mpff.layers`) add the root
attribute ``layer`` and hold the tensors their kind names (``layers/<k>/<name>``); a file
without the attribute holds linear layers.

Files are created with the permissions the umask gives a new file (0644 under umask 022),
like any file a program writes, not mkstemp's private 0600: a group can read its runs.

``mpff.load_model(path).predict(images)`` classifies raw images (uint8 0..255, any shape with
``input_dim`` values per sample, any byte order; one flat image of ``input_dim`` values is one
row and gets one label) with the goodness or softmax classifier.

A backprop model (``mpff.backprop``) has the same file with ``algorithm = "backprop"`` at the
root (a file without that attribute is FF), ``/layers/<k>`` for every
Linear of the MLP, k = 0 .. L (the last is the output layer, one unit per class), and no ``/head``;
``predict`` takes the argmax of the output.
"""

from __future__ import annotations

import io
import json
import os
import platform
import socket
import time
from typing import Any

import h5py
import numpy as np
import torch
from torch import nn

from . import layers as layer_kinds
from .config import ConfigError
from .fsutil import write_atomic
from .model import FFNet
from .provenance import versions  # noqa: F401 - the version record, stated in mpff.provenance

FORMAT = "mpff-model"
FORMAT_VERSION = 1


def host_facts() -> dict[str, Any]:
    facts = {"host": socket.gethostname(), "platform": platform.platform(),
             "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count() or 0}
    if torch.cuda.is_available():
        facts["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return facts


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc, kernel >= 4.7);
    elsewhere set and restored at once (mpff writes files from one thread)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_h5(path: str):
    """Context manager: an h5py.File built in memory, written to ``path`` atomically when the
    block succeeds (:func:`mpff.fsutil.write_atomic`): a crash, a full disk or an I/O error never
    leaves a half-written file at ``path``, nor a temporary file beside it. The file gets the
    permissions the umask gives new files."""
    class _Atomic:
        def __enter__(self):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.buf = io.BytesIO()
            self.f = h5py.File(self.buf, "w")
            return self.f

        def __exit__(self, exc_type, exc, tb):
            self.f.close()
            if exc_type is None:
                with self.buf.getbuffer() as view:
                    write_atomic(path, view)
            return False
    return _Atomic()


def save_model(path: str, net: FFNet, cfg, *, input_mean: np.ndarray, input_std: np.ndarray,
               input_scale: float = 255.0, test_accuracy: float | None = None,
               extra: dict[str, Any] | None = None) -> None:
    with atomic_h5(path) as f:
        a = f.attrs
        _write_common(f, net.dims, net.num_classes, cfg, input_mean, input_std, input_scale, test_accuracy,
                      extra)
        a["classifier"] = cfg.train.classifier
        a["label_position"] = cfg.model.label_position
        a["neutral_value"] = cfg.model.neutral_value
        a["threshold_coeff"] = cfg.model.threshold_coeff
        a["goodness"] = cfg.model.goodness
        a["norm_eps"] = cfg.model.norm_eps
        spec = layer_kinds.get(net.layer_kind)
        if net.layer_kind != layer_kinds.DEFAULT:  # files of linear layers stay as they always were
            a["layer"] = net.layer_kind
        for k in range(len(net.layers)):
            f.create_group(f"layers/{k}").attrs["description"] = spec.describe(k)
        _write_layers(f, net.layers, net.dims, spec)
        _dataset(f, "head/weight", net.head.weight, "(classes, sum(dims[2:]))", "1",
                 "bias-free softmax head: logits = concat(activations of layers 1..L-1 on a neutral "
                 "sample) @ weight.T (layer 0 is skipped, as the paper does)")


def save_bp_model(path: str, net, cfg, input_mean: np.ndarray, input_std: np.ndarray,
                  input_scale: float = 255.0, test_accuracy: float | None = None,
                  extra: dict[str, Any] | None = None) -> None:
    """Write backprop's MLP (mpff.model.MLP): every Linear, the output layer included."""
    with atomic_h5(path) as f:
        _write_common(f, net.dims, net.num_classes, cfg, input_mean, input_std, input_scale, test_accuracy,
                      extra)
        f.attrs["algorithm"] = "backprop"
        f.attrs["classifier"] = "argmax"
        for k in range(len(net.layers)):
            last = k == len(net.layers) - 1
            f.create_group(f"layers/{k}").attrs["description"] = (
                f"MLP layer {k}: y = {'x @ weight.T + bias (the logits)' if last else 'relu(x @ weight.T + bias)'}")
        _write_layers(f, net.layers, (*net.dims, net.num_classes), layer_kinds.get(layer_kinds.DEFAULT))


def _write_common(f: h5py.File, dims, num_classes: int, cfg, input_mean, input_std, input_scale: float,
                  test_accuracy: float | None, extra: dict[str, Any] | None) -> None:
    a = f.attrs
    a["format"] = FORMAT
    a["format_version"] = FORMAT_VERSION
    a["dims"] = np.array(dims, dtype=np.int64)
    a["num_classes"] = int(num_classes)
    a["test_accuracy"] = float("nan") if test_accuracy is None else float(test_accuracy)
    a["config"] = cfg.to_json()
    a["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    for k, v in versions().items():
        a[f"version_{k}"] = str(v)
    for k, v in host_facts().items():
        a[f"host_{k}"] = v if isinstance(v, (str, int)) else json.dumps(v)
    for k, v in (extra or {}).items():
        a[k] = v if isinstance(v, (str, int, float)) else json.dumps(v)
    a["weights_layout"] = "(out_features, in_features), as torch.nn.Linear: y = x @ weight.T + bias"
    _dataset(f, "input/mean", np.asarray(input_mean, dtype=np.float32), "(input_dim,)",
             "raw / scale", "per-input mean subtracted after dividing raw values by scale")
    _dataset(f, "input/std", np.asarray(input_std, dtype=np.float32), "(input_dim,)",
             "raw / scale", "per-input standard deviation: x = (raw / scale - mean) / std")
    f["input"].attrs["scale"] = float(input_scale)
    f["input"].attrs["description"] = ("input normalisation: x = (raw / scale - mean) / std, raw "
                                       "the data set's values (0..255 pixels for MNIST)")
    for section, values in cfg.to_dict().items():
        if isinstance(values, dict):
            g = f.create_group(f"config/{section}")
            for key, value in values.items():
                g.attrs[key] = value if not isinstance(value, list) else np.array(value)


#: (layout, description) of the parameters of the linear layers, as files have always said
_TENSOR_TEXT = {
    "weight": ("(out_features, in_features)", "weights of layer {k} ({shape[1]} inputs -> {shape[0]} units)"),
    "bias": ("(out_features,)", "biases of layer {k}"),
}


def _write_layers(f: h5py.File, layers, dims, spec) -> None:
    """``layers/<k>/<tensor>`` for every tensor the layer kind ``spec`` names (mpff.layers)."""
    for k, layer in enumerate(layers):
        g = f.require_group(f"layers/{k}")
        for t in spec.tensors(int(dims[k]), int(dims[k + 1])):
            layout, text = _TENSOR_TEXT.get(t.name, (str(t.shape), "{name} of layer {k}"))
            _dataset(g, t.name, getattr(layer, t.name), layout, "1", text.format(k=k, shape=t.shape, name=t.name))


def _read_layers(f: h5py.File, layers, dims, spec) -> None:
    """Inverse of :func:`_write_layers`: every tensor of every layer from the file."""
    with torch.no_grad():
        for k, layer in enumerate(layers):
            for t in spec.tensors(int(dims[k]), int(dims[k + 1])):
                getattr(layer, t.name).copy_(torch.from_numpy(f[f"layers/{k}/{t.name}"][()]))


def _writable(a: np.ndarray) -> np.ndarray:
    """A read-only array (np.frombuffer, a memory map) copied: torch shares memory with a NumPy
    array and warns about one it could write to but must not."""
    return a if a.flags.writeable else a.copy()


def _normalize_images(images, mean: torch.Tensor, std: torch.Tensor, scale: float) -> torch.Tensor:
    """Raw images -> the network's normalised inputs; anything that would give silently wrong
    labels (a wrong size, NaN or infinity, values outside the data's range, images already
    scaled to 0..1) is a ValueError with one line that says what to pass instead."""
    dim = mean.shape[0]
    if not torch.is_tensor(images):
        images = np.asarray(images)
        if images.dtype.kind in "iuf" and not images.dtype.isnative:
            # torch takes native byte order only; the values are the same in ours
            images = images.astype(images.dtype.newbyteorder("="))
        if images.dtype.kind in "iufb" and any(st < 0 for st in images.strides):
            images = np.ascontiguousarray(images)  # a reversed view (x[::-1]): torch refuses those
    try:
        x = torch.as_tensor(images if torch.is_tensor(images) else _writable(images))
    except (TypeError, ValueError, RuntimeError):
        kind = getattr(images, "dtype", None)
        raise ValueError(f"images must be an array of numbers ({dim} per sample), not dtype {kind}; "
                         "pass uint8 pixels 0..255 or floats") from None
    if x.ndim == 0:
        raise ValueError(f"images must be an array of samples ({dim} values each), not a scalar")
    if x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"images have dtype {x.dtype}; pass numbers (uint8 pixels 0..255)")
    if x.ndim == 1 and x.numel() == dim:
        x = x.reshape(1, dim)  # one image, flat: one row (its label comes back as shape (1,))
    n = x.shape[0]
    if x.numel() != n * dim or (n == 0 and x.ndim > 1 and int(np.prod(x.shape[1:])) != dim):
        one = f" (that is one image's values: pass it as shape ({dim},) or {(1, *x.shape)})" \
            if x.numel() == dim else ""
        raise ValueError(f"expected {dim} values per sample, got an array of shape {tuple(x.shape)}{one}; "
                         f"pass shape (n, {dim}), or any (n, ...) whose rows hold {dim} values")
    x = x.reshape(n, dim).to(torch.float32)
    if n == 0:
        return x
    if not bool(torch.isfinite(x).all()):
        raise ValueError("images contain NaN or infinity; pass finite pixel values")
    if scale == 255.0:  # a data set of 8-bit pixels
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"pixel values must lie in 0..255 (raw images), found {lo:g}..{hi:g}")
        floating = torch.is_tensor(images) and images.is_floating_point() or (
            not torch.is_tensor(images) and np.issubdtype(np.asarray(images).dtype, np.floating))
        if floating and 0 < hi <= 1.0:
            raise ValueError("the images look scaled to 0..1; pass raw 0..255 pixel values (multiply by 255)")
    return (x / scale - mean) / std


def _dataset(group, name: str, data, layout: str, units: str, description: str) -> None:
    if torch.is_tensor(data):
        data = data.detach().cpu().numpy()
    ds = group.create_dataset(name, data=data)
    ds.attrs["layout"] = layout
    ds.attrs["units"] = units
    ds.attrs["description"] = description


class FFModel(nn.Module):
    """A trained FF network that classifies raw images."""

    def __init__(self, net: FFNet, input_mean: torch.Tensor, input_std: torch.Tensor,
                 classifier: str, attrs: dict[str, Any], input_scale: float = 255.0) -> None:
        super().__init__()
        self.input_scale = input_scale
        self.net = net
        self.register_buffer("input_mean", input_mean)
        self.register_buffer("input_std", input_std)
        self.classifier = classifier
        self.attrs = attrs

    def normalize(self, images) -> torch.Tensor:
        return _normalize_images(images, self.input_mean, self.input_std, self.input_scale)

    @torch.no_grad()
    def predict(self, images, method: str | None = None) -> torch.Tensor:
        """Labels for raw images (0..255 pixel values, or the raw floats of a float data set);
        method 'goodness' or 'softmax' (default: the classifier the model was trained with).
        No images give no labels (an empty int64 tensor)."""
        x = self.normalize(images)
        if x.shape[0] == 0:
            return torch.empty(0, dtype=torch.int64, device=x.device)
        return self.net.predict(x, method or self.classifier)

    def forward(self, images) -> torch.Tensor:
        return self.net.scores(self.normalize(images), self.classifier)


class BPModel(nn.Module):
    """A trained backprop MLP that classifies raw images (the argmax of its output)."""

    def __init__(self, net, input_mean: torch.Tensor, input_std: torch.Tensor, attrs: dict[str, Any],
                 input_scale: float = 255.0) -> None:
        super().__init__()
        self.input_scale = input_scale
        self.net = net
        self.register_buffer("input_mean", input_mean)
        self.register_buffer("input_std", input_std)
        self.classifier = "argmax"
        self.attrs = attrs

    def normalize(self, images) -> torch.Tensor:
        return _normalize_images(images, self.input_mean, self.input_std, self.input_scale)

    @torch.no_grad()
    def predict(self, images, method: str | None = None) -> torch.Tensor:
        """Labels for raw images (0..255 pixel values, or the raw floats of a float data set)."""
        if method not in (None, "argmax"):
            raise ValueError(f"a backprop model classifies by the argmax of its output, not {method!r}")
        x = self.normalize(images)
        if x.shape[0] == 0:
            return torch.empty(0, dtype=torch.int64, device=x.device)
        return self.net.predict(x)

    def forward(self, images) -> torch.Tensor:
        return self.net.logits(self.normalize(images))


def load_model(path: str, device: str = "cpu") -> FFModel | BPModel:
    try:
        f = h5py.File(path, "r")
    except (OSError, FileNotFoundError) as exc:
        raise ConfigError(f"cannot read model {path!r} ({exc.__class__.__name__}); "
                          "give the model.h5 of a finished run") from None
    with f:
        if f.attrs.get("format") != FORMAT:
            raise ConfigError(f"{path!r} is not an mpff model file")
        version = int(f.attrs.get("format_version", 1))
        if version > FORMAT_VERSION:
            raise ConfigError(f"{path!r} has model format version {version}, newer than this mpff "
                              f"reads ({FORMAT_VERSION}); upgrade mpff")
        a = dict(f.attrs)
        dims = [int(d) for d in a["dims"]]
        if a.get("algorithm", "ff") == "backprop":
            return _load_bp(f, a, dims).to(device).eval()
        # the class count is the head's rows (not every file has a num_classes attribute)
        kind = str(a.get("layer", layer_kinds.DEFAULT))
        if kind not in layer_kinds.names():
            raise ConfigError(f"{path!r} holds layers of kind {kind!r}, which is not registered here; "
                              "register it (mpff.layers.register) before loading the model")
        net = FFNet(dims, threshold_coeff=float(a["threshold_coeff"]), goodness=str(a["goodness"]),
                    norm_eps=float(a["norm_eps"]), label_position=str(a["label_position"]),
                    neutral_value=float(a["neutral_value"]), num_classes=int(f["head/weight"].shape[0]),
                    layer=kind)
        _read_layers(f, net.layers, dims, layer_kinds.get(kind))
        with torch.no_grad():
            net.head.weight.copy_(torch.from_numpy(f["head/weight"][()]))
        mean = torch.from_numpy(f["input/mean"][()])
        std = torch.from_numpy(f["input/std"][()])
        scale = float(f["input"].attrs.get("scale", 255.0))
    model = FFModel(net, mean, std, str(a["classifier"]), a, input_scale=scale)
    return model.to(device).eval()


def _load_bp(f: h5py.File, attrs: dict[str, Any], dims: list[int]) -> BPModel:
    from .model import MLP
    net = MLP(dims, num_classes=int(f[f"layers/{len(dims) - 1}/weight"].shape[0]))
    _read_layers(f, net.layers, (*dims, net.num_classes), layer_kinds.get(layer_kinds.DEFAULT))
    return BPModel(net, torch.from_numpy(f["input/mean"][()]), torch.from_numpy(f["input/std"][()]), attrs,
                   input_scale=float(f["input"].attrs.get("scale", 255.0)))


def weights_of(path: str) -> dict[str, np.ndarray]:
    """Every array of a model file by name (for bit-for-bit comparisons)."""
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out
