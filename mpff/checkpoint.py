"""Checkpoints at chapter boundaries, written per rank, and the state a resumed run starts from.

The state after chapter c is: every layer after ``train(c, k)`` (weights, bias and Adam state),
the head after ``head(c)``, and the adaptive negatives already made for chapters after c.
Each piece is produced by exactly one rank, and that rank writes it when it passes the
boundary (before it starts its first task of a later chapter), together with its *local*
optimizer states (what it would use for a layer it receives with ``exchange = "weights"``).
The arrays are the rank state's own serialisation (``pack``, the same as the messages').
Randomness needs no saving: every shuffle and draw is derived from (seed, chapter, layer, epoch).

Files: ``RUN_DIR/checkpoints/c<N>/rank<r>.h5`` holds the state after N chapters (counted from
1, as everywhere a user looks), each written to a temporary file and renamed, so a crash
mid-write leaves the previous checkpoint intact. A checkpoint is complete when all ranks of
the run that wrote it have their file; ``--resume`` uses the newest complete one. Only the
newest ``keep`` complete checkpoints are kept (:func:`prune`).

Format version 2 (this one): attribute ``chapter`` = chapters done; buffers at
``buffers/<kind>/<index>`` (negatives: ``buffers/neg/<chapter they are used in>``), each with
attributes ``chapter`` (the version, counted from 1) and ``full``. Version 1 (no
``format_version``; directories and chapters counted from 0; negatives under ``negatives/``)
is still read.
"""

from __future__ import annotations

import glob
import os
import re
import shutil

import h5py
import numpy as np

from .config import ConfigError
from .modelfile import atomic_h5
from .plan import Buf

FORMAT = "mpff-checkpoint"
FORMAT_VERSION = 2


def checkpoint_dir(run_dir: str, done: int) -> str:
    """Directory of the checkpoint after ``done`` chapters (format 2 naming)."""
    return os.path.join(run_dir, "checkpoints", f"c{done:05d}")


def _dataset_name(b: Buf) -> str:
    # one version per (kind, index) in a checkpoint, except negatives: one per chapter of use
    return f"buffers/neg/{b.chapter + 1}" if b.kind == "neg" else f"buffers/{b.kind}/{b.index}"


def write_rank_checkpoint(run_dir: str, chapter: int, rank: int, world_size: int, config_json: str,
                          snapshot: dict) -> str:
    """Write this rank's ``snapshot`` (:meth:`FFState.checkpoint`) of the boundary after
    ``chapter`` (0-based) atomically; returns the file's path."""
    path = os.path.join(checkpoint_dir(run_dir, chapter + 1), f"rank{rank:04d}.h5")
    with atomic_h5(path) as f:
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["chapter"] = chapter + 1
        f.attrs["rank"] = rank
        f.attrs["world_size"] = world_size
        f.attrs["config"] = config_json
        for b, (array, full) in snapshot.get("buffers", {}).items():
            ds = f.create_dataset(_dataset_name(b), data=array)
            ds.attrs["chapter"] = b.chapter + 1
            ds.attrs["full"] = full
        for k, array in snapshot.get("local_optimizer", {}).items():
            f.create_dataset(f"local_optimizer/{k}", data=array)
    return path


def _scan(run_dir: str) -> dict[int, tuple[str, int]]:
    """{chapters done: (directory, world size or -1 when unreadable)} of every checkpoint all of
    whose rank files exist (or whose first file is unreadable: reported when loaded)."""
    out = {}
    for d in glob.glob(os.path.join(run_dir, "checkpoints", "c*")):
        m = re.fullmatch(r"c(\d+)", os.path.basename(d))
        files = sorted(glob.glob(os.path.join(d, "rank*.h5")))
        if not m or not files:
            continue
        done = int(m.group(1))
        try:
            with h5py.File(files[0], "r") as f:
                world = int(f.attrs["world_size"])
                if "format_version" not in f.attrs:  # version 1: counted from 0
                    done = int(f.attrs["chapter"]) + 1
        except (OSError, KeyError, ValueError):
            world = -1
        if world < 0 or len(files) == world:
            out[done] = (d, world)
    return out


def complete_checkpoints(run_dir: str) -> list[tuple[int, int]]:
    """(chapters done, world_size) of every complete checkpoint, newest first (world size -1:
    the first rank file is unreadable, which :func:`load_checkpoint` reports)."""
    return sorted(((done, world) for done, (_, world) in _scan(run_dir).items()), reverse=True)


def load_checkpoint(run_dir: str, done: int, rank: int, world_size: int) -> dict:
    """The state after ``done`` chapters for this rank: {"buffers": {Buf: (array, full)},
    "local_optimizer": {layer: array} (own rank, same world size only), "world_size": the size
    of the run that wrote it, "config": its configuration (JSON)}. Buffers of every rank's file
    are read: a rank needs what others produced."""
    d = _scan(run_dir).get(done, (checkpoint_dir(run_dir, done), -1))[0]
    state: dict = {"buffers": {}, "local_optimizer": {}}
    for path in sorted(glob.glob(os.path.join(d, "rank*.h5"))):
        try:
            with h5py.File(path, "r") as f:
                if f.attrs.get("format") != FORMAT:
                    raise OSError("not an mpff checkpoint")
                version = int(f.attrs.get("format_version", 1))
                if version > FORMAT_VERSION:
                    raise OSError(f"format version {version} is newer than this mpff reads")
                old_world = int(f.attrs["world_size"])
                state["world_size"] = old_world
                state["config"] = str(f.attrs["config"])
                state["buffers"].update(_read_buffers(f, version))
                if int(f.attrs["rank"]) == rank and old_world == world_size:
                    for k, ds in f.get("local_optimizer", {}).items():
                        state["local_optimizer"][int(k)] = ds[()]
        except (OSError, KeyError, ValueError) as exc:
            raise ConfigError(f"checkpoint file {path!r} is corrupt or unreadable ({exc}); delete "
                              f"{d!r} to resume from an older checkpoint") from None
    return state


def _read_buffers(f: h5py.File, version: int) -> dict[Buf, tuple[np.ndarray, bool]]:
    shift = 1 if version >= 2 else 0  # stored chapters counted from 1 (v2) or 0 (v1)
    out = {}
    for kind, group in f.get("buffers", {}).items():
        for key, ds in group.items():
            chapter = int(ds.attrs["chapter"]) - shift
            index = -1 if kind == "neg" else int(key)
            out[Buf(kind, index, chapter)] = (ds[()], bool(ds.attrs["full"]))
    for c, ds in f.get("negatives", {}).items():  # version 1
        out[Buf("neg", -1, int(c))] = (ds[()], False)
    return out


def prune(run_dir: str, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` complete checkpoints (and incomplete ones older than
    the newest complete); returns the directories removed. ``keep = 0`` keeps everything."""
    if keep <= 0:
        return []
    scan = _scan(run_dir)
    complete = sorted((done for done, (_, world) in scan.items() if world > 0), reverse=True)
    if len(complete) <= keep:
        return []
    oldest_kept = complete[keep - 1]
    removed = []
    for d in glob.glob(os.path.join(run_dir, "checkpoints", "c*")):
        m = re.fullmatch(r"c(\d+)", os.path.basename(d))
        done = next((k for k, (dd, _) in scan.items() if dd == d), int(m.group(1)) if m else None)
        if done is not None and done < oldest_kept:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed
