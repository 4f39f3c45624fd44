"""mpff: Pipeline Forward-Forward training of neural networks over MPI (Aktemur et al., 2024).

Launch training with ``mpiexec -n N python -m mpi4py -m mpff train --config configs/workstation.toml``;
see README.md. ``mpff.load_model(path)`` reads a finished run's ``model.h5``.
"""

__version__ = "0.1.0"


def load_model(path: str, device: str = "cpu"):
    """Load a trained model; ``.predict(images, method=None)`` classifies raw images."""
    from .modelfile import load_model as _load

    return _load(path, device)


__all__ = ["__version__", "load_model"]
