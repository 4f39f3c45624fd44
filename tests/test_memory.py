"""mpff.memory: the analytic figures worked out by hand for small networks, and the measured
figures seeing what a process allocates after its baseline (not what it held before)."""

from __future__ import annotations

import mmap

import pytest

from mpff import memory
from mpff.config import from_dict

F32 = 4


def test_backprop_breakdown_by_hand():
    # MLP 6 -> 4 -> 10: parameters 6*4+4 + 4*10+10 = 78; 3 rows
    a = memory.bp_analytic([6, 4], rows=3)
    assert a["parameters"] == 78 * F32
    assert a["optimizer_state"] == 2 * 78 * F32
    assert a["gradients"] == 78 * F32
    assert a["activations"] == 3 * (6 + 4 + 10) * F32  # batch input, ReLU output, log-softmax
    # values besides parameters and Adam, step by step: input 18; forward layer 1: +z,h (24) -> 42,
    # keep h -> 30; output: +logits, log-softmax (60) -> 90, keep -> 60; backward output layer:
    # log-softmax freed (30), gradient 50 + grad_out 30 + grad_in 12 = 122; ReLU: 30 + 50 + 12 + 12
    # = 104; first layer: h freed (18) + all gradients 78 + its grad_out 12 = 108. Peak: 122.
    assert a["peak"] == (78 + 2 * 78 + 122) * F32
    # data-parallel: gradients stay in DDP's buckets all the time (parameters, Adam, gradients:
    # 4 x 78); the rest peaks at the end of the forward pass (90): backward's is 30 + 30 + 12 = 72
    d = memory.bp_analytic([6, 4], rows=3, ddp=True)
    assert d["peak"] == (4 * 78 + 90) * F32


def test_backprop_peak_is_activations_or_gradients():
    """Wide batch: activations set the peak; small batch: the gradients do (mpff frees them
    before the forward pass, so the two never add up)."""
    dims = [784, 1000, 1000, 1000]
    big, small = memory.bp_analytic(dims, 4096), memory.bp_analytic(dims, 1)
    state = big["parameters"] + big["optimizer_state"]
    assert big["peak"] - state > big["activations"] > big["gradients"]
    assert small["peak"] - state == pytest.approx(small["gradients"] + 784 * F32, rel=1e-3)


def test_ff_breakdown_by_hand():
    # FF 6 -> 4 -> 3, batch 2 (4 rows: positives and negatives); head 10 * 3 (layers 2..L)
    a = memory.ff_analytic([6, 4, 3], batch_size=2)
    p0, p1, head = 6 * 4 + 4, 4 * 3 + 3, 30
    assert a["parameters"] == (p0 + p1 + head) * F32
    assert a["optimizer_state"] == 2 * (p0 + p1) * F32  # the goodness classifier trains no head
    assert a["gradients"] == p0 * F32 and a["gradients_resident"] == (p0 + p1) * F32
    assert a["activations"] == 4 * max(6 + 4, 4 + 3) * F32  # one layer's input and ReLU output
    step = [4 * 6 + 3 * 4 * 4, 4 * 4 + 3 * 4 * 3]  # the batch buffer; h, the last step's h, h**2
    assert a["peak"] == (p0 + p1 + head + 2 * (p0 + p1) + (p0 + p1) + max(step)) * F32
    assert a["chapter_data"] == 0
    with_head = memory.ff_analytic([6, 4, 3], batch_size=2, softmax=True)
    assert with_head["optimizer_state"] == 2 * (p0 + p1 + head) * F32


def test_ff_chapter_data_by_hand():
    # 100 samples: x, x_pos, x_neg (3 * 100 * 6) and, for layer 1, its inputs for positives and
    # negatives and their normalised copies (4 * 100 * 4); layer 0's copies are 2 * 100 * 6
    a = memory.ff_analytic([6, 4, 3], batch_size=2, n_rows=100)
    assert a["chapter_data"] == max(3 * 600 + 2 * 600, 3 * 600 + 4 * 400) * F32
    only_layer1 = memory.ff_analytic([6, 4, 3], batch_size=2, n_rows=100, trained_layers=[1])
    assert only_layer1["chapter_data"] == (3 * 600 + 4 * 400) * F32


def test_analytic_of_a_run():
    bp = from_dict({"model": {"dims": [784, 50, 50]}, "train": {"algorithm": "backprop", "batch_size": 64},
                    "run": {"schedule": "data_parallel"}})
    a = memory.analytic(bp, n_train=1000, world_size=3)
    assert a["algorithm"] == "backprop" and a["rows_per_update"] == 22  # 64 over 3 ranks: 22, 21, 21
    assert a == {"algorithm": "backprop", "rows_per_update": 22, **memory.bp_analytic([784, 50, 50], 22, ddp=True)}
    weak = bp.replace(run={"scaling": "weak"})
    assert memory.analytic(weak, 1000, 3)["rows_per_update"] == 64
    ff = from_dict({"model": {"dims": [784, 50, 40, 30]}, "run": {"schedule": "single_layer", "blocks": "count"}})
    single = memory.analytic(ff, n_train=1000, world_size=2)
    assert single["algorithm"] == "ff" and single["chapter_rows"] == 1000
    # two ranks, blocks [0, 1] and [2]: the larger block holds layers 0 and 1
    assert single == {"algorithm": "ff", "chapter_rows": 1000,
                      **memory.ff_analytic([784, 50, 40, 30], 64, 1000, trained_layers=[0, 1])}
    federated = memory.analytic(ff.replace(run={"schedule": "federated"}), n_train=1000, world_size=3)
    assert federated["chapter_rows"] == 334


def touched(mib: int) -> mmap.mmap:
    """``mib`` MiB of resident memory of its own mapping (not malloc's, which may reuse memory
    it kept from earlier frees), every page written."""
    block = mmap.mmap(-1, mib * 2**20)
    for offset in range(0, len(block), 4096):
        block[offset] = 1
    return block


def test_measured_peak_counts_from_the_baseline():
    before = touched(48)  # 48 MiB resident before the baseline, then handed back
    before.close()
    base = memory.start("cpu")
    block = touched(24)  # 24 MiB touched after it
    got = memory.finish(base, "cpu")
    block.close()
    assert set(got) == {"rss_baseline_bytes", "rss_peak_bytes", "rss_peak_delta_bytes", "rss_peak_since"}
    assert got["rss_peak_bytes"] == got["rss_baseline_bytes"] + got["rss_peak_delta_bytes"]
    assert got["rss_peak_delta_bytes"] >= 23 * 2**20
    if got["rss_peak_since"] == "baseline":  # Linux: the 48 MiB before the baseline do not count
        assert got["rss_peak_delta_bytes"] < 40 * 2**20
    assert memory.peak_rss_bytes() >= memory.rss_bytes() > 0
