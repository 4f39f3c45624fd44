"""Run directories with spans we choose, written by the real Tracer (for test_predict and test_compare)."""

from __future__ import annotations

import json

import h5py

from mpff.config import Config
from mpff.trace import Tracer, trace_path


def make_config(schedule="sequential", dims=(784, 8, 8), chapters=4, epochs=None, negatives="fixed",
                classifier="goodness", data=None, **train) -> Config:
    train = {"chapters": chapters, "epochs": epochs or chapters, "negatives": negatives,
             "classifier": classifier, "eval_every": 0, **train}
    return Config().replace(model={"dims": tuple(dims)}, run={"schedule": schedule}, train=train,
                            data={"train_subset": 1000, "test_subset": 100, **(data or {})})


def make_run(path, ranks, cfg: Config, *, walls=None, hosts=None, info=None, attrs=None,
             accuracy=None) -> str:
    """ranks: per rank a list of spans (kind, chapter, layer, start, end[, bytes, peer]);
    walls: per rank (wall_start, wall_end), default (0, last span end); hosts: per rank;
    attrs: per rank, extra trace attributes; accuracy: final test accuracy for run.json."""
    for rank, spans in enumerate(ranks):
        meta = {"world_size": len(ranks), "host": (hosts or ["node0"] * len(ranks))[rank],
                "device": "cpu", "config": cfg.to_json()}
        tracer = Tracer(trace_path(str(path), rank), rank, meta)
        for span in spans:
            tracer.add_span(*span)
        if accuracy is not None:
            tracer.scalar("test_accuracy", cfg.train.chapters - 1, -1, accuracy)
        tracer.close("finished")
        end = max((s[4] for r in ranks for s in r), default=1.0)
        with h5py.File(trace_path(str(path), rank), "a") as fh:  # times we control
            fh.attrs["wall_start"], fh.attrs["wall_end"] = (walls or [(0.0, end)] * len(ranks))[rank]
            for key, value in ((attrs or [{}] * len(ranks))[rank]).items():
                fh.attrs[key] = value
    (path / "run.json").write_text(json.dumps({
        "status": "finished", "world_size": len(ranks), "schedule": cfg.run.schedule,
        "config": cfg.to_dict(), "test_accuracy": accuracy, **(info or {})}))
    (path / "config.toml").write_text(cfg.to_toml())
    return str(path)


def sequential_spans(chapters, train=(2.0, 3.0), forward=(0.5,), eval_time=1.0, final=0.2, setup=1.0,
                     t0=0.0):
    """A Sequential rank: setup, then per chapter train(c, 0), then for k >= 1 the forward pass
    through layer k-1 and train(c, k); eval after the last chapter, then the model write.
    ``train``: seconds per layer, or a dict {chapter: seconds per layer} for some chapters."""
    spans = [("setup", -1, -1, t0, t0 + setup)]
    t = t0 + setup
    per_chapter = train if isinstance(train, dict) else {}
    default = train if not isinstance(train, dict) else per_chapter["default"]
    for c in range(chapters):
        for k, d in enumerate(per_chapter.get(c, default)):
            if k > 0:
                spans.append(("forward", c, k, t, t + forward[k - 1]))
                t += forward[k - 1]
            spans.append(("train", c, k, t, t + d))
            t += d
    spans.append(("eval", chapters - 1, -1, t, t + eval_time))
    t += eval_time
    spans.append(("io", chapters - 1, -1, t, t + final))
    return spans
