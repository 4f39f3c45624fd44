"""``data.dataset = "torchvision"`` and ``mpff data download`` on small files written here in each
format torchvision reads, at the places its classes look (torchvision 0.29's source):

* MNIST, FashionMNIST, KMNIST: ``ROOT/<name>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``,
  the unpacked IDX files (download=False checks only that they exist);
* EMNIST: ``ROOT/EMNIST/raw/emnist-<split>-{train,test}-{images-idx3,labels-idx1}-ubyte``;
* CIFAR10 / CIFAR100: ``ROOT/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`` and
  ``ROOT/cifar-100-python/{train,test,meta}``, pickles with str keys as the Python 2 originals
  load under ``encoding="latin1"``;
* SVHN: ``ROOT/{train,test}_32x32.mat`` (X of shape (32, 32, 3, N), y in 1..10, 10 for digit 0),
  written with scipy (the case skips without it, as torchvision cannot read them then);
* ImageFolder: ``ROOT/{train,test}/<class>/*.png``, written with PIL.

CIFAR and SVHN files are checked against MD5 sums of the real downloads, which files written here
cannot match: those tests set the class's checksum lists to the sums of the files written (the
check itself still runs, on these files). Nothing is downloaded: the download tests point the
mirrors at a missing local file.

Every test that needs torchvision skips where it cannot be imported (the lean CPU venv, where
torchvision is absent or fails to import beside torch 2.13); those that check the message a user
gets without it run everywhere, with a stand-in torchvision that fails to import.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from test_data import idx_bytes

from mpff import data
from mpff.config import ConfigError, DataConfig, load

try:
    import torchvision.datasets as tvd
except Exception:  # noqa: BLE001 - absent, or built for another torch: any import error
    tvd = None

needs_tv = pytest.mark.skipif(tvd is None, reason="torchvision cannot be imported here")
INSTALL = "pip install torch==2.14.1 torchvision==0.29.1"


def _md5(path) -> str:
    return hashlib.md5(open(path, "rb").read()).hexdigest()


def _prototypes(n_classes: int, dim: int, seed: int):
    """Images of each class: a random prototype plus noise (learnable in an epoch)."""
    rng = np.random.default_rng(seed)
    protos = rng.integers(40, 216, (n_classes, dim))

    def draw(n: int):
        y = np.arange(n) % n_classes
        rng.shuffle(y)
        x = np.clip(protos[y] + rng.integers(-30, 31, (n, dim)), 0, 255).astype(np.uint8)
        return x, y
    return draw


def write_mnist_like(root, name: str, n_train=400, n_test=100, classes=10, split="", seed=0):
    """The unpacked IDX files torchvision's MNIST classes read; returns the raw arrays."""
    draw = _prototypes(classes, 784, seed)
    raw = os.path.join(root, name, "raw")
    os.makedirs(raw, exist_ok=True)
    out = {}
    for train, n in ((True, n_train), (False, n_test)):
        x, y = draw(n)
        if name == "EMNIST":
            prefix = f"emnist-{split}-{'train' if train else 'test'}"
        else:
            prefix = "train" if train else "t10k"
        with open(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), "wb") as fh:
            fh.write(idx_bytes(x.reshape(n, 28, 28)))
        with open(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), "wb") as fh:
            fh.write(idx_bytes(y.astype(np.uint8)))
        out["train" if train else "test"] = (x, y)
    return out


def write_cifar(root, hundred: bool = False, per_batch=60, n_test=100, seed=0):
    """CIFAR-10 (five training batches) or CIFAR-100 (one 'train' file) python pickles, with the
    checksum lists torchvision's class must hold to accept them."""
    classes = 100 if hundred else 10
    draw = _prototypes(classes, 3072, seed)
    folder = os.path.join(root, "cifar-100-python" if hundred else "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    names = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
    arrays = {}
    for name in names + ["test" if hundred else "test_batch"]:
        n = n_test if name.startswith("test") else per_batch * (5 if hundred else 1)
        x, y = draw(n)
        labels = {"fine_labels": [int(v) for v in y], "coarse_labels": [int(v) // 5 for v in y]} if hundred \
            else {"labels": [int(v) for v in y]}
        with open(os.path.join(folder, name), "wb") as fh:
            pickle.dump({"batch_label": name, "data": x, "filenames": [f"{i}.png" for i in range(n)], **labels},
                        fh, protocol=2)
        arrays[name] = (x, y)
    meta_name, key = ("meta", "fine_label_names") if hundred else ("batches.meta", "label_names")
    with open(os.path.join(folder, meta_name), "wb") as fh:
        pickle.dump({key: [f"class{i}" for i in range(classes)], "num_vis": 3072}, fh, protocol=2)
    sums = {name: _md5(os.path.join(folder, name)) for name in arrays}
    lists = {"train_list": [[n, sums[n]] for n in names], "test_list": [[n, sums[n]] for n in arrays if n not in names],
             "meta": {"filename": meta_name, "key": key, "md5": _md5(os.path.join(folder, meta_name))}}
    return arrays, lists


def patch_cifar(monkeypatch, cls, lists) -> None:
    """torchvision checks the MD5 of every file against the real release's: accept these files'."""
    for attr, value in lists.items():
        monkeypatch.setattr(cls, attr, value)


def _dataset(root, name: str, **kw):
    return data.load_dataset(DataConfig(dataset="torchvision", name=name, path=str(root), **kw))


def _train(ds, dims, **train):
    """One epoch of FF in this process (the rank state a 1-rank run uses); the test accuracy."""
    from mpff.config import Config
    from mpff.train import train_local
    # the rank state takes the data set as given (the configuration's data section is not read)
    cfg = Config().replace(model={"dims": dims}, data={"dataset": "npz", "path": "unused"},
                           train={"epochs": 1, "chapters": 1, "batch_size": 32, "lr": 0.01, **train},
                           run={"trace": False, "report": False, "checkpoint_every": 0})
    state = train_local(cfg, ds)
    return state, state.test_accuracy[0]


# ----------------------------------------------------------------------------- reading


@needs_tv
@pytest.mark.parametrize("name", ["MNIST", "FashionMNIST", "KMNIST"])
def test_mnist_likes_read_flattened_and_standardised_on_the_training_split(tmp_path, name):
    raw = write_mnist_like(tmp_path, name)
    ds = _dataset(tmp_path, name, train_subset=300)
    x, y = raw["train"]
    assert ds.name == name and ds.num_classes == 10 and ds.x_train.shape == (300, 784)
    assert np.array_equal(ds.y_train, y[:300]) and np.array_equal(ds.y_test, raw["test"][1])
    pixels = x[:300].astype(np.float64) / 255  # the statistics of the samples used, as mpff's readers
    assert ds.input_scale == 255.0
    np.testing.assert_allclose(ds.input_mean, pixels.mean(), rtol=1e-6)
    np.testing.assert_allclose(ds.input_std, pixels.std(), rtol=1e-6)
    np.testing.assert_allclose(ds.x_test, (raw["test"][0] / 255 - pixels.mean()) / pixels.std(), atol=1e-5)
    # the same files through mpff's own IDX reader: the same data set
    own = data.load_dataset(DataConfig(dataset="idx", path=str(tmp_path / name / "raw"), train_subset=300))
    assert np.array_equal(own.x_train, ds.x_train) and np.array_equal(own.input_std, ds.input_std)


@needs_tv
def test_emnist_split_gives_its_class_count_and_trains(tmp_path):
    raw = write_mnist_like(tmp_path, "EMNIST", n_train=470, n_test=94, classes=47, split="balanced")
    ds = _dataset(tmp_path, "EMNIST", split="balanced")
    assert ds.num_classes == 47 and ds.name == "EMNIST-balanced"
    assert np.array_equal(ds.y_train, raw["train"][1]) and int(ds.y_train.max()) == 46
    state, accuracy = _train(ds, (784, 64), lr=0.1)  # the goodness of each of the 47 labels
    assert state.net.head.out_features == 47
    assert accuracy > 0.1  # chance: 1/47
    from mpff.config import Config
    from mpff.modelfile import load_model, save_model
    path = str(tmp_path / "model.h5")
    save_model(path, state.net, Config(), input_mean=ds.input_mean, input_std=ds.input_std, test_accuracy=accuracy)
    model = load_model(path)  # 47 labels tried on raw images, normalised with the recorded statistics
    assert int(model.attrs["num_classes"]) == 47 and model.net.num_classes == 47
    x, y = raw["test"]
    assert float((model.predict(x).numpy() == y).mean()) == pytest.approx(accuracy, abs=1e-6)
    with pytest.raises(ConfigError, match="EMNIST needs data.split"):
        _dataset(tmp_path, "EMNIST")


@needs_tv
@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_is_laid_out_channel_by_channel_as_mpffs_own_reader(tmp_path, monkeypatch, hundred):
    arrays, lists = write_cifar(tmp_path, hundred)
    patch_cifar(monkeypatch, tvd.CIFAR100 if hundred else tvd.CIFAR10, lists)
    name = "CIFAR100" if hundred else "CIFAR10"
    ds = _dataset(tmp_path, name)
    assert ds.num_classes == (100 if hundred else 10) and ds.x_train.shape == (300, 3072)
    train = [arrays[n] for n, _ in lists["train_list"]]
    x = np.concatenate([a for a, _ in train])
    assert np.array_equal(ds.y_train, np.concatenate([b for _, b in train]))
    for c in range(3):  # per-channel statistics of the training images, the channel's 1024 values
        block = x[:, c * 1024:(c + 1) * 1024] / 255
        np.testing.assert_allclose(ds.input_mean[c * 1024:(c + 1) * 1024], block.mean(), rtol=1e-6)
        np.testing.assert_allclose(ds.input_std[c * 1024:(c + 1) * 1024], block.std(), rtol=1e-6)
    if not hundred:  # mpff's own CIFAR-10 reader on the same files gives the same arrays
        own = data.load_dataset(DataConfig(dataset="cifar10", path=str(tmp_path)))
        assert np.array_equal(own.x_train, ds.x_train) and np.array_equal(own.x_test, ds.x_test)
    _, accuracy = _train(ds, (3072, 64), **({"classifier": "softmax", "head_lr": 0.01} if hundred else {}))
    assert accuracy > (0.1 if hundred else 0.5)  # chance: 0.01, 0.1
    if hundred:  # backprop's output layer has a unit per class, and so has its model file
        import torch

        from mpff.backprop import BPState
        from mpff.config import from_dict
        from mpff.modelfile import load_model, save_bp_model
        from mpff.plan import Task
        from mpff.trace import Tracer
        cfg = from_dict({"model": {"dims": [3072, 64]}, "data": {"dataset": "npz", "path": "unused"},
                         "train": {"algorithm": "backprop", "epochs": 2, "chapters": 2, "batch_size": 32}})
        state = BPState(cfg, None, 0, 1, ds, Tracer(None, 0, {}, enabled=False), torch.device("cpu"))
        for c in range(2):
            state.run(Task("train", c, 0))
        (_, _, _, accuracy) = state.run(Task("eval", 1))[0]
        assert state.net.layers[-1].out_features == 100 and accuracy > 0.1
        path = str(tmp_path / "bp.h5")
        save_bp_model(path, state.net, cfg, ds.input_mean, ds.input_std, ds.input_scale, accuracy)
        x, y = arrays["test"]
        assert float((load_model(path).predict(x).numpy() == y).mean()) == pytest.approx(accuracy, abs=1e-6)


@needs_tv
def test_cifar_with_another_files_checksums_is_refused(tmp_path):
    write_cifar(tmp_path)  # torchvision's real checksums stay: these files fail them
    with pytest.raises(ConfigError, match="fail torchvision's checksum") as err:
        _dataset(tmp_path, "CIFAR10")
    assert "mpff data download CIFAR10" in str(err.value)


@needs_tv
def test_svhn_reads_mat_files(tmp_path, monkeypatch):
    sio = pytest.importorskip("scipy.io")
    draw = _prototypes(10, 3072, 3)
    lists, arrays = {}, {}
    for split, n in (("train", 300), ("test", 100)):
        x, y = draw(n)  # x channel by channel (N, 3, 32, 32); the .mat holds (32, 32, 3, N)
        mat = x.reshape(n, 3, 32, 32).transpose(2, 3, 1, 0)
        path = tmp_path / f"{split}_32x32.mat"
        sio.savemat(path, {"X": mat, "y": np.where(y == 0, 10, y).reshape(n, 1).astype(np.uint8)})
        lists[split] = [f"http://example.invalid/{split}_32x32.mat", path.name, _md5(path)]
        arrays[split] = (x, y)
    monkeypatch.setattr(tvd.SVHN, "split_list", lists)
    ds = _dataset(tmp_path, "SVHN")
    assert ds.num_classes == 10 and np.array_equal(ds.y_train, arrays["train"][1])
    first = arrays["train"][0][:, :1024] / 255  # the red channel comes first, as in CIFAR
    np.testing.assert_allclose(ds.input_mean[0], first.mean(), rtol=1e-6)
    _, accuracy = _train(ds, (3072, 64))
    assert accuracy > 0.5


def write_image_folder(root, classes=("cat", "dog", "owl"), size=(8, 6), n_train=30, n_test=9, seed=0):
    from PIL import Image
    draw = _prototypes(len(classes), size[0] * size[1] * 3, seed)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x, y = draw(n)
        for i, (img, label) in enumerate(zip(x, y)):
            folder = os.path.join(root, split, classes[label])
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(img.reshape(size[1], size[0], 3)).save(os.path.join(folder, f"{i:03d}.png"))
        out[split] = (x, y)
    return out


@needs_tv
def test_image_folder_reads_class_subfolders_and_trains(tmp_path):
    write_image_folder(tmp_path / "pets")
    ds = _dataset(tmp_path / "pets", "ImageFolder")
    assert ds.name == "pets" and ds.num_classes == 3 and ds.x_train.shape == (30, 144)
    from PIL import Image
    first = sorted(os.listdir(tmp_path / "pets/train/cat"))[0]
    img = np.asarray(Image.open(tmp_path / "pets/train/cat" / first))  # (H, W, 3)
    i = 0  # ImageFolder orders samples class by class, file by file: cat's first file is sample 0
    x = ds.x_train[i] * ds.input_std + ds.input_mean
    np.testing.assert_allclose(x * 255, img.transpose(2, 0, 1).reshape(-1), atol=1e-3)
    _, accuracy = _train(ds, (144, 32), classifier="softmax", head_lr=0.01)
    assert accuracy > 0.6  # chance: 1/3


@needs_tv
def test_image_folder_problems_are_one_line_config_errors(tmp_path):
    write_image_folder(tmp_path / "a")
    from PIL import Image
    Image.new("RGB", (5, 5)).save(tmp_path / "a/train/cat/zz.png")
    with pytest.raises(ConfigError, match="resize the images to one size"):
        _dataset(tmp_path / "a", "ImageFolder")
    write_image_folder(tmp_path / "b")
    os.rename(tmp_path / "b/test/owl", tmp_path / "b/test/emu")
    with pytest.raises(ConfigError, match="same class folders"):
        _dataset(tmp_path / "b", "ImageFolder")
    (tmp_path / "c/train").mkdir(parents=True)
    with pytest.raises(ConfigError, match="one subfolder of images per class"):
        _dataset(tmp_path / "c", "ImageFolder")
    write_image_folder(tmp_path / "d", n_test=0)
    with pytest.raises(ConfigError, match="ImageFolder: .*test is not a folder"):
        _dataset(tmp_path / "d", "ImageFolder")


@needs_tv
def test_missing_files_name_the_file_and_the_download_command(tmp_path):
    with pytest.raises(ConfigError) as err:
        _dataset(tmp_path, "FashionMNIST")
    text = str(err.value)
    assert "\n" not in text and "FashionMNIST/raw/train-images-idx3-ubyte is missing" in text
    assert f"mpff data download FashionMNIST --path {tmp_path}" in text
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"x"))
    with pytest.raises(ConfigError, match="train-images-idx3-ubyte is still gzipped; unpack and check it with "
                                          "`mpff data download FashionMNIST"):
        _dataset(tmp_path, "FashionMNIST")


# ----------------------------------------------------------------------------- mpff train


@needs_tv
def test_train_fashion_mnist_through_the_cli_and_predict_raw_images(tmp_path, mpff_run, mpff_tiny_args):
    raw = write_mnist_like(tmp_path / "tv", "FashionMNIST", seed=4)
    out = tmp_path / "run"
    mpff_run(mpff_tiny_args(out, "data.dataset=torchvision", "data.name=FashionMNIST",
                            f"data.path={tmp_path / 'tv'}", "model.dims=[784,64]", "data.train_subset=0",
                            "data.test_subset=0", "train.epochs=1", "train.chapters=1"), check=True)
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and run["test_accuracy"] > 0.5  # chance: 0.1
    from mpff.modelfile import load_model
    model = load_model(str(out / "model.h5"))
    x, y = raw["test"]
    # the model normalises raw pixels with the training split's statistics it recorded
    pixels = raw["train"][0] / 255
    np.testing.assert_allclose(model.input_mean.numpy(), pixels.mean(), rtol=1e-6)
    assert int(model.attrs["num_classes"]) == 10
    accuracy = float((model.predict(x).numpy() == y).mean())
    assert accuracy == pytest.approx(run["test_accuracy"], abs=1e-6)


@needs_tv
@pytest.mark.mpi
def test_two_rank_single_layer_on_a_torchvision_set(tmp_path, mpff_run, mpff_tiny_args):
    write_mnist_like(tmp_path / "tv", "KMNIST", classes=10, seed=5)
    out = tmp_path / "run"
    mpff_run(mpff_tiny_args(out, "data.dataset=torchvision", "data.name=KMNIST", f"data.path={tmp_path / 'tv'}",
                            "model.dims=[784,32,32]", "run.schedule=single_layer", "data.train_subset=0",
                            "data.test_subset=0", "train.epochs=2", "train.chapters=2"), ranks=2, check=True,
             timeout=300)
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


@needs_tv
@pytest.mark.mpi
def test_missing_files_end_every_rank_with_one_line(tmp_path, mpff_run, mpff_tiny_args):
    out = tmp_path / "run"
    proc = mpff_run(mpff_tiny_args(out, "data.dataset=torchvision", "data.name=FashionMNIST",
                                   f"data.path={tmp_path}", "run.schedule=single_layer",
                                   "model.dims=[784,16,16]"), ranks=2, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "mpff data download FashionMNIST" in lines[0], proc.stderr
    assert not (out / "run.json").exists()


@pytest.mark.parametrize("sets, message", [
    (["data.name=Imagenet"], "is not a data set mpff reads through torchvision"),
    (["data.name=EMNIST"], "EMNIST needs data.split"),
    (["data.name=EMNIST", "data.split=capitals"], "EMNIST data.split = 'capitals' is not one of"),
    (["data.name=MNIST", "data.split=balanced"], "data.split is for EMNIST"),
    (["data.name=CIFAR10"], "CIFAR10 has 3072 inputs: set model.dims[0] = 3072"),
])
def test_torchvision_settings_are_checked_with_the_configuration(tmp_path, sets, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load(None, ["data.dataset=torchvision", f"data.path={tmp_path}", *sets])


def test_data_name_without_torchvision_dataset_is_refused():
    with pytest.raises(ConfigError, match="data.name is for data.dataset = 'torchvision'"):
        load(None, ["data.name=FashionMNIST"])


def test_the_class_count_follows_the_data_set_into_the_plan():
    from mpff.plan import Buf, build_plan
    cfg = load(None, ["data.dataset=torchvision", "data.name=CIFAR100", "data.path=x", "model.dims=[3072,20,30]",
                      "train.classifier=softmax"])
    assert cfg.data.num_classes == 100
    assert build_plan(cfg, 1).buffer_spec(Buf("head", -1, 0), False)[0] == 100 * 30
    assert build_plan(cfg, 1, num_classes=7).buffer_spec(Buf("head", -1, 0), False)[0] == 7 * 30
    bp = cfg.replace(train={"algorithm": "backprop", "classifier": "goodness"})
    layers = 3072 * 20 + 20 + 20 * 30 + 30
    assert build_plan(bp, 1).buffer_spec(Buf("model", -1, 0), False)[0] == layers + 30 * 100 + 100


def test_a_run_checkpointed_before_data_name_existed_resumes(tmp_path, mpff_run, mpff_tiny_args):
    """Checkpoints and config.toml written before data.name and data.split existed lack them:
    missing keys take their defaults, so the run still matches its checkpoint and resumes."""
    import h5py
    out = tmp_path / "run"
    mpff_run(mpff_tiny_args(out, "model.dims=[784,16]", "train.epochs=3", "train.chapters=3"), check=True)
    for ckpt in sorted((out / "checkpoints").iterdir()):
        with h5py.File(ckpt / "rank0000.h5", "r+") as f:
            cfg = json.loads(f.attrs["config"])
            del cfg["data"]["name"], cfg["data"]["split"]
            f.attrs["config"] = json.dumps(cfg, sort_keys=True)
    toml = (out / "config.toml").read_text()
    (out / "config.toml").write_text("".join(line for line in toml.splitlines(keepends=True)
                                             if not line.startswith(("name = \"\"", "split = "))))
    run = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**run, "status": "preempted"}))
    proc = mpff_run(["train", "--out", str(out), "--resume", "-q"])
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


# ----------------------------------------------------------------------------- without torchvision


@pytest.fixture
def broken_torchvision(tmp_path, mpff_launch):
    """An environment where ``import torchvision`` fails as it does beside a torch it was not built
    for (a RuntimeError from inside its import, not an ImportError)."""
    fake = tmp_path / "fake" / "torchvision"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    env = dict(mpff_launch.env, PYTHONPATH=str(tmp_path / "fake"))
    return lambda *args: subprocess.run([mpff_launch.python, "-m", "mpff", *args], cwd=mpff_launch.root, env=env,
                                        capture_output=True, text=True, timeout=120)


def test_without_torchvision_train_says_how_to_install_it(tmp_path, broken_torchvision):
    out = tmp_path / "run"
    proc = broken_torchvision("train", "--config", "tiny", "--out", str(out), "-q", "--set", "data.dataset=torchvision",
                              "--set", "data.name=FashionMNIST", "--set", f"data.path={tmp_path}")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and INSTALL in lines[0] and "RuntimeError" in lines[0], proc.stderr
    assert not (out / "run.json").exists()


def test_without_torchvision_data_download_says_how_to_install_it(tmp_path, broken_torchvision):
    proc = broken_torchvision("data", "download", "FashionMNIST", "--path", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and INSTALL in proc.stderr, proc.stderr


def test_the_default_data_set_never_imports_torchvision(mpff_launch):
    code = ("import sys; from mpff.config import load; from mpff.data import load_dataset; import mpff.train; "
            "load_dataset(load(None, ['data.train_subset=10', 'data.test_subset=10']).data); "
            "assert 'torchvision' not in sys.modules, 'torchvision imported'")
    proc = subprocess.run([mpff_launch.python, "-c", code], cwd=mpff_launch.root, env=mpff_launch.env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# ----------------------------------------------------------------------------- mpff data download


def _data_main(args, capsys):
    from mpff.cli import main
    code = main(["data", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@needs_tv
def test_download_offline_says_what_to_fetch_and_where(tmp_path, monkeypatch, capsys):
    nowhere = f"file://{tmp_path}/no-such-mirror/"  # fails at once, as an unreachable host does
    monkeypatch.setattr(tvd.FashionMNIST, "mirrors", [nowhere])
    code, _, err = _data_main(["download", "FashionMNIST", "--path", str(tmp_path / "root")], capsys)
    assert code == 2 and err.count("\n") == 1, err
    files = [f"{nowhere}{name}" for name, _ in tvd.FashionMNIST.resources]
    assert " ".join(files) in err and f"put them in {tmp_path / 'root' / 'FashionMNIST' / 'raw'}/" in err
    assert not (tmp_path / "root").exists()  # nothing left behind: the folders made for the files went


@needs_tv
def test_download_urls_are_torchvisions_own():
    from mpff import tvdata
    for name, url in (("CIFAR10", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
                      ("EMNIST", "https://biometrics.nist.gov/cs_links/EMNIST/gzip.zip"),
                      ("MNIST", "https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz")):
        split = "digits" if name == "EMNIST" else ""
        assert url in tvdata.sources(tvd, DataConfig(dataset="torchvision", name=name, split=split, path="r"))[0]
    with pytest.raises(ConfigError, match="nothing to download"):
        tvdata.sources(tvd, DataConfig(dataset="torchvision", name="ImageFolder", path="r"))


@needs_tv
def test_download_with_the_archives_in_place_checks_and_unpacks_them(tmp_path, monkeypatch, capsys, mpff_run,
                                                                     mpff_tiny_args):
    """The offline workflow: the archives fetched elsewhere, put where the message said; ``mpff data
    download`` then verifies their MD5 and unpacks them without the network (the mirror is a missing
    file, so any fetch would fail). The real archives' sums cannot match these: the class gets
    these files' sums."""
    root = tmp_path / "root"
    arrays = write_mnist_like(tmp_path / "made", "FashionMNIST")
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    resources = []
    for name in sorted(os.listdir(tmp_path / "made/FashionMNIST/raw")):
        archive = raw / f"{name}.gz"
        archive.write_bytes(gzip.compress((tmp_path / "made/FashionMNIST/raw" / name).read_bytes()))
        resources.append((archive.name, _md5(archive)))
    monkeypatch.setattr(tvd.FashionMNIST, "resources", resources)
    monkeypatch.setattr(tvd.FashionMNIST, "mirrors", [f"file://{tmp_path}/no-such-mirror/"])
    code, out, err = _data_main(["download", "FashionMNIST", "--path", str(root)], capsys)
    assert code == 0, err
    assert "--set data.dataset=torchvision --set data.name=FashionMNIST" in out
    assert (raw / "train-images-idx3-ubyte").exists()
    ds = _dataset(root, "FashionMNIST")
    assert np.array_equal(ds.y_test, arrays["test"][1])


def test_data_download_usage_errors(capsys, tmp_path):
    code, _, err = _data_main(["download", "Imagenet", "--path", str(tmp_path)], capsys)
    assert code == 2 and "is not a data set mpff reads through torchvision" in err
    code, _, err = _data_main(["download", "EMNIST", "--path", str(tmp_path)], capsys)
    assert code == 2 and "EMNIST needs data.split" in err


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
