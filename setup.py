"""mpff: Pipeline Forward-Forward training over MPI (Aktemur et al., 2024).

Install for development on a workstation (CPU torch pinned for that machine):

    pip install -c constraints.txt -e '.[mpi,test,otf2]'

On a cluster, install the site's CUDA build of torch first and build mpi4py
against the site MPI (`pip install --no-binary mpi4py mpi4py`), then
`pip install -e .` (no `[mpi]`: the PyPI MPICH is for workstations).

Extras: ``mpi`` (a self-contained MPICH), ``test`` (pytest, ruff), ``otf2`` (the Score-P
``otf2`` package for ``mpff export --format otf2``; PyPI has wheels for CPython 3.10 and 3.11
on x86-64 Linux only, so elsewhere the extra installs nothing and OTF2 export says how to get
the package: from the site's Score-P/OTF2 module, or a Python 3.10/3.11 environment).
"""

from setuptools import find_packages, setup

setup(
    name="mpff",
    version="0.1.0",
    description="Pipeline Forward-Forward training of neural networks over MPI",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mpff", "mpff.*"]),
    package_data={"mpff": ["datasets/mnist/*.gz", "presets/*.toml"]},
    install_requires=[
        # torch is deliberately unpinned: clusters bring their own CUDA build.
        "torch>=2.0",
        "numpy>=1.22",
        "h5py>=3.6",
        "mpi4py>=3.1",
        "tomli>=1.1; python_version<'3.11'",
        "matplotlib>=3.5",
        "psutil>=5.8",  # per-rank resident memory (mpff.memory)
    ],
    extras_require={
        # A self-contained MPI for workstations (mpiexec in the virtualenv).
        "mpi": ["mpich"],
        "test": ["pytest>=7", "ruff"],
        # torchvision's data sets (data.dataset = "torchvision"); needs the torch it was built for.
        "vision": ["torchvision", "scipy"],  # scipy: SVHN's .mat files
        # OTF2 archives for Vampir, Scalasca and Pipit (mpff export --format otf2).
        "otf2": ["otf2>=3.0; python_version >= '3.10' and python_version < '3.12' "
                 "and platform_machine == 'x86_64' and sys_platform == 'linux'"],
    },
    entry_points={"console_scripts": ["mpff=mpff.cli:main"]},
)
