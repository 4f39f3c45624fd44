"""The model HDF5 file (mpff.modelfile): round trip, plain-h5py layout, atomic writes."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
import torch

import mpff
from mpff.config import ConfigError, load
from mpff.data import embedded_mnist_dir, load_dataset, read_idx
from mpff.modelfile import FORMAT, atomic_h5, save_model, weights_of
from mpff.train import train_local

N_TEST = 500


@pytest.fixture(scope="module")
def raw_test_images():
    images = read_idx(os.path.join(embedded_mnist_dir(), "t10k-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(embedded_mnist_dir(), "t10k-labels-idx1-ubyte.gz"))
    assert images.dtype == np.uint8 and images.shape == (10000, 28, 28)
    return images[:N_TEST], labels[:N_TEST].astype(np.int64)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small network trained in this process (softmax head included), saved to model.h5."""
    cfg = load("configs/tiny.toml", [
        "model.dims=[784,128,128]", "data.train_subset=2000", f"data.test_subset={N_TEST}",
        "train.epochs=4", "train.chapters=4", "train.lr=0.1", "train.head_lr=0.01",
        "train.classifier=softmax", "train.negatives=random", "train.eval_every=0"])
    dataset = load_dataset(cfg.data)
    path = str(tmp_path_factory.mktemp("model") / "model.h5")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net = train_local(cfg, dataset).net
    finally:
        torch.set_num_threads(threads)
    save_model(path, net, cfg, input_mean=dataset.input_mean, input_std=dataset.input_std,
               input_scale=dataset.input_scale, test_accuracy=0.5, extra={"schedule": "sequential"})
    return path, net, cfg, dataset


def _normalise(raw, dataset) -> torch.Tensor:
    x = torch.from_numpy(raw.reshape(raw.shape[0], -1)).to(torch.float32) / 255.0
    return (x - torch.from_numpy(dataset.input_mean)) / torch.from_numpy(dataset.input_std)


@pytest.mark.parametrize("method", ["goodness", "softmax"])
def test_predictions_identical_after_reload(trained, raw_test_images, method):
    path, net, _, dataset = trained
    raw, labels = raw_test_images
    before = net.predict(_normalise(raw, dataset), method)
    model = mpff.load_model(path)
    after = model.predict(raw, method)
    assert after.dtype == torch.int64 and after.shape == (N_TEST,)
    assert torch.equal(before, after)
    # a trained network, not a constant: several classes predicted (the head well above chance)
    assert len(np.unique(after.numpy())) >= 3
    if method == "softmax":
        assert (after.numpy() == labels).mean() > 0.25
    # the same images as the training pipeline normalised them (its own lookup table)
    assert torch.allclose(model.normalize(raw), torch.from_numpy(dataset.x_test), atol=1e-5)
    agree = (net.predict(torch.from_numpy(dataset.x_test), method) == after).float().mean()
    assert agree > 0.99


def test_predict_on_read_only_bytes_warns_nothing(trained, raw_test_images):
    """Images straight from a byte buffer (np.frombuffer: read-only) predict as a copy does, with
    no warning: under the suite's filter a warning from mpff's code is an error, so this runs the
    call both ways and also checks that the filter is in force."""
    import warnings
    model = mpff.load_model(trained[0])
    images = raw_test_images[0][:20]
    ro = np.frombuffer(images.tobytes(), dtype=np.uint8).reshape(20, 784)
    assert not ro.flags.writeable
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = model.predict(ro)
    assert [str(w.message) for w in caught] == []
    assert torch.equal(got, model.predict(images.copy()))
    assert any(f[0] == "error" and f[3] is not None and f[3].match("mpff.modelfile")
               for f in warnings.filters), "the suite's warning filter for mpff is not installed"


def test_reload_restores_every_parameter(trained, raw_test_images):
    path, net, cfg, _ = trained
    model = mpff.load_model(path)
    for a, b in zip(net.parameters(), model.net.parameters()):
        assert torch.equal(a.detach(), b.detach())
    assert model.classifier == "softmax"
    raw, _ = raw_test_images
    assert torch.equal(model.predict(raw), model.predict(raw, "softmax"))  # default: trained classifier
    assert torch.equal(model.predict(raw.reshape(N_TEST, 784)), model.predict(raw))  # any shape
    assert model(raw).shape == (N_TEST, 10)
    with pytest.raises(ValueError, match="expected 784 values per sample"):
        model.predict(np.zeros((2, 100), np.uint8))


def test_file_opens_with_plain_h5py(trained):
    path, net, cfg, _ = trained
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] == FORMAT
        assert list(f.attrs["dims"]) == [784, 128, 128]
        assert f.attrs["classifier"] == "softmax" and f.attrs["label_position"] == "last"
        assert f.attrs["test_accuracy"] == 0.5 and f.attrs["schedule"] == "sequential"
        assert json.loads(f.attrs["config"]) == cfg.to_dict()
        assert sorted(f["layers"]) == ["0", "1"]
        for k, (i, o) in enumerate([(784, 128), (128, 128)]):
            assert f[f"layers/{k}/weight"].shape == (o, i) and f[f"layers/{k}/weight"].dtype == np.float32
            assert f[f"layers/{k}/bias"].shape == (o,)
            assert np.array_equal(f[f"layers/{k}/weight"][()], net.layers[k].weight.detach().numpy())
        assert f["head/weight"].shape == (10, 128)
        assert f["input/mean"].shape == (784,) and f["input/std"].shape == (784,)
        assert f["input/mean"][0] == pytest.approx(0.1307) and f["input/std"][0] == pytest.approx(0.3081)
        assert f["input"].attrs["scale"] == 255.0
        assert f["config/train"].attrs["epochs"] == 4
        assert list(f["config/model"].attrs["dims"]) == [784, 128, 128]
    names = set(weights_of(path))
    assert {"layers/0/weight", "layers/1/bias", "head/weight", "input/mean", "input/std"} <= names


def test_cli_run_model(tiny_run, raw_test_images):
    """The model.h5 of a real run: its layout, and its accuracy agrees with run.json."""
    path = os.path.join(tiny_run, "model.h5")
    status = json.loads((tiny_run / "run.json").read_text())
    with h5py.File(path, "r") as f:
        assert f["layers/0/weight"].shape == (16, 784)
        assert f["head/weight"].shape == (10, 32)
        assert f.attrs["test_accuracy"] == pytest.approx(status["test_accuracy"])
    model = mpff.load_model(path)
    raw, labels = raw_test_images
    acc = float((model.predict(raw[:200]).numpy() == labels[:200]).mean())
    assert acc == pytest.approx(status["test_accuracy"], abs=0.011)


def test_atomic_write_keeps_the_previous_file(trained, tmp_path):
    path = str(tmp_path / "model.h5")
    src, net, cfg, dataset = trained
    save_model(path, net, cfg, input_mean=dataset.input_mean, input_std=dataset.input_std)
    with open(path, "rb") as fh:
        before = fh.read()
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_h5(path) as f:
            f.create_dataset("layers/0/weight", data=np.zeros((3, 3), np.float32))
            f.flush()
            raise RuntimeError("disk on fire")
    with open(path, "rb") as fh:
        assert fh.read() == before
    assert os.listdir(tmp_path) == ["model.h5"]
    # a failure inside save_model itself (an attribute it cannot store) is just as harmless
    with pytest.raises(TypeError):
        save_model(path, net, cfg, input_mean=dataset.input_mean, input_std=dataset.input_std,
                   extra={"bad": object()})
    with open(path, "rb") as fh:
        assert fh.read() == before
    assert os.listdir(tmp_path) == ["model.h5"]
    # a successful write replaces the file
    with atomic_h5(path) as f:
        f.attrs["format"] = "other"
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] == "other"
    assert os.listdir(tmp_path) == ["model.h5"]


def test_atomic_write_of_a_new_file_leaves_nothing_on_failure(tmp_path):
    path = str(tmp_path / "sub" / "model.h5")
    with pytest.raises(KeyError):
        with atomic_h5(path):
            raise KeyError("x")
    assert os.listdir(tmp_path / "sub") == []


def test_load_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read model"):
        mpff.load_model(str(tmp_path / "missing.h5"))
    other = str(tmp_path / "other.h5")
    with h5py.File(other, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(ConfigError, match="is not an mpff model file"):
        mpff.load_model(other)
