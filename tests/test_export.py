"""mpff export: OTF2 archives read back with the otf2 reader, Chrome trace JSON whose every
send has a flow arrow to its receive, and the errors a user can make."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections import Counter

import h5py
import pytest

from mpff.analysis import export, report, runs, traces
from mpff.config import Config
from mpff.trace import Tracer, trace_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")


def _needs_otf2():
    """The otf2 extra installs only where PyPI has a wheel (CPython 3.10/3.11, x86-64 Linux);
    there it must be present, elsewhere the OTF2 tests skip and say why."""
    if importlib.util.find_spec("otf2") is not None:
        return
    wheel_here = (sys.version_info[:2] in ((3, 10), (3, 11)) and sys.platform == "linux"
                  and os.uname().machine == "x86_64")
    if wheel_here:
        pytest.fail("the otf2 package is missing: pip install -e '.[otf2]' (jobs/setup_env.sh does)")
    pytest.skip("no otf2 wheel for this Python/platform (CPython 3.10/3.11 on x86-64 Linux only)")


def make_run(path, ranks, *, chapters=3, scalars=None):
    """A run directory written with the real Tracer; ranks: spans per rank (0-based chapters)."""
    cfg = Config().replace(model={"dims": (784, 8, 8)}, run={"schedule": "all_layers"},
                           train={"chapters": chapters, "epochs": chapters, "negatives": "fixed"})
    for rank, spans in enumerate(ranks):
        tracer = Tracer(trace_path(str(path), rank), rank, {
            "world_size": len(ranks), "host": f"node{rank // 2}", "device": "cpu", "config": cfg.to_json()})
        for span in spans:
            tracer.add_span(*span)
        for name, chapter, layer, value in (scalars or {}).get(rank, []):
            tracer.scalar(name, chapter, layer, value)
        tracer.close()
        with h5py.File(trace_path(str(path), rank), "a") as fh:
            fh.attrs["wall_start"], fh.attrs["wall_end"] = 0.0, 10.0
    (path / "run.json").write_text(json.dumps({"status": "finished", "world_size": len(ranks)}))
    return str(path)


#: Three ranks passing layers round a ring, plus the head and the negatives of chapter 1 (both
#: layer -1 and the same size: they pair in time order) and a send nobody unpacked.
RING = [
    [("setup", -1, -1, 0.0, 1.0), ("train", 0, 0, 1.0, 2.0), ("send", 0, 0, 2.0, 2.1, 4000, 1),
     ("train", 0, 1, 2.1, 3.0), ("send", 0, 1, 3.0, 3.1, 4000, 1), ("send", 1, -1, 3.1, 3.2, 800, 2),
     ("send", 1, -1, 3.2, 3.3, 800, 2), ("send", 2, 0, 3.3, 3.4, 4000, 2), ("wait", 2, 0, 3.4, 9.0, 0, 2)],
    [("setup", -1, -1, 0.0, 1.5), ("wait", 1, 0, 1.5, 2.4, 0, 0), ("recv", 0, 0, 2.4, 2.5, 4000, 0),
     ("train", 1, 0, 2.5, 3.5), ("recv", 0, 1, 3.5, 3.6, 4000, 0), ("train", 1, 1, 3.6, 4.5),
     ("send", 1, 1, 4.5, 4.6, 4000, 2)],
    [("setup", -1, -1, 0.0, 1.2), ("recv", 1, -1, 3.5, 3.6, 800, 0), ("recv", 1, -1, 3.6, 3.7, 800, 0),
     ("recv", 1, 1, 4.8, 4.9, 4000, 1), ("eval", 1, -1, 4.9, 5.5)],
]


def test_messages_pair_each_send_with_its_receive(tmp_path):
    run = report.load_run(make_run(tmp_path / "run", RING))
    pairs, lost_sends, lost_recvs = traces.messages(run)
    assert (len(pairs), lost_sends, lost_recvs) == (5, 1, 0)  # rank 0's ("send", 2, 0) was never unpacked
    by_src = sorted((m.src, m.dst, m.chapter, m.layer, m.nbytes) for m in pairs)
    assert by_src == [(0, 1, 1, 0, 4000), (0, 1, 1, 1, 4000), (0, 2, 2, -1, 800), (0, 2, 2, -1, 800),
                      (1, 2, 2, 1, 4000)]
    for m in pairs:
        send, recv = run.ranks[m.src].spans[m.send], run.ranks[m.dst].spans[m.recv]
        assert run.ranks[m.src].kinds[m.send] == "send" and run.ranks[m.dst].kinds[m.recv] == "recv"
        assert int(send["peer"]) == m.dst and int(recv["peer"]) == m.src
        assert int(send["bytes"]) == int(recv["bytes"]) == m.nbytes
    # the two equal-looking messages pair in time order
    twins = sorted((run.ranks[0].spans[m.send]["start"], run.ranks[2].spans[m.recv]["start"])
                   for m in pairs if m.layer == -1)
    assert twins == [(3.1, 3.5), (3.2, 3.6)]


def _flows_bind_sends_to_receives(trace_json: dict, run: runs.Run) -> None:
    events = trace_json["traceEvents"]
    slices = [e for e in events if e["ph"] == "X"]
    starts = {e["id"]: e for e in events if e["ph"] == "s"}
    ends = {e["id"]: e for e in events if e["ph"] == "f"}
    assert starts.keys() == ends.keys()

    def enclosing(flow):
        found = [e for e in slices if e["pid"] == flow["pid"] and e["tid"] == flow["tid"]
                 and e["ts"] <= flow["ts"] <= e["ts"] + e["dur"]]
        assert len(found) == 1, (flow, found)
        return found[0]

    linked = set()
    for flow_id, s in starts.items():
        f = ends[flow_id]
        assert (s["name"], s["cat"]) == (f["name"], f["cat"]) and f.get("bp") == "e"
        send, recv = enclosing(s), enclosing(f)
        assert send["name"].startswith("send") and recv["name"].startswith("recv")
        assert send["args"]["peer"] == recv["pid"] and recv["args"]["peer"] == send["pid"]
        assert send["args"]["bytes"] == recv["args"]["bytes"]
        assert (send["args"]["chapter"], send["args"]["layer"]) == (recv["args"]["chapter"],
                                                                     recv["args"]["layer"])
        linked.add((send["pid"], send["ts"]))
        linked.add((recv["pid"], recv["ts"]))
    # every send that has a receive in the trace, and every receive, has its arrow
    pairs, _, _ = traces.messages(run)
    sent = {(m.src, round((float(run.ranks[m.src].spans[m.send]["start"]) - run.wall_start) * 1e6, 3))
            for m in pairs}
    assert sent <= linked
    recvs = [e for e in slices if e["name"].startswith("recv")]
    assert all((e["pid"], e["ts"]) in linked for e in recvs)
    assert len(starts) == len(pairs) == len(recvs)


def test_chrome_export_has_flows_threads_and_counters(tmp_path, capsys):
    scalars = {0: [("loss", 0, 0, 0.69), ("loss", 0, 1, 0.68), ("peak_host_mem", -1, -1, 2**30)],
               2: [("test_accuracy", 1, -1, 0.42)]}
    run_dir = make_run(tmp_path / "run", RING, scalars=scalars)
    assert export.main([run_dir, "--format", "chrome"]) == 0
    path = os.path.join(run_dir, "trace.json")
    assert capsys.readouterr().out.strip() == f"mpff export: wrote {path}"
    data = json.loads(open(path, encoding="utf-8").read())
    run = report.load_run(run_dir)
    _flows_bind_sends_to_receives(data, run)
    events = data["traceEvents"]
    threads = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert threads == {0: "rank 0 tasks", 1: "rank 1 tasks", 2: "rank 2 tasks"}
    counters = [(e["pid"], e["name"], e["args"]) for e in events if e["ph"] == "C"]
    assert (0, "FF loss", {"layer 0": 0.69}) in counters and (0, "FF loss", {"layer 1": 0.68}) in counters
    assert (2, "test accuracy (%)", {"accuracy": 42.0}) in counters
    assert (0, "host memory (MiB)", {"peak": 1024.0}) in counters
    assert any(name == "host memory (MiB)" and "resident" in args for _, name, args in counters)
    # the report writes the same JSON
    assert report.main([run_dir, "--no-figures"]) == 0
    assert json.loads(open(os.path.join(run_dir, "report", "trace.json")).read()) == data


def _read_otf2(anchor: str):
    import otf2
    with otf2.reader.open(anchor) as trace:
        locations = [loc.name for loc in trace.definitions.locations]
        groups = [g.name for g in trace.definitions.location_groups]
        regions = {r.name for r in trace.definitions.regions}
        events = [(loc.name, type(ev).__name__, ev) for loc, ev in trace.events]
        resolution = trace.definitions.clock_properties.timer_resolution
        return locations, groups, regions, events, resolution


def test_otf2_archive_reads_back(tmp_path):
    _needs_otf2()
    run_dir = make_run(tmp_path / "run", RING, scalars={2: [("test_accuracy", 1, -1, 0.42)]})
    assert export.main([run_dir, "--format", "otf2"]) == 0
    anchor = os.path.join(run_dir, "otf2", "traces.otf2")
    locations, groups, regions, events, resolution = _read_otf2(anchor)
    assert locations == ["rank 0 (cpu)", "rank 1 (cpu)", "rank 2 (cpu)"]   # one location per rank
    assert groups == ["rank 0", "rank 1", "rank 2"]
    assert resolution == 10**9
    run = report.load_run(run_dir)
    kinds = {k for rt in run.ranks for k in rt.kinds}
    assert kinds | {"rank"} == regions                                      # a region per task kind
    for rank, rt in enumerate(run.ranks):
        mine = [(kind, ev) for loc, kind, ev in events if loc == locations[rank]]
        sends = [ev for kind, ev in mine if kind == "MpiSend"]
        recvs = [ev for kind, ev in mine if kind == "MpiRecv"]
        # as many send and receive events as the trace holds, to the same peers, of the same sizes
        assert sorted((ev.receiver, ev.msg_length) for ev in sends) == sorted(
            (int(s["peer"]), int(s["bytes"])) for s, k in zip(rt.spans, rt.kinds) if k == "send")
        assert sorted((ev.sender, ev.msg_length) for ev in recvs) == sorted(
            (int(s["peer"]), int(s["bytes"])) for s, k in zip(rt.spans, rt.kinds) if k == "recv")
        enters = [ev for kind, ev in mine if kind == "Enter"]
        assert len(enters) == len(rt.spans) + 1 == len([1 for kind, _ in mine if kind == "Leave"])
        times = [ev.time for _, ev in mine]
        assert times == sorted(times)
    # a matched pair shares its tag, so that a viewer links exactly these two events
    send_tags = {(loc, ev.receiver, ev.msg_tag, ev.msg_length) for loc, kind, ev in events if kind == "MpiSend"}
    for loc, kind, ev in events:
        if kind == "MpiRecv":
            sender = locations[ev.sender]
            assert (sender, locations.index(loc), ev.msg_tag, ev.msg_length) in send_tags
    metrics = [ev for _, kind, ev in events if kind == "Metric"]
    assert any(ev.value == pytest.approx(42.0) for ev in metrics)


def test_otf2_export_replaces_an_old_archive_and_leaves_no_staging(tmp_path):
    _needs_otf2()
    run_dir = make_run(tmp_path / "run", RING)
    out = tmp_path / "exported"
    for _ in range(2):
        assert export.main([run_dir, "--format", "otf2", "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["traces", "traces.def", "traces.otf2"]
    assert sorted(os.listdir(tmp_path)) == ["exported", "run"]


def test_otf2_without_the_package_is_one_line(tmp_path, monkeypatch, capsys):
    run_dir = make_run(tmp_path / "run", RING)
    monkeypatch.setitem(sys.modules, "otf2", None)  # import otf2 raises ImportError
    assert export.main([run_dir, "--format", "otf2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mpff export: error: ")
    assert "pip install 'mpff[otf2]'" in err
    assert not os.path.exists(os.path.join(run_dir, "otf2"))


@pytest.mark.parametrize("argv, fragment", [
    (["{nowhere}", "--format", "chrome"], "does not exist"),
    (["{run}", "--format", "otf2", "--out", "{run}/run.json"], "is a file"),
])
def test_export_errors(tmp_path, capsys, argv, fragment):
    run_dir = make_run(tmp_path / "run", RING)
    argv = [a.format(run=run_dir, nowhere=tmp_path / "nowhere") for a in argv]
    if "otf2" in argv:
        _needs_otf2()
    assert export.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mpff export: error: ") and err.count("\n") == 1 and fragment in err
    assert export.main([run_dir]) == 2  # --format is required
    assert "--format" in capsys.readouterr().err


@pytest.mark.mpi
@pytest.mark.skipif(not (os.path.exists(MPIEXEC) and importlib.util.find_spec("mpi4py")),
                    reason="needs mpi4py and mpiexec beside the interpreter (pip install mpi4py mpich)")
def test_a_real_two_rank_run_exports(tmp_path, mpff_run, mpff_tiny_args):
    """All Layers on 2 ranks: every buffer sent is received, in both exports."""
    out = tmp_path / "run"
    mpff_run(mpff_tiny_args(out, "run.schedule=all_layers", "run.report=true"), ranks=2, check=True)
    run = report.load_run(str(out))
    pairs, lost_sends, lost_recvs = traces.messages(run)
    assert pairs and (lost_sends, lost_recvs) == (0, 0)
    _flows_bind_sends_to_receives(json.loads((out / "report" / "trace.json").read_text()), run)
    _needs_otf2()
    assert export.main([str(out), "--format", "otf2"]) == 0
    locations, _, _, events, _ = _read_otf2(str(out / "otf2" / "traces.otf2"))
    assert len(locations) == 2
    counts = Counter(kind for _, kind, _ in events)
    assert counts["MpiSend"] == counts["MpiRecv"] == len(pairs)
    sizes = Counter(ev.msg_length for _, kind, ev in events if kind == "MpiSend")
    assert sizes == Counter(ev.msg_length for _, kind, ev in events if kind == "MpiRecv")
    assert sizes == Counter(m.nbytes for m in pairs)
