"""Several runs side by side: each run's baseline (the Sequential run of the same problem), the
runs that differ only in their seed, the comparison tables and their CSV / JSON, the training
cost and time to accuracy, and ``report --predict``'s predicted times.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import ConfigError
from ..predict import Network, interconnect
from ..predict import predict as predict_runs_from
from .runs import unfinished
from .summary import (
    RunSummary,
    accuracy_timeline,
    describe_differences,
    efficiency,
    peak_scalar,
    problem_differences,
    problem_key,
    speedup,
)
from .tables import fmt_bytes, fmt_percent, fmt_ratio, fmt_seconds, md_table, one_line


@dataclass
class Pairing:
    """A run's baseline for speedup (None: none of the same problem) and a note for the table."""
    baseline: RunSummary | None
    note: str = ""


def _seed(s: RunSummary) -> Any:
    return s.cfg.train.seed


def comparison_rows(summaries: list[RunSummary], baselines: list[RunSummary | None],
                    notes: list[str] | None = None, predicted: list[float | None] | None = None
                    ) -> list[list[str]]:
    rows = []
    for i, (s, b) in enumerate(zip(summaries, baselines)):
        tp = s.training
        bp = s.cfg.train.algorithm == "backprop"
        row = [
            s.name, str(s.cfg.run.schedule),
            "(backprop)" if bp else str(s.cfg.train.negatives),
            "argmax" if bp else str(s.cfg.train.classifier), str(s.run.world_size), fmt_seconds(s.wall),
            fmt_percent(s.final_accuracy, 2),
            fmt_ratio(speedup(b, s)) if b else "–", fmt_percent(efficiency(b, s)) if b else "–",
            fmt_percent(s.bubble_measured), fmt_percent(s.bubble_modelled),
            fmt_seconds(tp.setup_seconds), fmt_seconds(tp.seconds), fmt_ratio(training_speedup(b, s)) if b else "–",
            fmt_percent(tp.bubble), str(_seed(s)),
            (b.name if b else "–") + (f" ({notes[i]})" if notes and notes[i] else ""),
        ]
        if predicted is not None:
            row.append(fmt_seconds(predicted[i]))
        rows.append(row)
    return rows


COMPARISON_HEADERS = ["run", "schedule", "negatives", "classifier", "ranks", "time (s)", "accuracy",
                      "speedup", "efficiency", "bubble measured", "bubble modelled",
                      "setup (s)", "training (s)", "training speedup", "training bubble", "seed",
                      "baseline"]


def comparison_table(summaries: list[RunSummary], baselines: list[RunSummary | None],
                     notes: list[str] | None = None, predicted: list[float | None] | None = None) -> str:
    headers = COMPARISON_HEADERS + (["predicted time (s)"] if predicted is not None else [])
    return md_table(headers, comparison_rows(summaries, baselines, notes, predicted), numeric_from=5)


def training_speedup(baseline: RunSummary, run: RunSummary) -> float | None:
    """Baseline training seconds / run training seconds (setup and the final write apart)."""
    t = run.training.seconds
    return baseline.training.seconds / t if t > 0 else None


def _same_problem(a: RunSummary, b: RunSummary) -> bool:
    return not problem_differences(a.run.cfg, b.run.cfg, a.run.world_size, b.run.world_size)


def pair_baselines(summaries: list[RunSummary], baseline: RunSummary | None,
                   any_problem: bool = False) -> list[Pairing]:
    """--baseline for every row, refused (ConfigError) where it is another problem unless
    ``any_problem`` (``--any-baseline``: then the row's note says what differs); without it,
    the Sequential run of the same problem (the same seed and threads if there is one; a
    finished one before one that did not finish), as the paper's Table 1, and where there is
    none a note on the closest Sequential run."""
    if baseline is not None:
        pairs = []
        for s in summaries:
            diff = describe_differences(baseline.run.cfg, s.run.cfg, baseline.run.world_size,
                                        s.run.world_size)
            if diff and not any_problem:
                raise ConfigError(
                    f"baseline {baseline.name} is not the same problem as run {s.name}: they differ "
                    f"in {diff}; pass a baseline of the same problem, leave --baseline out to pair "
                    "each run with the Sequential run of its own problem, or pass --any-baseline "
                    "to compare them anyway")
            pairs.append(Pairing(baseline, f"another problem: differs in {diff}" if diff else ""))
        return pairs
    sequential = [s for s in summaries if s.cfg.run.schedule == "sequential"]
    pairs = []
    for s in summaries:
        same = [b for b in sequential if _same_problem(b, s)]
        if same:
            same.sort(key=lambda b: (unfinished(b.run) is not None, _seed(b) != _seed(s),
                                     b.cfg.train.threads != s.cfg.train.threads))
            pairs.append(Pairing(same[0]))
            continue
        note = "no Sequential run of the same problem"
        if sequential:
            closest = min(sequential, key=lambda b: len(problem_differences(
                b.run.cfg, s.run.cfg, b.run.world_size, s.run.world_size)))
            note += (f"; {closest.name} differs in " + ", ".join(problem_differences(
                closest.run.cfg, s.run.cfg, closest.run.world_size, s.run.world_size)))
        pairs.append(Pairing(None, note))
    return pairs


# ----- runs that differ only in their seed

def _group_key(s: RunSummary) -> str:
    """The run's configuration but its seed and name, and its world size."""
    config = s.cfg.replace(train={"seed": 0}).to_dict()
    config.pop("name", None)
    return json.dumps([config, s.run.world_size], sort_keys=True)


def seed_groups(summaries: list[RunSummary]) -> list[list[int]]:
    """Indices of the runs whose configurations differ only in train.seed (and their names)."""
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(summaries):
        groups.setdefault(_group_key(s), []).append(i)
    return list(groups.values())


def _stats(values: list[float | None]) -> dict[str, float | int | None]:
    """mean, sample std (n >= 2), min, max and n of the values that exist."""
    v = [float(x) for x in values if x is not None and not math.isnan(x)]
    if not v:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {"n": len(v), "mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else None,
            "min": min(v), "max": max(v)}


def _group_name(members: list[RunSummary]) -> str:
    first = members[0]
    seed_text = f"seed{_seed(first)}"
    if len(members) > 1 and seed_text in first.name:
        return first.name.replace(seed_text, "seed*")
    return first.name if len(members) == 1 else f"{first.name} (+{len(members) - 1} seeds)"


GROUP_FIELDS = ("wall_seconds", "training_seconds", "speedup", "training_speedup", "accuracy",
                "bubble_measured", "bubble_training")


def group_records(summaries: list[RunSummary], pairs: list[Pairing]) -> list[dict]:
    """One record per seed group: its settings and mean / std / min / max of each figure."""
    records = []
    for idx in seed_groups(summaries):
        members = [summaries[i] for i in idx]
        per_run = [_run_figures(summaries[i], pairs[i].baseline) for i in idx]
        s = members[0]
        rec = {"group": _group_name(members), "runs": [m.name for m in members],
               "seeds": [_seed(m) for m in members], "schedule": s.cfg.run.schedule,
               "negatives": s.cfg.train.negatives, "classifier": s.cfg.train.classifier,
               "ranks": s.run.world_size, "threads": s.cfg.train.threads}
        for name in GROUP_FIELDS:
            rec[name] = _stats([f[name] for f in per_run])
        records.append(rec)
    return records


def _run_figures(s: RunSummary, b: RunSummary | None) -> dict[str, float | None]:
    return {"wall_seconds": s.wall, "training_seconds": s.training.seconds,
            "speedup": speedup(b, s) if b else None,
            "training_speedup": training_speedup(b, s) if b else None,
            "accuracy": s.final_accuracy, "bubble_measured": s.bubble_measured,
            "bubble_training": s.training.bubble}


def _mean_std(st: dict, fmt: Callable[[float | None], str]) -> str:
    if st["mean"] is None:
        return "–"
    return fmt(st["mean"]) + (f" ± {fmt(st['std'])}" if st["std"] is not None else "")


def group_table(records: list[dict]) -> str:
    headers = ["runs (seeds)", "schedule", "negatives", "classifier", "ranks", "n", "time (s)",
               "training (s)", "speedup", "training speedup", "accuracy", "training bubble"]
    rows = [[r["group"], str(r["schedule"]), str(r["negatives"]), str(r["classifier"]), str(r["ranks"]),
             str(len(r["runs"])), _mean_std(r["wall_seconds"], fmt_seconds),
             _mean_std(r["training_seconds"], fmt_seconds),
             _mean_std(r["speedup"], fmt_ratio), _mean_std(r["training_speedup"], fmt_ratio),
             _mean_std(r["accuracy"], lambda x: fmt_percent(x, 2)), _mean_std(r["bubble_training"], fmt_percent)]
            for r in records]
    return md_table(headers, rows, numeric_from=4)


def run_records(summaries: list[RunSummary], pairs: list[Pairing], subdirs: list[str],
                predicted: list[float | None] | None = None) -> list[dict]:
    """The comparison table as data: one record per run, plain numbers (seconds, fractions)."""
    groups = {i: n for n, idx in enumerate(seed_groups(summaries)) for i in idx}
    out = []
    for i, (s, p) in enumerate(zip(summaries, pairs)):
        b = p.baseline
        rec = {"run": s.name, "report": f"{subdirs[i]}/report.md", "path": os.path.abspath(s.run.path),
               "schedule": s.cfg.run.schedule, "negatives": s.cfg.train.negatives,
               "classifier": s.cfg.train.classifier, "ranks": s.run.world_size,
               "threads": s.cfg.train.threads, "seed": _seed(s), "seed_group": groups[i],
               "setup_seconds": s.training.setup_seconds, **_run_figures(s, b),
               "efficiency": efficiency(b, s) if b else None,
               "bubble_modelled": s.bubble_modelled, "bytes_sent": s.bytes_sent,
               "baseline": b.name if b else None, "baseline_note": p.note or None}
        if predicted is not None:
            rec["predicted_wall_seconds"] = predicted[i]
        out.append(rec)
    return out


def write_table_files(out: str, runs: list[dict], groups: list[dict], extra: dict | None = None) -> None:
    """comparison.csv (one row per run), comparison-groups.csv (per seed group: mean, std, min,
    max of each figure) and comparison.json (both, and anything in ``extra``)."""
    import csv
    with open(os.path.join(out, "comparison.csv"), "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(runs[0]))
        writer.writeheader()
        writer.writerows(runs)
    flat = []
    for g in groups:
        row = {k: v for k, v in g.items() if k not in GROUP_FIELDS}
        row["runs"], row["seeds"] = " ".join(row["runs"]), " ".join(map(str, row["seeds"]))
        for name in GROUP_FIELDS:
            for stat, value in g[name].items():
                if stat != "n":
                    row[f"{name}_{stat}"] = value
        flat.append(row)
    with open(os.path.join(out, "comparison-groups.csv"), "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(flat[0]))
        writer.writeheader()
        writer.writerows(flat)
    with open(os.path.join(out, "comparison.json"), "w", encoding="utf-8") as fh:
        json.dump({"runs": runs, "seed_groups": groups, **(extra or {})}, fh, indent=2)
        fh.write("\n")


# ----- predicted against measured

def predict_runs(summaries: list[RunSummary]) -> tuple[list[float | None], list[dict], list[str]]:
    """``report --predict``: per problem, predict every run's schedule and rank count from the
    problem's Sequential run (else its run with the fewest ranks), with contention measured from
    the problem's runs, ranks per node as the runs had them, and messages within a node at the
    shared-memory preset. Returns the predicted wall per run, curve records and notes."""
    predicted: list[float | None] = [None] * len(summaries)
    curves: list[dict] = []
    notes: list[str] = []
    problems: dict[str, list[int]] = {}
    for i, s in enumerate(summaries):
        key = json.dumps(problem_key(s)
                         + [s.cfg.train.threads], default=str)
        problems.setdefault(key, []).append(i)
    for idx in problems.values():
        members = [summaries[i] for i in idx]
        source = min(members, key=lambda m: (unfinished(m.run) is not None,  # its times are partial
                                             m.cfg.run.schedule != "sequential",
                                             m.run.world_size, _seed(m) != 0))
        per_host = max(max(sum(1 for rt in m.run.ranks if rt.host == h) for h in {rt.host for rt in m.run.ranks})
                       for m in members)
        network = Network(interconnect.preset("ib-hdr"), interconnect.preset("shm"), per_host)
        runs = [source.run] + [m.run for m in members if m is not source]
        schedules = sorted({m.cfg.run.schedule for m in members} | {"sequential"},
                           key=lambda x: x != "sequential")
        ranks = sorted({m.run.world_size for m in members} | {1})
        # backprop: strong and weak scaling are predicted apart (the one-rank source is both's)
        scalings = sorted({m.cfg.run.scaling for m in members if m.run.world_size > 1}
                          or {"strong"})
        for scaling in scalings:
            overrides = [f"run.scaling={scaling}"] if source.cfg.train.algorithm == "backprop" else []
            try:
                outcome = predict_runs_from(runs, ranks=ranks, schedules=schedules, network=network,
                                              contention="auto", overrides=overrides)
            except ConfigError as exc:
                notes.append(f"no prediction for the runs of {source.name}: {one_line(exc)}")
                break
            by_key = {(p.schedule, p.ranks): p for p in outcome.predictions}
            for i in idx:
                if summaries[i].run.world_size > 1 and summaries[i].cfg.run.scaling != scaling:
                    continue
                p = by_key.get((summaries[i].cfg.run.schedule, summaries[i].run.world_size))
                # the run's own seed and lag may differ from the source's; the time does not depend on the seed
                predicted[i] = p.wall if p is not None else None
            for p in outcome.predictions:
                if p.reason is None and (p.ranks > 1 or scaling == scalings[0]):
                    curves.append({"source": source.name, "negatives": source.cfg.train.negatives,
                                   "classifier": source.cfg.train.classifier,
                                   **({"scaling": scaling} if overrides else {}), **p.record()})
            notes.append(f"predicted from {source.name}" + (f" ({scaling} scaling)" if overrides else "")
                         + ": " + outcome.contention.note)
    return predicted, curves, notes


# ----- FF against backprop: cost

DEFAULT_ACCURACIES = (0.90, 0.95, 0.98)

def cost_record(s: RunSummary, accuracies: tuple[float, ...] = DEFAULT_ACCURACIES) -> dict:
    """The figures of the FF/PFF/BP comparison for one run (SPEC section 4)."""
    epochs = int(s.cfg.train.epochs or 0)
    eval_seconds = max((float((rt.spans["end"] - rt.spans["start"])[rt.kinds == "eval"].sum())
                        for rt in s.run.ranks), default=0.0)
    train_seconds = max(s.training.seconds - eval_seconds, 0.0)
    timeline = accuracy_timeline(s)
    to_reach = {}
    for a in accuracies:
        hit = next((t for t, v in timeline if v >= a), None)
        to_reach[f"{100 * a:g}%"] = hit
    peaks = [r.get("memory", {}).get("rss_peak_bytes") for r in s.run.info.get("ranks", [])
             if isinstance(r, dict)]
    peaks = [p for p in peaks if isinstance(p, (int, float))] or [
        p for p in (peak_scalar(rt, "rss_peak_bytes") or peak_scalar(rt, "peak_host_mem") for rt in s.run.ranks) if p]
    return {"run": s.name, "algorithm": s.cfg.train.algorithm,
            "schedule": s.cfg.run.schedule, "ranks": s.run.world_size,
            "training_seconds_per_epoch": train_seconds / epochs if epochs else None,
            "evaluation_seconds": eval_seconds, "seconds_to_accuracy": to_reach,
            "peak_rss_bytes": max(peaks) if peaks else None,
            "bytes_sent_per_epoch": s.bytes_sent / epochs if epochs else None,
            "final_accuracy": s.final_accuracy}


def cost_table(records: list[dict]) -> str:
    thresholds = list(records[0]["seconds_to_accuracy"]) if records else []
    headers = (["run", "algorithm", "schedule", "ranks", "training s/epoch"]
               + [f"s to {t}" for t in thresholds]
               + ["peak memory / rank", "sent / epoch", "final accuracy"])
    rows = [[r["run"], r["algorithm"], str(r["schedule"]), str(r["ranks"]),
             fmt_seconds(r["training_seconds_per_epoch"])]
            + [fmt_seconds(r["seconds_to_accuracy"][t]) if r["seconds_to_accuracy"][t] is not None
               else "not reached" for t in thresholds]
            + [fmt_bytes(r["peak_rss_bytes"]), fmt_bytes(r["bytes_sent_per_epoch"]),
               fmt_percent(r["final_accuracy"], 2)]
            for r in records]
    return md_table(headers, rows, numeric_from=3)

