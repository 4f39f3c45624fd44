"""The final model in HDF5, written atomically, readable with plain h5py (or HDFView).

Layout (``docs/traces.md`` has the run directory as a whole)::

    /                      attrs: format="mpff-model", format_version, dims, classifier,
                           label_position, neutral_value, threshold_coeff, goodness, norm_eps,
                           test_accuracy, config (JSON), versions and host facts
    /layers/<k>/weight     (out_features, in_features) float32, k = 0 .. L-1
    /layers/<k>/bias       (out_features,) float32
    /head/weight           (10, sum(dims[2:])) float32 (the softmax head; bias-free)
    /input/mean, /input/std  (input_dim,) float32: raw pixel / 255 -> (x - mean) / std
    /config/<section>      attrs: the resolved configuration, one attribute per key

Every dataset says what it holds in its attributes: ``layout`` (the meaning of each axis,
e.g. ``(out_features, in_features)``: ``y = x @ weight.T + bias`` as torch.nn.Linear),
``units`` and ``description``. Adding them left the layout as it was, so files written
before them (the same format_version 1) read the same.

Files are created with the permissions the umask gives a new file (0644 under umask 022),
like any file a program writes, not mkstemp's private 0600: a group can read its runs.

``mpff.load_model(path).predict(images)`` classifies raw images (uint8 0..255, any shape with
``input_dim`` values per sample) with the goodness or softmax classifier.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import tempfile
import time
from typing import Any

import h5py
import numpy as np
import torch
from torch import nn

from .config import ConfigError
from .model import FFNet

FORMAT = "mpff-model"
FORMAT_VERSION = 1


def versions() -> dict[str, str]:
    from . import __version__
    out = {"mpff": __version__, "torch": torch.__version__, "numpy": np.__version__,
           "h5py": h5py.__version__, "python": platform.python_version()}
    try:
        import mpi4py
        out["mpi4py"] = mpi4py.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


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
    """Context manager: an h5py.File open on a temporary file next to ``path``, renamed over it
    only when the block succeeds, so a crash never leaves a half-written file at ``path``.
    The file gets the permissions the umask gives new files (mkstemp would leave it 0600)."""
    class _Atomic:
        def __enter__(self):
            d = os.path.dirname(os.path.abspath(path))
            os.makedirs(d, exist_ok=True)
            fd, self.tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".h5", dir=d)
            os.close(fd)
            self.f = h5py.File(self.tmp, "w")
            return self.f

        def __exit__(self, exc_type, exc, tb):
            self.f.close()
            if exc_type is None:
                os.chmod(self.tmp, 0o666 & ~current_umask())
                os.replace(self.tmp, path)
            else:
                os.unlink(self.tmp)
            return False
    return _Atomic()


def save_model(path: str, net: FFNet, cfg, *, input_mean: np.ndarray, input_std: np.ndarray,
               input_scale: float = 255.0, test_accuracy: float | None = None,
               extra: dict[str, Any] | None = None) -> None:
    with atomic_h5(path) as f:
        a = f.attrs
        a["format"] = FORMAT
        a["format_version"] = FORMAT_VERSION
        a["dims"] = np.array(net.dims, dtype=np.int64)
        a["classifier"] = cfg.train.classifier
        a["label_position"] = cfg.model.label_position
        a["neutral_value"] = cfg.model.neutral_value
        a["threshold_coeff"] = cfg.model.threshold_coeff
        a["goodness"] = cfg.model.goodness
        a["norm_eps"] = cfg.model.norm_eps
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
        for k, layer in enumerate(net.layers):
            g = f.create_group(f"layers/{k}")
            g.attrs["description"] = (f"FF layer {k}: y = relu(x_n @ weight.T + bias), x_n = x / "
                                      f"(||x||_2 + norm_eps), x the {'input' if k == 0 else 'layer below'}")
            _dataset(g, "weight", layer.weight, "(out_features, in_features)", "1",
                     f"weights of layer {k} ({layer.weight.shape[1]} inputs -> {layer.weight.shape[0]} units)")
            _dataset(g, "bias", layer.bias, "(out_features,)", "1", f"biases of layer {k}")
        _dataset(f, "head/weight", net.head.weight, "(classes, sum(dims[2:]))", "1",
                 "bias-free softmax head: logits = concat(activations of layers 1..L-1 on a neutral "
                 "sample) @ weight.T (layer 0 is skipped, as the paper does)")
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
        x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
        x = x.reshape(x.shape[0], -1).to(torch.float32) / self.input_scale
        if x.shape[1] != self.input_mean.shape[0]:
            raise ValueError(f"expected {self.input_mean.shape[0]} values per sample, got {x.shape[1]}")
        return (x - self.input_mean) / self.input_std

    @torch.no_grad()
    def predict(self, images, method: str | None = None) -> torch.Tensor:
        """Labels for raw images (0..255 pixel values, or the raw floats of a float data set);
        method 'goodness' or 'softmax' (default: the classifier the model was trained with)."""
        return self.net.predict(self.normalize(images), method or self.classifier)

    def forward(self, images) -> torch.Tensor:
        return self.net.scores(self.normalize(images), self.classifier)


def load_model(path: str, device: str = "cpu") -> FFModel:
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
        net = FFNet(dims, threshold_coeff=float(a["threshold_coeff"]), goodness=str(a["goodness"]),
                    norm_eps=float(a["norm_eps"]), label_position=str(a["label_position"]),
                    neutral_value=float(a["neutral_value"]))
        with torch.no_grad():
            for k, layer in enumerate(net.layers):
                layer.weight.copy_(torch.from_numpy(f[f"layers/{k}/weight"][()]))
                layer.bias.copy_(torch.from_numpy(f[f"layers/{k}/bias"][()]))
            net.head.weight.copy_(torch.from_numpy(f["head/weight"][()]))
        mean = torch.from_numpy(f["input/mean"][()])
        std = torch.from_numpy(f["input/std"][()])
        scale = float(f["input"].attrs.get("scale", 255.0))
    model = FFModel(net, mean, std, str(a["classifier"]), a, input_scale=scale)
    return model.to(device).eval()


def weights_of(path: str) -> dict[str, np.ndarray]:
    """Every array of a model file by name (for bit-for-bit comparisons)."""
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out
