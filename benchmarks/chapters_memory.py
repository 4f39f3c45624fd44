"""Peak memory against training-set size: chapters of whole epochs against chapters of K batches
(issue 22, item 2), FF and backprop, one rank.

The training set is MNIST repeated 1x, 2x, 4x and 8x (IDX files written to a scratch folder; the
test set stays MNIST's). Each run trains one epoch of ``--dims`` on it and records, in run.json,
its resident set after the data is loaded (the baseline: the data set itself), its peak, and the
difference (what training added), beside mpff's analytic figure of that difference.

    .venv/bin/python benchmarks/chapters_memory.py                 # about 15 minutes here
    .venv/bin/python benchmarks/chapters_memory.py --repeats 1 2   # a quick look

Writes benchmarks/results/chapters_memory.json. Memory is not timing: the seconds in the JSON are
only there to say how long each run took, not to compare.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import tempfile

import numpy as np
from _common import RESULTS, ROOT, mpff_train

MNIST = os.path.join(ROOT, "mpff", "datasets", "mnist")

#: name -> settings over the common ones
MODES = {
    "ff, chapter = 1 epoch (whole-epoch chapters)": ["train.algorithm=ff", "train.chapters=1"],
    "ff, chapter = 938 batches (1 epoch, streamed)": ["train.algorithm=ff", "train.chapter_batches=938"],
    "ff, chapter = 100 batches": ["train.algorithm=ff", "train.chapter_batches=100"],
    "backprop": ["train.algorithm=backprop", "train.chapters=1"],
}


def _read_idx_gz(path: str) -> tuple[bytes, np.ndarray]:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    header = 4 + 4 * ndim
    return data[:header], np.frombuffer(data, dtype=np.uint8, offset=header)


def write_repeated(folder: str, times: int) -> None:
    """MNIST's IDX files with the training images and labels repeated ``times`` times."""
    os.makedirs(folder, exist_ok=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        header, body = _read_idx_gz(os.path.join(MNIST, name + ".gz"))
        count = int.from_bytes(header[4:8], "big") * times
        with open(os.path.join(folder, name), "wb") as fh:
            fh.write(header[:4] + count.to_bytes(4, "big") + header[8:])
            for _ in range(times):
                fh.write(body.tobytes())
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(os.path.join(MNIST, name), folder)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--dims", default="[784,500,500,500]")
    p.add_argument("--out", default=os.path.join(RESULTS, "chapters_memory.json"))
    args = p.parse_args()
    common = [f"model.dims={args.dims}", "train.epochs=1", "train.eval_every=0", "run.schedule=sequential",
              "data.test_subset=1000", "run.checkpoint_every=0", "run.report=false", "train.threads=1"]
    rows = []
    scratch = tempfile.mkdtemp(prefix="mpff-chapters-memory-")
    try:
        for times in args.repeats:
            data = os.path.join(scratch, f"mnist-x{times}")
            write_repeated(data, times)
            for mode, sets in MODES.items():
                if mode.startswith("backprop"):
                    extra = []
                else:
                    extra = ["train.lr=0.01", "train.negatives=random"]
                run = mpff_train(os.path.join(scratch, "run"), config="workstation",
                                 sets=common + sets + extra + [f"data.path={data}"])
                rank = run["ranks"][0]
                mem, analytic = rank["memory"], rank["memory_analytic"]
                row = {"mode": mode, "repeats": times, "n_train": run["n_train"],
                       "rss_baseline_bytes": mem["rss_baseline_bytes"], "rss_peak_bytes": mem["rss_peak_bytes"],
                       "rss_peak_delta_bytes": mem["rss_peak_delta_bytes"], "analytic_peak_bytes": analytic["peak"],
                       "analytic": analytic, "training_seconds": run["training_seconds"],
                       "test_accuracy": run["test_accuracy"]}
                rows.append(row)
                print(f"{mode:48s} x{times}: baseline {row['rss_baseline_bytes'] / 1e9:.2f} GB, peak "
                      f"{row['rss_peak_bytes'] / 1e9:.2f} GB, delta {row['rss_peak_delta_bytes'] / 1e9:.3f} GB "
                      f"(analytic {row['analytic_peak_bytes'] / 1e9:.3f} GB), {row['training_seconds']:.0f} s",
                      flush=True)
                shutil.rmtree(os.path.join(scratch, "run"), ignore_errors=True)
            shutil.rmtree(data, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = {"benchmark": "chapters_memory", "dims": args.dims, "epochs": 1, "rows": rows,
              "note": "one rank, one thread; RSS from run.json (psutil); seconds are not for comparison"}
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
