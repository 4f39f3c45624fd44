"""Checkpoint files by hand: the round trip of a snapshot, completeness, pruning, format 1."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

from mpff.checkpoint import checkpoint_dir, complete_checkpoints, load_checkpoint, prune, write_rank_checkpoint
from mpff.config import ConfigError
from mpff.plan import Buf


def _snapshot(chapter: int, rank: int) -> dict:
    rng = np.random.default_rng(chapter * 10 + rank)
    return {"buffers": {Buf("layer", rank, chapter): (rng.standard_normal(7).astype(np.float32), True),
                        Buf("neg", -1, chapter + 2): (rng.integers(0, 10, 5).astype(np.int64), False)},
            "local_optimizer": {rank: rng.standard_normal(3).astype(np.float32)}}


def _write(run_dir, chapter, world=2, ranks=None):
    for r in (range(world) if ranks is None else ranks):
        write_rank_checkpoint(str(run_dir), chapter, r, world, '{"x": 1}', _snapshot(chapter, r))


def test_a_snapshot_comes_back_as_written(tmp_path):
    _write(tmp_path, 2)
    assert complete_checkpoints(str(tmp_path)) == [(3, 2)]  # after 3 chapters, counted from 1
    assert os.path.isdir(checkpoint_dir(str(tmp_path), 3))
    state = load_checkpoint(str(tmp_path), 3, 1, 2)
    want = {**_snapshot(2, 0)["buffers"], **_snapshot(2, 1)["buffers"]}
    assert sorted(state["buffers"]) == sorted(want)  # every rank's buffers, chapters 0-based again
    for b, (array, full) in want.items():
        got, got_full = state["buffers"][b]
        assert np.array_equal(got, array) and got.dtype == array.dtype and got_full == full
    assert list(state["local_optimizer"]) == [1]  # its own rank's, same world size only
    assert load_checkpoint(str(tmp_path), 3, 1, 3)["local_optimizer"] == {}
    assert state["world_size"] == 2 and state["config"] == '{"x": 1}'


def test_only_complete_checkpoints_count_and_prune_keeps_the_newest(tmp_path):
    for c in range(4):
        _write(tmp_path, c)
    _write(tmp_path, 4, ranks=[0])  # rank 1 has not written the newest yet
    assert [d for d, _ in complete_checkpoints(str(tmp_path))] == [4, 3, 2, 1]
    removed = prune(str(tmp_path), keep=2)
    assert sorted(os.path.basename(d) for d in removed) == ["c00001", "c00002"]
    assert [d for d, _ in complete_checkpoints(str(tmp_path))] == [4, 3]
    assert os.path.isdir(checkpoint_dir(str(tmp_path), 5))  # the incomplete newest stays
    assert prune(str(tmp_path), keep=0) == []               # 0 keeps everything


def test_format_1_is_still_read(tmp_path):
    """Format 1 counted chapters from 0 in directory names and attributes and kept negatives
    under negatives/<chapter>."""
    d = tmp_path / "checkpoints" / "c00001"
    d.mkdir(parents=True)
    with h5py.File(d / "rank0000.h5", "w") as f:
        f.attrs.update({"format": "mpff-checkpoint", "chapter": 1, "rank": 0, "world_size": 1, "config": "{}"})
        ds = f.create_dataset("buffers/layer/0", data=np.arange(4, dtype=np.float32))
        ds.attrs["chapter"], ds.attrs["full"] = 1, True
        f.create_dataset("negatives/3", data=np.arange(5, dtype=np.int64))
    assert complete_checkpoints(str(tmp_path)) == [(2, 1)]
    state = load_checkpoint(str(tmp_path), 2, 0, 1)
    assert sorted(state["buffers"]) == [Buf("layer", 0, 1), Buf("neg", -1, 3)]


def test_a_newer_format_is_refused_by_name(tmp_path):
    _write(tmp_path, 0, world=1)
    path = os.path.join(checkpoint_dir(str(tmp_path), 1), "rank0000.h5")
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(ConfigError, match="format version 99 is newer than this mpff reads"):
        load_checkpoint(str(tmp_path), 1, 0, 1)
