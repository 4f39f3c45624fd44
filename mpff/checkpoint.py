"""Checkpoints at chapter boundaries, written per rank, and the state a resumed run starts from.

The state after chapter c is: every layer after ``train(c, k)`` (weights, bias and Adam state),
the head after ``head(c)``, and the adaptive negatives already made for chapters after c.
Each piece is produced by exactly one rank, and that rank writes it when it passes the
boundary c (before it starts its first task of a later chapter), together with its *local*
optimizer states (what it would use for a layer it receives with ``exchange = "weights"``).
Randomness needs no saving: every shuffle and draw is derived from (seed, chapter, layer, epoch).

Files: ``RUN_DIR/checkpoints/c<chapter>/rank<r>.h5``, each written to a temporary file and
renamed, so a crash mid-write leaves the previous checkpoint intact. A checkpoint is complete
when all ranks of the run that wrote it have their file; ``--resume`` uses the newest complete one.
"""

from __future__ import annotations

import glob
import os
import re

import h5py
import numpy as np

from .config import ConfigError
from .modelfile import atomic_h5
from .plan import Buf

FORMAT = "mpff-checkpoint"


def checkpoint_dir(run_dir: str, chapter: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"c{chapter:05d}")


def write_rank_checkpoint(run_dir: str, chapter: int, rank: int, world_size: int, config_json: str,
                          buffers: dict[Buf, tuple[np.ndarray, bool]], negatives: dict[int, np.ndarray],
                          local_opt: dict[int, np.ndarray]) -> str:
    path = os.path.join(checkpoint_dir(run_dir, chapter), f"rank{rank:04d}.h5")
    with atomic_h5(path) as f:
        f.attrs["format"] = FORMAT
        f.attrs["chapter"] = chapter
        f.attrs["rank"] = rank
        f.attrs["world_size"] = world_size
        f.attrs["config"] = config_json
        for b, (array, full) in buffers.items():
            ds = f.create_dataset(f"buffers/{b.kind}/{b.index}", data=array)
            ds.attrs["chapter"] = b.chapter
            ds.attrs["full"] = full
        for c, labels in negatives.items():
            f.create_dataset(f"negatives/{c}", data=labels)
        for k, array in local_opt.items():
            f.create_dataset(f"local_optimizer/{k}", data=array)
    return path


def complete_checkpoints(run_dir: str) -> list[tuple[int, int]]:
    """(chapter, world_size) of every checkpoint all of whose rank files exist, newest first."""
    out = []
    for d in glob.glob(os.path.join(run_dir, "checkpoints", "c*")):
        m = re.fullmatch(r"c(\d+)", os.path.basename(d))
        files = sorted(glob.glob(os.path.join(d, "rank*.h5")))
        if not m or not files:
            continue
        try:
            with h5py.File(files[0], "r") as f:
                world = int(f.attrs["world_size"])
        except (OSError, KeyError):
            world = -1
        if world > 0 and len(files) == world:
            out.append((int(m.group(1)), world))
        elif world < 0:
            out.append((int(m.group(1)), -1))  # corrupt: reported by load_checkpoint
    return sorted(out, reverse=True)


def load_checkpoint(run_dir: str, chapter: int, rank: int, world_size: int) -> dict:
    """The state after ``chapter`` for this rank: {"buffers": {Buf: (array, full)},
    "negatives": {chapter: labels}, "local_optimizer": {layer: array} (own rank, same size only),
    "world_size": the size of the run that wrote it}."""
    d = checkpoint_dir(run_dir, chapter)
    state: dict = {"buffers": {}, "negatives": {}, "local_optimizer": {}}
    files = sorted(glob.glob(os.path.join(d, "rank*.h5")))
    for path in files:
        try:
            with h5py.File(path, "r") as f:
                if f.attrs.get("format") != FORMAT:
                    raise OSError("not an mpff checkpoint")
                old_world = int(f.attrs["world_size"])
                state["world_size"] = old_world
                state["config"] = str(f.attrs["config"])
                for kind in f.get("buffers", {}):
                    for index, ds in f["buffers"][kind].items():
                        b = Buf(kind, int(index), int(ds.attrs["chapter"]))
                        state["buffers"][b] = (ds[()], bool(ds.attrs["full"]))
                for c, ds in f.get("negatives", {}).items():
                    state["negatives"][int(c)] = ds[()]
                if int(f.attrs["rank"]) == rank and old_world == world_size:
                    for k, ds in f.get("local_optimizer", {}).items():
                        state["local_optimizer"][int(k)] = ds[()]
        except (OSError, KeyError, ValueError) as exc:
            raise ConfigError(f"checkpoint file {path!r} is corrupt or unreadable ({exc}); delete "
                              f"{d!r} to resume from an older checkpoint") from None
    return state
