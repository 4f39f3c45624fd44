"""Configuration: defaults, validation messages, --set parsing, and the CLI's handling of bad input
(one stderr line, exit code 2) and of existing run directories."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

from mpff.config import Config, ConfigError, from_dict, load, parse_override

# ------------------------------------------------------------------------------ defaults


def test_defaults_are_the_papers_settings():
    cfg = load(None)
    assert cfg.model.dims == (784, 2000, 2000, 2000, 2000)
    assert cfg.model.threshold_coeff == 0.01 and cfg.model.goodness == "mean"
    assert cfg.model.norm_eps == 1e-4
    assert cfg.model.label_position == "last" and cfg.model.neutral_value == 0.1
    t = cfg.train
    assert (t.epochs, t.chapters, t.batch_size, t.lr, t.head_lr) == (100, 100, 64, 0.01, 1e-4)
    assert cfg.run.schedule == "sequential" and cfg.run.exchange == "weights"
    assert cfg.data.dataset == "mnist"


def test_presets_load():
    for name in ("tiny", "workstation", "paper"):
        cfg = load(f"configs/{name}.toml")
        assert cfg.name == name
    tiny = load("configs/tiny.toml")
    assert tiny.model.dims == (784, 256, 256, 256) and tiny.train.epochs_per_chapter == 1


def test_toml_round_trip(tmp_path):
    cfg = load("configs/tiny.toml", ["run.schedule=all_layers", "train.lr=0.5", "model.dims=[784,7,9]",
                                     "run.trace=false", "data.train_subset=17"])
    path = tmp_path / "again.toml"
    path.write_text(cfg.to_toml())
    again = load(str(path))
    assert again.to_dict() == {**cfg.to_dict(), "name": "tiny"}
    assert json.loads(cfg.to_json()) == cfg.to_dict()


# ------------------------------------------------------------------------------ validation

@pytest.mark.parametrize("data, message", [
    ({"train": {"epoch": 4}}, "unknown config key train.epoch; known keys: epochs, chapters"),
    ({"foo": {"a": 1}}, "unknown config section [foo]; known sections: model, train, data, run"),
    ({"train": 5}, "[train] must be a table of settings"),
    ({"train": {"epochs": "four"}}, "train.epochs must be an integer, not 'four'"),
    ({"train": {"epochs": 4.5}}, "train.epochs must be an integer, not 4.5"),
    ({"train": {"epochs": 4.0}}, "train.epochs must be an integer, not 4.0"),
    ({"train": {"epochs": True}}, "train.epochs must be an integer, not True"),
    ({"train": {"lr": "fast"}}, "train.lr must be a number, not 'fast'"),
    ({"run": {"trace": 1}}, "run.trace must be true or false, not 1"),
    ({"run": {"schedule": 3}}, "run.schedule must be a string, not 3"),
    ({"model": {"dims": ["784", "16"]}}, "model.dims must be a list of integers, not ['784', '16']"),
    ({"model": {"dims": [784, 16.5]}}, "model.dims must be a list of integers"),
    ({"model": {"dims": 784}}, "model.dims must be a list of integers"),
    ({"model": {"dims": [784]}}, "model.dims needs an input size and at least one positive layer width"),
    ({"model": {"dims": [784, 0]}}, "model.dims needs an input size and at least one positive layer width"),
    ({"model": {"dims": [100, 10]}}, "MNIST has 784 inputs: set model.dims[0] = 784"),
    ({"train": {"epochs": 10, "chapters": 3}},
     "train.epochs (10) must be divisible by train.chapters (3); choose chapters that divide the epochs"),
    ({"train": {"chapters": 0}}, "train.chapters must be at least 1"),
    ({"data": {"dataset": "idx"}}, "data.path must name the idx data to read"),
    ({"data": {"dataset": "cifar10"}}, "data.path must name the cifar10 data to read"),
    ({"run": {"schedule": "pipeline"}},
     "run.schedule = 'pipeline' is not one of sequential, single_layer, all_layers, federated"),
    ({"train": {"negatives": "hard"}}, "train.negatives = 'hard' is not one of fixed, random, adaptive"),
    ({"train": {"classifier": "knn"}}, "train.classifier = 'knn' is not one of goodness, softmax"),
    ({"model": {"label_position": "middle"}}, "model.label_position = 'middle' is not one of last, first"),
    ({"run": {"exchange": "all"}}, "run.exchange = 'all' is not one of weights, full"),
    ({"train": {"adaptive_lag": -1}}, "train.adaptive_lag must be >= 0"),
])
def test_validation_messages(data, message):
    with pytest.raises(ConfigError) as info:
        from_dict(data)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_a_missing_data_path_is_reported_where_the_data_is_opened():
    """Validation checks values only (a config naming data that is not here is still a config);
    the data reader says the path does not exist, as one line."""
    from mpff.data import load_dataset
    cfg = from_dict({"data": {"dataset": "idx", "path": "/nonexistent/mpff"}})
    with pytest.raises(ConfigError) as info:
        load_dataset(cfg.data)
    assert "data.path '/nonexistent/mpff' does not exist; point it at the data set" in str(info.value)
    assert "\n" not in str(info.value)


def test_ints_widen_to_floats():
    cfg = from_dict({"train": {"lr": 1}, "model": {"threshold_coeff": 2}})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert isinstance(cfg.model.threshold_coeff, float)


def test_config_is_frozen_and_replace_validates():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 3  # type: ignore[misc]
    with pytest.raises(ConfigError, match="divisible"):
        cfg.replace(train={"epochs": 7})
    assert cfg.replace(train={"epochs": 7, "chapters": 7}).train.epochs_per_chapter == 1


def test_resolved_shards():
    assert Config().resolved_shards(4) == 1
    assert Config().replace(run={"schedule": "federated"}).resolved_shards(4) == 4
    assert Config().replace(run={"schedule": "sequential"}, data={"shards": 3}).resolved_shards(1) == 3


# ------------------------------------------------------------------------------ --set

@pytest.mark.parametrize("text, expected", [
    ("run.schedule=single_layer", ("run", "schedule", "single_layer")),     # a bare word
    ('run.schedule="all_layers"', ("run", "schedule", "all_layers")),      # a TOML string
    ("train.epochs=4", ("train", "epochs", 4)),
    ("train.epochs = 8", ("train", "epochs", 8)),
    ("train.lr=1e-3", ("train", "lr", 0.001)),
    ("train.lr=0.25", ("train", "lr", 0.25)),
    ("train.seed=-3", ("train", "seed", -3)),
    ("model.dims=[784, 16,16]", ("model", "dims", [784, 16, 16])),
    ("model.dims=[784,16,16,16]", ("model", "dims", [784, 16, 16, 16])),
    ("run.trace=false", ("run", "trace", False)),
    ("run.report=true", ("run", "report", True)),
    ("data.path=/tmp/some dir/x=y", ("data", "path", "/tmp/some dir/x=y")),
])
def test_parse_override(text, expected):
    section, key, value = parse_override(text)
    assert (section, key, value) == expected
    assert type(value) is type(expected[2])


@pytest.mark.parametrize("text", ["epochs=4", "train.epochs", "=4", "train_epochs=4"])
def test_parse_override_rejects_malformed(text):
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        parse_override(text)


@pytest.mark.parametrize("text, what", [
    ("train.epochs=4\ntrain.lr=0.1", "holds a line break"),      # TOML kept 4 and dropped the rest
    ("train.epochs=4\r\n", "holds a line break"),
    ('data.path="a\nb"', "holds a line break"),
    ("data.path=a\x00b", "holds the control character '\\x00'"),
    ("data.path=x\x7f", "holds the control character '\\x7f'"),
    ("data.path=\udcff", "holds bytes that are not UTF-8 text"),   # argv bytes Python could not decode
])
def test_a_set_value_config_toml_cannot_hold_is_refused(text, what):
    with pytest.raises(ConfigError) as info:
        parse_override(text)
    assert what in str(info.value) and "which config.toml cannot hold" in str(info.value), info.value


def test_overrides_apply_in_order_over_the_preset():
    cfg = load("configs/tiny.toml", ["train.epochs=8", "train.chapters=2", "train.epochs=6",
                                     "run.schedule=federated", "model.dims=[784,5,5]"])
    assert cfg.train.epochs == 6 and cfg.train.chapters == 2 and cfg.train.epochs_per_chapter == 3
    assert cfg.run.schedule == "federated" and cfg.model.dims == (784, 5, 5)
    assert cfg.data.train_subset == 10000  # from the preset


def test_load_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file .* not found; give a TOML file or a preset name"):
        load(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nepochs = 4\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load(str(bad))
    with pytest.raises(ConfigError, match="must be an integer, not 'four'"):
        load(None, ["train.epochs=four"])
    with pytest.raises(ConfigError, match=r"unknown config section \[trian\]"):
        load(None, ["trian.epochs=4"])


# ------------------------------------------------------------------------------ the CLI

BAD_CLI = {
    "unknown_key": (["--set", "train.epoch=4"], "unknown config key train.epoch"),
    "unknown_section": (["--set", "foo.bar=1"], "unknown config section [foo]"),
    "string_for_int": (["--set", "train.epochs=four"], "train.epochs must be an integer, not 'four'"),
    "float_for_int": (["--set", "train.epochs=4.5"], "train.epochs must be an integer, not 4.5"),
    "strings_for_dims": (["--set", 'model.dims=["784","16"]'], "model.dims must be a list of integers"),
    "not_divisible": (["--set", "train.epochs=10", "--set", "train.chapters=3"],
                      "train.epochs (10) must be divisible by train.chapters (3)"),
    "missing_path": (["--set", "data.dataset=idx"], "data.path must name the idx data to read"),
    "bad_schedule": (["--set", "run.schedule=pipeline"], "run.schedule = 'pipeline' is not one of"),
    "malformed_set": (["--set", "epochs=4"], "must look like section.key=value"),
    "subset_too_large": (["--set", "data.train_subset=70000"], "data.train_subset = 70000 exceeds"),
    "federated_shards": (["--set", "run.schedule=federated", "--set", "data.shards=3"],
                         "federated needs one data shard per rank"),
}


@pytest.fixture(scope="module")
def bad_cli_results(tmp_path_factory, mpff_run, mpff_tiny_args):
    """Every bad-input case through ``python -m mpff train``, a few processes at a time."""
    base = tmp_path_factory.mktemp("bad-cli")

    def one(name):
        extra, _ = BAD_CLI[name]
        args = mpff_tiny_args(base / name, force=False) + extra
        return name, mpff_run(args, timeout=600), base / name

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict((name, (proc, out)) for name, proc, out in pool.map(one, BAD_CLI))


@pytest.mark.parametrize("name", list(BAD_CLI))
def test_cli_bad_input_one_line_exit_2(name, bad_cli_results):
    proc, out = bad_cli_results[name]
    _, message = BAD_CLI[name]
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("mpff train: error: ")
    assert message in lines[0]
    assert proc.stdout == ""
    assert not out.exists()  # nothing was created


def _tree_hashes(root) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            path = os.path.join(dirpath, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def test_finished_run_is_not_overwritten_without_force(tiny_run, mpff_run, mpff_tiny_args):
    before = _tree_hashes(tiny_run)
    assert "model.h5" in before and "run.json" in before
    proc = mpff_run(mpff_tiny_args(tiny_run, "train.negatives=fixed", "train.classifier=softmax",
                                   force=False))
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mpff train: error: ")
    assert "already holds a finished run; pass --force" in lines[0]
    assert _tree_hashes(tiny_run) == before


def test_out_that_is_a_file_is_an_error(tmp_path, mpff_run, mpff_tiny_args):
    path = tmp_path / "afile"
    path.write_text("x")
    proc = mpff_run(mpff_tiny_args(path, force=False))
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"mpff train: error: --out {str(path)!r} is a file, not a directory; choose another --out"]
    assert path.read_text() == "x"


@pytest.fixture(scope="module")
def forced_run(tiny_run, tmp_path_factory, mpff_run, mpff_tiny_args):
    """A copy of the finished tiny run, with stale files from an older run, rerun with --force."""
    out = tmp_path_factory.mktemp("forced") / "run"
    shutil.copytree(tiny_run, out)
    (out / "failure-rank1.txt").write_text("an old failure\n")
    (out / "trace" / "rank0007.h5").write_text("stale")
    before = _tree_hashes(out)
    proc = mpff_run(mpff_tiny_args(out, "train.negatives=random", "train.seed=5"))
    return out, proc, before


def test_force_replaces_a_finished_run(forced_run):
    out, proc, before = forced_run
    assert proc.returncode == 0, proc.stderr
    status = json.loads((out / "run.json").read_text())
    assert status["status"] == "finished"
    assert status["config"]["train"]["seed"] == 5
    after = _tree_hashes(out)
    assert after["model.h5"] != before["model.h5"]
    assert "trace/rank0007.h5" not in after  # the old traces went with the old run
    assert load(str(out / "config.toml")).train.seed == 5


def test_force_removes_old_failure_notes(forced_run):
    out, proc, _ = forced_run
    assert proc.returncode == 0
    assert not (out / "failure-rank1.txt").exists()


def test_switching_the_algorithm_sets_aside_the_files_settings_of_the_other():
    """An FF preset run as backprop (and back): the file's settings of the algorithm left behind
    are dropped with one note naming them; defaults and shared settings stay."""
    notes: list[str] = []
    cfg = load("workstation", ["train.algorithm=backprop"], notes)
    assert cfg.train.algorithm == "backprop" and cfg.run.schedule == "sequential"
    assert cfg.model.dims == (784, 500, 500) and cfg.train.epochs == 12   # shared: kept
    assert len(notes) == 1 and "train.negatives" in notes[0] and "run.schedule" in notes[0], notes
    assert "train.lr" not in notes[0]   # the preset's lr is the default: nothing to set aside
    assert "run.schedule=data_parallel" in notes[0]

    notes = []
    cfg = load("backprop", ["train.algorithm=ff", "run.scaling=strong"], notes)
    assert cfg.train.algorithm == "ff" and notes == []   # the preset's bp settings are defaults


def test_set_aside_happens_only_for_a_switch_from_the_file(tmp_path):
    """The other algorithm's settings given with --set, or mixed in one file, are still refused."""
    with pytest.raises(ConfigError, match="train.negatives = 'fixed' is a Forward-Forward setting"):
        load("workstation", ["train.algorithm=backprop", "train.negatives=fixed"], [])
    with pytest.raises(ConfigError, match="run.schedule = 'all_layers' is a Forward-Forward schedule"):
        load("workstation", ["train.algorithm=backprop", "run.schedule=all_layers"], [])
    mixed = tmp_path / "mixed.toml"
    mixed.write_text('[train]\nalgorithm = "backprop"\nnegatives = "fixed"\n')
    with pytest.raises(ConfigError, match="train.negatives = 'fixed' is a Forward-Forward setting"):
        load(str(mixed), [], [])
    bp = tmp_path / "bp.toml"
    bp.write_text('[train]\nalgorithm = "backprop"\nbp_lr = 0.003\n[run]\nschedule = "data_parallel"\n'
                  'scaling = "weak"\n')
    notes: list[str] = []
    cfg = load(str(bp), ["train.algorithm=ff"], notes)
    assert (cfg.train.bp_lr, cfg.run.schedule, cfg.run.scaling) == (1e-3, "sequential", "strong")
    assert len(notes) == 1 and all(k in notes[0] for k in ("train.bp_lr", "run.schedule", "run.scaling"))
    with pytest.raises(ConfigError, match="run.scaling = 'weak' is a backprop setting"):
        load(str(bp), ["train.algorithm=ff", "run.scaling=weak"], [])
