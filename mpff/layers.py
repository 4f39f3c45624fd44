"""FF layer kinds: what a layer of each kind holds and how it is built, stated once.

A :class:`LayerSpec` answers, for a layer from ``d_in`` to ``d_out`` units, its parameter tensors
in the order the module's ``parameters()`` yields them (names, shapes, dtype): the layout of its
buffer in messages, checkpoints and the model file (:meth:`mpff.plan.Plan.buffer_spec`,
:mod:`mpff.memory`, :mod:`mpff.modelfile`, the predictors), its parameter count, the
multiply-adds of one sample's forward pass (Single Layer's cost balance), and the torch module
(:meth:`build`, which imports torch only when called). ``model.layer`` names the kind; "linear"
(:class:`mpff.ff.FFLayer`: normalise, ``x @ weight.T + bias``, ReLU) is the built-in.

The softmax head (bias-free, classes x the classifier layers' widths) and backprop's MLP are
sized here too (:func:`head_tensors`, :func:`mlp_parameters`).

A new kind registers from any module before the configuration naming it is built::

    from mpff import layers
    layers.register(MyKind())          # MyKind(LayerSpec) with name = "mine"
    # then --set model.layer=mine

Its module must behave as :class:`mpff.ff.FFLayer` does (``normalize``, ``forward``,
``goodness``, ``threshold``, ``forward_all``, ``normalize_all``, ``make_optimizer``, and
``weight``/``bias`` as :func:`mpff.ff.train_epochs` uses them; ``bias`` may be None).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .registry import Registry


@dataclass(frozen=True)
class Tensor:
    """One parameter tensor of a layer: its name (in the module and the model file), shape, dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    @property
    def size(self) -> int:
        return math.prod(self.shape)


class LayerSpec:
    """A kind of FF layer (subclass it, set ``name``, and register an instance)."""

    name = ""

    def tensors(self, d_in: int, d_out: int) -> list[Tensor]:
        """The parameters, in the order of the built module's ``parameters()``."""
        raise NotImplementedError

    def num_params(self, d_in: int, d_out: int) -> int:
        return sum(t.size for t in self.tensors(d_in, d_out))

    def forward_macs(self, d_in: int, d_out: int) -> int:
        """Multiply-adds of one sample through the layer (the plan balances blocks with it)."""
        return d_in * d_out

    def build(self, d_in: int, d_out: int, *, threshold_coeff: float, goodness: str, norm_eps: float,
              seed: int):
        """The torch module, initialised from ``seed`` alone (every rank builds the same)."""
        raise NotImplementedError

    def describe(self, k: int) -> str:
        """What layer k computes, for the model file."""
        return f"FF layer {k} ({self.name})"


class LinearLayer(LayerSpec):
    """Normalise, linear, ReLU: :class:`mpff.ff.FFLayer`."""

    name = "linear"

    def tensors(self, d_in: int, d_out: int) -> list[Tensor]:
        return [Tensor("weight", (d_out, d_in)), Tensor("bias", (d_out,))]

    def build(self, d_in: int, d_out: int, *, threshold_coeff: float, goodness: str, norm_eps: float,
              seed: int):
        from .ff import FFLayer

        return FFLayer(d_in, d_out, threshold_coeff=threshold_coeff, goodness=goodness, norm_eps=norm_eps,
                       seed=seed)

    def describe(self, k: int) -> str:
        return (f"FF layer {k}: y = relu(x_n @ weight.T + bias), x_n = x / (||x||_2 + norm_eps), x the "
                f"{'input' if k == 0 else 'layer below'}")


LAYERS: Registry[LayerSpec] = Registry("layer kind")
DEFAULT = "linear"


def register(spec: LayerSpec, *, replace: bool = False) -> LayerSpec:
    if not spec.name:
        raise ValueError("a layer kind needs a name")
    return LAYERS.register(spec.name, spec, replace=replace)


def get(name: str = DEFAULT) -> LayerSpec:
    return LAYERS.get(name)


def names() -> tuple[str, ...]:
    return LAYERS.names()


register(LinearLayer())


# ------------------------------------------------------------------ sizes of whole networks

def layer_params(dims: Sequence[int], k: int, kind: str = DEFAULT) -> int:
    """Parameters of FF layer k of the network ``dims`` (input width first)."""
    return get(kind).num_params(int(dims[k]), int(dims[k + 1]))


def head_inputs(dims: Sequence[int]) -> int:
    """Width of the softmax head's input: the classifier layers' outputs concatenated (every
    layer but the first; the only layer when there is one)."""
    return sum(int(d) for d in dims[2:]) if len(dims) > 2 else int(dims[-1])


def head_tensors(dims: Sequence[int], num_classes: int) -> list[Tensor]:
    """The softmax head: one bias-free weight (classes, head inputs)."""
    return [Tensor("weight", (int(num_classes), head_inputs(dims)))]


def head_params(dims: Sequence[int], num_classes: int) -> int:
    return sum(t.size for t in head_tensors(dims, num_classes))


def mlp_parameters(dims: Sequence[int], num_classes: int) -> int:
    """Parameters of backprop's MLP ``dims -> num_classes``: linear layers with biases."""
    ext = (*(int(d) for d in dims), int(num_classes))
    linear = get(DEFAULT)
    return sum(linear.num_params(ext[k], ext[k + 1]) for k in range(len(ext) - 1))
