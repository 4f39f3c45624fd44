"""FF against backprop at equal accuracy (issue 21, item 3): seconds and peak memory to first
reach 95 %, 97 % and 98 % test accuracy on the same network, `[784,1000,1000,1000]`.

    .venv/bin/python benchmarks/equal_accuracy.py            # -> results/equal_accuracy.json

Nothing is trained here; the table is put together from runs already recorded:
- FF (Sequential, PFF All Layers and Single Layer on 2 ranks, Random negatives, goodness) from
  `benchmarks/paper_table.py` at E = S = 100 (`results/paper_table/*.json`): the first evaluated
  chapter (every 5th) at or above the accuracy, times that row's own measured training seconds
  per epoch (every FF epoch does the same work with Random negatives). A row measured while
  other work ran is marked so: its seconds are too high, its chapter count is not.
- Backprop (one rank, and data-parallel DDP on 2 ranks) from `benchmarks/ff_vs_bp.py`
  (`results/ff_vs_bp.json`, E = S = 10, evaluated after every epoch): its measured seconds of
  training to the first epoch at or above the accuracy. Backprop passes 98 % in 10 epochs, so
  the short run answers the question.
- Peak resident memory per rank: the run's own record where its directory is on disk, else
  `ff_vs_bp.py`'s run of the same case, network and data (FF's peak is its chapter data, which
  does not depend on E).
Times of different days may come from different machines (each session gets its own): compare
within one day's rows (the `measured` column).
Where a run directory is still on disk, `mpff report RUN --accuracies 0.95,0.97,0.98` gives the
measured training time to each evaluated chapter (the `exact` record, in brackets in the table;
the estimate is checked against it).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

from _common import RESULTS, ROOT, read_json, write_result

ACCURACIES = (0.95, 0.97, 0.98)
FF_ROWS = {  # paper_table row file stem -> (label, the ff_vs_bp case whose memory it shares)
    "random-goodness-sequential": ("FF Sequential, 1 rank", "ff_sequential"),
    "random-goodness": ("PFF All Layers, 2 ranks", "pff_all_layers"),
    "random-goodness-single_layer": ("PFF Single Layer, 2 ranks", None),  # a rank holds its layers' data only
}
BP_CASES = {"bp_sequential": "BP, 1 rank", "bp_data_parallel": "BP data-parallel (DDP), 2 ranks"}


def first_chapter(curve: dict[str, float], target: float) -> int | None:
    hits = [int(c) for c, a in curve.items() if a >= target]
    return min(hits) if hits else None


def exact_from_report(run_dir: str) -> dict | None:
    """What `mpff report RUN --accuracies 0.95,0.97,0.98` prints for a run still on disk (its
    cost record: measured training seconds to each evaluated chapter at or above each accuracy)."""
    if not run_dir or not os.path.isfile(os.path.join(run_dir, "run.json")):
        return None
    from mpff.analysis.compare import cost_record
    from mpff.analysis.report import analyze_run
    return cost_record(analyze_run(run_dir), ACCURACIES)


def ff_rows(results: str, bp: dict) -> list[dict]:
    rows = []
    for path in sorted(glob.glob(os.path.join(results, "paper_table", "*.json"))):
        rec = read_json(path)
        if not rec or rec.get("dims") not in (None, [784, 1000, 1000, 1000]):
            continue
        stem = os.path.basename(path).rsplit("-s", 1)[0]
        if stem not in FF_ROWS or not rec.get("accuracy_per_chapter"):
            continue  # (a row stopped part-way counts: the first chapter at an accuracy stays the first)
        label, mem_case = FF_ROWS[stem]
        # training seconds per epoch; a run stopped by a time limit records none: its wall seconds
        # per epoch then (start-up included, so a little high)
        rate = rec.get("training_seconds_per_epoch") or rec.get("seconds_per_epoch")
        curve = rec["accuracy_per_chapter"]
        reach = {}
        for a in ACCURACIES:
            c = first_chapter(curve, a)
            reach[f"{a:.0%}"] = {"chapter": c, "seconds": c * rate if c and rate else None}
        exact = exact_from_report(rec.get("run_dir", ""))
        # the run's own record where its directory is on disk, else ff_vs_bp's run of the same case
        peak = (exact or {}).get("peak_rss_bytes") or (
            bp["cases"].get(mem_case, {}).get("summary", {}).get("peak_rss_bytes_max_rank") if mem_case else None)
        rows.append({
            "run": label, "source": os.path.relpath(path, ROOT), "seed": int(path.rsplit("-s", 1)[1][:-5]),
            "measured": ((rec.get("invocations") or [{}])[-1].get("started") or rec.get("date") or "")[:10],
            "status": rec.get("status"), "chapters_done": rec.get("chapters_done"),
            "eval_every": int(min(curve, key=int)), "training_seconds_per_epoch": rate,
            "quiet": rec.get("quiet"), "reach": reach, "final_accuracy": rec.get("test_accuracy"),
            "peak_rss_bytes_max_rank": peak, "exact": exact,
        })
    return rows


def bp_rows(bp: dict) -> list[dict]:
    rows = []
    for case, label in BP_CASES.items():
        rec = bp["cases"].get(case)
        if not rec:
            continue
        s = rec["summary"]
        curve = rec.get("accuracy_curve", [])
        reach = {}
        for a in ACCURACIES:
            hit = next((i + 1 for i, p in enumerate(curve) if p["accuracy"] >= a), None)
            reach[f"{a:.0%}"] = {"chapter": hit, "seconds": s["seconds_to_accuracy"].get(f"{a:.0%}")}
        rows.append({"run": label, "source": "benchmarks/results/ff_vs_bp.json", "eval_every": 1,
                     "measured": (bp.get("date") or "")[:10],
                     "training_seconds_per_epoch": s["train_seconds_per_epoch"], "quiet": True,
                     "reach": reach, "final_accuracy": s["final_accuracy"],
                     "peak_rss_bytes_max_rank": s.get("peak_rss_bytes_max_rank")})
    return rows


def table(rows: list[dict]) -> str:
    head = ("| run | s / epoch | " + " | ".join(f"{a:.0%}: epoch, s" for a in ACCURACIES)
            + " | peak resident / rank | final | measured |")
    lines = [head, "|---|" + "---:|" * (len(ACCURACIES) + 3) + "---|"]
    for r in rows:
        cells = []
        for a in ACCURACIES:
            x = r["reach"][f"{a:.0%}"]
            exact = ((r.get("exact") or {}).get("seconds_to_accuracy") or {}).get(f"{100 * a:g}%")
            unfinished = r.get("status", "finished") != "finished"
            cells.append(("not yet" if unfinished else "never") if x["chapter"] is None else
                         f"{'≤ ' if r['eval_every'] > 1 else ''}{x['chapter']}, {x['seconds']:.0f}"
                         + (f" ({exact:.0f})" if exact else ""))
        mark = "" if r.get("quiet") else " *"
        mem = r.get("peak_rss_bytes_max_rank")
        final = r.get("final_accuracy")
        part = "" if r.get("status", "finished") == "finished" else f", {r['chapters_done']}/100 so far"
        lines.append(f"| {r['run']} (seed {r.get('seed', 0)}{part}) | {r['training_seconds_per_epoch']:.1f}{mark} | "
                     + " | ".join(cells) + f" | {f'{mem / 1e9:.2f} GB' if mem else '–'}"
                     + f" | {f'{final:.2%}' if final else '–'} | {r.get('measured', '')} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.parse_args()
    bp = (read_json(os.path.join(RESULTS, "ff_vs_bp.json")) or {}).get("runs")
    if not bp:
        print("equal_accuracy: no results/ff_vs_bp.json runs: run benchmarks/ff_vs_bp.py first", file=sys.stderr)
        return 2
    rows = ff_rows(RESULTS, bp) + bp_rows(bp)
    path = write_result("equal_accuracy", {"dims": [784, 1000, 1000, 1000], "accuracies": list(ACCURACIES),
                                           "rows": rows})
    print(table(rows))
    print(f"wrote {os.path.relpath(path, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
