"""The CUDA path: training on a GPU, its precisions, bit-identity across schedules there, CUDA peak
memory in run.json, and data-parallel backprop over NCCL. Every case skips without a CUDA GPU
(select them with ``-m cuda``; the device tool runs them where a GPU is lent)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from synthetic import synthetic_dataset

from mpff.config import Config
from mpff.model import FFNet
from mpff.modelfile import weights_of
from mpff.train import train_local

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda", 0)
TINY = ("model.dims=[784,16,16,16]", "train.epochs=4", "train.chapters=4", "train.threads=1",
        "train.seed=3", "data.train_subset=2000", "data.test_subset=500", "run.exchange=full",
        "train.negatives=random", "run.device=cuda")


def _dataset():
    return synthetic_dataset(n_train=512, n_test=128)


def _cfg(**train) -> Config:
    return Config().replace(model={"dims": (784, 32, 32)},
                            train={"epochs": 2, "chapters": 2, "negatives": "random", "batch_size": 32, **train})


def _params(state) -> list[torch.Tensor]:
    return [p.detach().float().cpu() for p in state.net.layers.parameters()]


def test_training_on_the_gpu_is_deterministic_and_follows_the_cpu():
    cpu = _params(train_local(_cfg(), _dataset()))
    gpu = train_local(_cfg(), _dataset(), device=CUDA)
    assert all(p.device.type == CUDA.type for p in gpu.net.parameters())
    again = _params(train_local(_cfg(), _dataset(), device=CUDA))
    gpu = _params(gpu)
    assert all(torch.equal(a, b) for a, b in zip(gpu, again))  # same device, same bits
    init = [p.detach() for p in FFNet.from_config(_cfg()).layers.parameters()]
    for p0, c, g in zip(init, cpu, gpu):
        # other kernels, other rounding: the same training to within a fraction of how far it moved
        assert float((c - g).norm()) < 0.5 * float((c - p0).norm())


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_lower_precision_products_keep_fp32_state(precision):
    fp32 = _params(train_local(_cfg(), _dataset(), device=CUDA))
    low = train_local(_cfg(precision=precision), _dataset(), device=CUDA)
    assert all(p.dtype == torch.float32 for p in low.net.parameters())
    assert all(st["exp_avg"].dtype == torch.float32 for opt in low.opts for st in opt.state.values())
    assert not all(torch.equal(a, b) for a, b in zip(fp32, _params(low)))  # the products were not fp32


def test_bf16_products_on_the_gpu_are_bf16_not_tf32():
    """torch's matmul precision "medium" is TF32 on CUDA; mpff's bf16 multiplies bf16-rounded
    inputs into fp32 sums instead (cuBLAS), as on the CPU. Checked against the exact product of
    the rounded inputs, and against tf32 training."""
    from mpff.ff import BF16Products, cuda_bf16_products, linear, matmul_precision
    assert cuda_bf16_products(CUDA) is None
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(256, 784, generator=g), torch.randn(500, 784, generator=g), torch.randn(500, generator=g)
    r = lambda t: t.to(torch.bfloat16).double()  # noqa: E731
    want = (r(x) @ r(w).T + b.double()).float()
    with matmul_precision("bf16", CUDA):
        y = linear(x.to(CUDA), w.to(CUDA), b.to(CUDA)).cpu()
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-4)  # fp32 sums of exact bf16 products
    xg, wg = x.to(CUDA).requires_grad_(), w.to(CUDA).requires_grad_()
    grad = torch.randn(256, 500, generator=g)
    BF16Products.apply(xg, wg, None).backward(grad.to(CUDA))
    torch.testing.assert_close(wg.grad.cpu(), (r(grad).T @ r(x)).float(), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(xg.grad.cpu(), (r(grad) @ r(w)).float(), rtol=1e-5, atol=1e-3)
    tf32 = _params(train_local(_cfg(precision="tf32"), _dataset(), device=CUDA))
    bf16 = _params(train_local(_cfg(precision="bf16"), _dataset(), device=CUDA))
    assert not any(torch.equal(a, b) for a, b in zip(tf32, bf16))


@pytest.mark.mpi
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_schedules_are_bit_identical_on_the_gpu(precision, tmp_path, mpff_run, mpff_tiny_args):
    """Two ranks share the GPU (round robin over one device): Single Layer and All Layers give
    Sequential's weights bit for bit, as on the CPU; run.json has the CUDA peak memory."""
    common = TINY + (f"train.precision={precision}",)
    ref = tmp_path / "seq"
    mpff_run(mpff_tiny_args(ref, *common, "run.schedule=sequential"), check=True)
    want = weights_of(str(ref / "model.h5"))
    for schedule in ("single_layer", "all_layers"):
        out = tmp_path / schedule
        mpff_run(mpff_tiny_args(out, *common, f"run.schedule={schedule}"), ranks=2, check=True)
        got = weights_of(str(out / "model.h5"))
        assert [k for k in sorted(want) if not np.array_equal(got[k], want[k])] == [], schedule
    info = json.loads((ref / "run.json").read_text())
    assert info["status"] == "finished"
    rank = info["ranks"][0]
    assert rank["device"].startswith("cuda")
    assert rank["memory"]["cuda_peak_bytes"] >= rank["memory"]["cuda_baseline_bytes"] > 0


@pytest.mark.mpi
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs a GPU per rank")
def test_data_parallel_backprop_over_nccl(tmp_path, mpff_run, mpff_tiny_args):
    """Backprop, the same global batch on 1 rank and on 2 (DDP over NCCL): the same training up
    to float summation order, as tests/test_backprop_cli.py checks over gloo."""
    common = ("model.dims=[784,64,64]", "data.train_subset=1200", "data.test_subset=300", "train.epochs=4",
              "train.chapters=4", "run.report=false", "run.device=cuda")
    seq, dp = tmp_path / "seq", tmp_path / "dp"
    mpff_run(mpff_tiny_args(seq, *common, config="configs/backprop.toml", tiny=False), check=True)
    mpff_run(mpff_tiny_args(dp, *common, "run.schedule=data_parallel", config="configs/backprop.toml",
                            tiny=False), ranks=2, check=True)
    a, b = weights_of(str(seq / "model.h5")), weights_of(str(dp / "model.h5"))
    assert sorted(a) == sorted(b)
    for k in a:
        if k.startswith("layers/"):
            np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-4, err_msg=k)
