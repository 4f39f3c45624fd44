"""CIFAR-10 (3072 inputs, python pickle batches) for FF and backprop alike, on small files written
here in the real format: data_batch_1..5 and test_batch (dicts with bytes keys: batch_label,
labels, data as uint8 rows of 1024 red, 1024 green, 1024 blue values, filenames) and
batches.meta (num_cases_per_batch, label_names, num_vis), pickled by protocol 2 as the real
ones were. Each class is a random prototype image plus noise, so a network can learn it in a
few epochs: the tests check that training reads the data right, not CIFAR-10's difficulty.

FF runs through the CLI (`mpff train`); backprop through mpff.backprop.BPState.
"""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch

from mpff.backprop import BPState
from mpff.config import from_dict
from mpff.data import load_dataset
from mpff.modelfile import BPModel, FFModel, load_model, save_bp_model
from mpff.plan import Task
from mpff.trace import Tracer

LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar10(directory, per_batch: int = 40, n_test: int = 100, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    prototypes = rng.integers(30, 226, (10, 3072))
    os.makedirs(directory, exist_ok=True)
    out = {}
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        n = n_test if name == "test_batch" else per_batch
        labels = [int(v) for v in rng.integers(0, 10, n)]
        noise = rng.integers(-40, 41, (n, 3072))
        data = np.clip(prototypes[labels] + noise, 0, 255).astype(np.uint8)
        batch = {b"batch_label": f"{'testing' if k == 5 else 'training'} batch {k % 5 + 1} of 5".encode(),
                 b"labels": labels, b"data": data,
                 b"filenames": [f"{LABEL_NAMES[y]}_s_{i:06d}.png".encode() for i, y in enumerate(labels)]}
        with open(os.path.join(directory, name), "wb") as fh:
            pickle.dump(batch, fh, protocol=2)
        out[name] = (data, np.array(labels))
    meta = {b"num_cases_per_batch": per_batch, b"label_names": [n.encode() for n in LABEL_NAMES],
            b"num_vis": 3072}
    with open(os.path.join(directory, "batches.meta"), "wb") as fh:
        pickle.dump(meta, fh, protocol=2)
    return out


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    # the folder name the real archive extracts to; data.path may name it or its parent
    root = tmp_path_factory.mktemp("cifar")
    batches = write_cifar10(root / "cifar-10-batches-py")
    return root, batches


def test_ff_trains_on_cifar10_through_the_cli(cifar, tmp_path, mpff_run):
    """One hidden layer, which the goodness classifier then uses. (With more, it skips the first,
    and on these prototype-plus-noise files layers 2..L rank the true label below chance after
    training, 0 % test accuracy at [3072,64,64] against 69 % at [3072,64]: a matter of FF's
    learning on this synthetic data, not of reading CIFAR-10, which is what is tested here.)"""
    root, batches = cifar
    out = tmp_path / "run"
    mpff_run(["train", "--config", "configs/tiny.toml", "--out", str(out), "-q",
              "--set", "data.dataset=cifar10", "--set", f"data.path={root}",
              "--set", "model.dims=[3072,64]", "--set", "data.train_subset=0",
              "--set", "data.test_subset=0", "--set", "run.report=false"], check=True)
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and run["test_accuracy"] > 0.5  # chance: 0.1
    model = load_model(str(out / "model.h5"))
    assert isinstance(model, FFModel) and int(model.attrs["dims"][0]) == 3072
    raw, labels = batches["test_batch"]
    accuracy = float((model.predict(raw).numpy() == labels).mean())
    assert accuracy == pytest.approx(run["test_accuracy"], abs=1e-6)


def test_backprop_trains_on_cifar10(cifar, tmp_path):
    root, batches = cifar
    cfg = from_dict({"model": {"dims": [3072, 64]},
                     "train": {"algorithm": "backprop", "epochs": 4, "chapters": 4, "batch_size": 32},
                     "data": {"dataset": "cifar10", "path": str(root)}})
    dataset = load_dataset(cfg.data)
    assert dataset.x_train.shape == (200, 3072) and dataset.x_test.shape == (100, 3072)
    state = BPState(cfg, None, 0, 1, dataset, Tracer(None, 0, {}, enabled=False), torch.device("cpu"))
    for c in range(4):
        state.run(Task("train", c, 0))
    (_, _, _, accuracy) = state.run(Task("eval", 3))[0]
    assert accuracy > 0.9  # chance: 0.1
    path = tmp_path / "model.h5"
    save_bp_model(str(path), state.net, cfg, dataset.input_mean, dataset.input_std, dataset.input_scale,
                  accuracy)
    model = load_model(str(path))
    assert isinstance(model, BPModel)
    raw, labels = batches["test_batch"]  # raw uint8 rows: the model applies the per-channel normalisation
    assert float((model.predict(raw).numpy() == labels).mean()) == pytest.approx(accuracy, abs=1e-6)
