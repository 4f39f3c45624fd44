"""The offline half: what a finished (or killed) run's files say. No MPI, no GPU.

- :mod:`.runs`: the one reader of a run directory (run.json, config.toml, the HDF5 traces),
  giving a :class:`~mpff.config.Config` rebuilt as the run ran;
- :mod:`.summary`: time per category and rank, the bubble (measured and modelled), the training
  phase, accuracy, which settings make two runs the same problem;
- :mod:`.compare`: several runs: baselines, seed groups, cost, predicted times;
- :mod:`.tables`: formatting shared by the offline tools; :mod:`.figures`: the pictures;
- :mod:`.traces`: messages and the Chrome trace; :mod:`.export`: ``mpff export`` (Chrome, OTF2);
- :mod:`.report`: ``mpff report``.

The prediction of runs on more ranks is :mod:`mpff.predict`.
"""
