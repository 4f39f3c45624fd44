"""Predict runs on more ranks than this machine has: the task graph, simulated with measured task
times. No MPI, no GPU; ``mpff predict`` (:mod:`.cli`) is the command.

- :mod:`.simulate`: the discrete-event simulator of a plan (also the report's modelled bubble);
- :mod:`.profile`: a measured run's task times per sample, and contention between ranks;
- :mod:`.target`: the run to predict and the network; :mod:`.interconnect`: named links;
- :mod:`.pipeline`: the FF schedules' task times and their simulation;
- :mod:`.backprop`: data-parallel backprop steps modelled from a one-rank run;
- :mod:`.outcome`: the predictions; :mod:`.predictor`: all schedules and rank counts;
- :mod:`.cli`: tables, figure, files and the command line.

Method and limits: ``docs/predict.md``.
"""

from .cli import main, prediction_table
from .outcome import Outcome, Prediction
from .pipeline import task_times
from .predictor import predict
from .profile import Contention, Profile, build_profile, measure_contention, read_spans
from .target import Network, Target, make_target

__all__ = ["Contention", "Network", "Outcome", "Prediction", "Profile", "Target", "build_profile", "main",
           "make_target", "measure_contention", "predict", "prediction_table", "read_spans", "task_times"]
