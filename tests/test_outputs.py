"""What a run leaves and how a newcomer meets mpff: trace format 2 (and reading version 1),
self-describing HDF5, figures fit for a paper, files that follow the umask, packaged presets
(the tiny one learns), the settings printer, the train epilog and run provenance."""

from __future__ import annotations

import glob
import json
import os
import resource
import subprocess
import sys
import time
import zipfile

import h5py
import numpy as np
import pytest

from mpff import settings, trace
from mpff.analysis import figures, report, runs, summary
from mpff.config import SECTIONS, Config, ConfigError, load, preset_names
from mpff.model import FFNet
from mpff.modelfile import atomic_h5, current_umask, load_model, save_model
from mpff.provenance import provenance
from mpff.trace import Tracer, trace_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(**train) -> Config:
    return Config().replace(model={"dims": (784, 8, 8, 8)}, run={"schedule": "sequential"},
                            train={"chapters": 4, "epochs": 4, "negatives": "fixed", **train})


def write_trace(run_dir, spans, scalars=(), cfg=None, rank=0, world_size=1, wall=(0.0, 10.0)):
    """A rank file written by the real Tracer (0-based chapters in, as the engine passes them)."""
    cfg = cfg or small_config()
    tracer = Tracer(trace_path(str(run_dir), rank), rank,
                    {"world_size": world_size, "host": "node0", "device": "cpu", "config": cfg.to_json()})
    for span in spans:
        tracer.add_span(*span)
    for name, chapter, layer, value in scalars:
        tracer.scalar(name, chapter, layer, value)
    tracer.close()
    with h5py.File(trace_path(str(run_dir), rank), "a") as fh:
        fh.attrs["wall_start"], fh.attrs["wall_end"] = wall
    return trace_path(str(run_dir), rank)


def write_v1_trace(path, spans, scalars, cfg, wall=(0.0, 10.0)):
    """A rank file exactly as format version 1 wrote it: S12/S32 names, 0-based chapters."""
    span_dtype = np.dtype([("kind", "S12"), ("chapter", "<i4"), ("layer", "<i4"), ("start", "<f8"),
                           ("end", "<f8"), ("bytes", "<i8"), ("peer", "<i4")])
    scalar_dtype = np.dtype([("name", "S32"), ("chapter", "<i4"), ("layer", "<i4"), ("time", "<f8"),
                             ("value", "<f8")])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with h5py.File(path, "w") as f:
        rows = [tuple(span) + (0, -1)[len(span) - 5:] for span in spans]  # bytes, peer
        f.create_dataset("spans", data=np.array(rows, dtype=span_dtype), maxshape=(None,))
        f.create_dataset("scalars", data=np.array(scalars, dtype=scalar_dtype), maxshape=(None,))
        f.attrs.update({"format": "mpff-trace", "format_version": 1, "rank": 0, "world_size": 1,
                        "host": "old", "device": "cpu", "status": "finished", "clock_offset": 0.0,
                        "wall_start": wall[0], "wall_end": wall[1], "config": cfg.to_json()})


# ------------------------------------------------------------------ trace format 2

def test_trace_v2_is_self_describing_with_1_based_chapters(tmp_path):
    path = write_trace(tmp_path / "run", [("train", 0, 0, 1.0, 2.0), ("setup", -1, -1, 0.0, 1.0),
                                          ("send", 3, 1, 2.0, 2.5, 640, 1)],
                       scalars=[("test_accuracy", 3, -1, 0.5), ("peak_host_mem", -1, -1, 1e6)])
    with h5py.File(path, "r") as f:
        assert f.attrs["format_version"] == 2
        assert f.attrs["chapter_base"] == 1 and f.attrs["layer_base"] == 0
        assert f.attrs["time_units"] == "s" and "rank 0" in f.attrs["time_base"]
        spans, scalars = f["spans"], f["scalars"]
        info = h5py.check_string_dtype(spans.dtype["kind"])
        assert info is not None and info.length is None and info.encoding == "utf-8"  # not S12
        assert h5py.check_string_dtype(scalars.dtype["name"]).length is None
        for field in spans.dtype.names:
            assert f"{field}_units" in spans.attrs and spans.attrs[f"{field}_meaning"], field
        assert spans.attrs["start_units"] == "s" and spans.attrs["bytes_units"] == "B"
        assert "1-based" in spans.attrs["chapter_meaning"]
        units = json.loads(scalars.attrs["value_units"])
        assert units["test_accuracy"].startswith("fraction") and units["peak_host_mem"].startswith("B")
        rows = spans[()]
        # no NUL padding to strip: the kind reads back as exactly what was written
        assert [k.decode() for k in rows["kind"]] == ["train", "setup", "send"]
        assert rows["chapter"].tolist() == [1, -1, 4]   # 0-based in, 1-based stored, -1 kept
        acc = scalars[()][[n == b"test_accuracy" for n in scalars[()]["name"]]]
        assert acc["chapter"].tolist() == [4]
        # the tracer adds a memory counter at each flush
        assert any(n == b"host_mem" for n in scalars[()]["name"])


def test_version_1_traces_read_as_1_based_and_model_0_based(tmp_path):
    cfg = small_config()
    spans = [("setup", -1, -1, 0.0, 1.0), ("train", 0, 0, 1.0, 2.0), ("train", 0, 1, 2.0, 3.5),
             ("train", 0, 2, 3.5, 4.0), ("eval", 0, -1, 4.0, 4.5), ("train", 1, 0, 5.0, 6.0)]
    write_v1_trace(trace_path(str(tmp_path / "old"), 0), spans, [("test_accuracy", 0, -1, 0.0, 0.25)], cfg)
    (tmp_path / "old" / "run.json").write_text(json.dumps({"status": "finished", "world_size": 1}))
    # the same spans through today's Tracer
    write_trace(tmp_path / "new", spans, scalars=[("test_accuracy", 0, -1, 0.25)], cfg=cfg)
    (tmp_path / "new" / "run.json").write_text(json.dumps({"status": "finished", "world_size": 1}))
    old, new = report.load_run(str(tmp_path / "old")), report.load_run(str(tmp_path / "new"))
    for run in (old, new):
        rt = run.ranks[0]
        assert rt.kinds.tolist() == ["setup", "train", "train", "train", "eval", "train"]
        assert rt.spans["chapter"].tolist() == [-1, 1, 1, 1, 1, 2]
        assert summary.accuracy_by_chapter(run) == {1: 0.25}
        # the plan's 0-based chapters for the task-graph model, from either version
        assert summary.task_durations(run) == pytest.approx(
            {("train", 0, 0): 1.0, ("train", 0, 1): 1.5, ("train", 0, 2): 0.5, ("eval", 0, -1): 0.5,
             ("train", 1, 0): 1.0})
    assert report.analyze_run(str(tmp_path / "old")).accuracy_by_chapter == {1: 0.25}


def test_a_newer_trace_version_is_a_clear_error(tmp_path):
    path = write_trace(tmp_path / "run", [("train", 0, 0, 1.0, 2.0)])
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = trace.FORMAT_VERSION + 1
    with pytest.raises(ConfigError, match="newer than this mpff reads"):
        runs.read_trace(path)


# ------------------------------------------------------------------ figures

def _run_with_long_name(tmp_path, chapters=40):
    """A 2-rank pipeline of many short chapters, in a directory named like mpff's default."""
    name = "tiny-single_layer-n2-20250101-120000-with-a-long-suffix-from-a-sweep"
    cfg = small_config(chapters=chapters, epochs=chapters)
    ranks = [[("setup", -1, -1, 0.0, 2.0)] + [("train", c, 0, 2.0 + c * 0.1, 2.0 + c * 0.1 + 0.08)
                                               for c in range(chapters)],
             [("setup", -1, -1, 0.0, 2.1)] + [("train", c, 1, 2.1 + c * 0.1, 2.1 + c * 0.1 + 0.07)
                                               for c in range(chapters)]]
    for rank, spans in enumerate(ranks):
        write_trace(tmp_path / name, spans, cfg=cfg, rank=rank, world_size=2, wall=(0.0, 6.5),
                    scalars=[("test_accuracy", c, -1, 0.1 + c / 100) for c in range(0, chapters, 3)])
    (tmp_path / name / "run.json").write_text(json.dumps({"status": "finished", "world_size": 2}))
    return str(tmp_path / name)


def _draw(fig):
    """Lay the figure out as saving it would (Agg), so that extents are final."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig).draw()
    return fig


def _inside(fig, artist) -> bool:
    box = artist.get_window_extent(fig.canvas.get_renderer())
    width, height = fig.bbox.width, fig.bbox.height
    return box.x0 >= -0.5 and box.y0 >= -0.5 and box.x1 <= width + 0.5 and box.y1 <= height + 0.5


def test_figures_fit_a_paper(tmp_path):
    run_dir = _run_with_long_name(tmp_path)
    s = report.analyze_run(run_dir)
    for fig in (figures.timeline_figure(s.run), figures.breakdown_figure(s), figures.accuracy_figure([s])):
        _draw(fig)
        title = fig.get_suptitle()
        assert _inside(fig, fig._suptitle), f"title cut off: {title!r}"
        ax = fig.axes[0]
        for artist in (ax.xaxis.label, ax.yaxis.label, ax.get_legend()):
            if artist is not None and (not hasattr(artist, "get_text") or artist.get_text()):
                assert _inside(fig, artist), artist
    # the breakdown's title names the whole run, wrapped rather than cut
    fig = _draw(figures.breakdown_figure(s))
    assert "\n" in fig.get_suptitle()
    assert fig.get_suptitle().replace("\n", "").replace(": ", ":") == f"{s.name}:time per rank"
    # accuracy: whole, 1-based chapters on the x axis
    fig = _draw(figures.accuracy_figure([s]))
    ticks = [t for t in fig.axes[0].get_xticks() if fig.axes[0].get_xlim()[0] <= t <= fig.axes[0].get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    assert min(s.accuracy_by_chapter) == 1
    # timeline: chapter labels counted from 1 and never overlapping in a row; untraced in the legend
    fig = _draw(figures.timeline_figure(s.run))
    ax = fig.axes[0]
    labels = [t for t in ax.texts if t.get_text().startswith("c")]
    assert labels and min(int(t.get_text()[1:]) for t in labels) == 1
    renderer = fig.canvas.get_renderer()
    by_row: dict[float, list] = {}
    for t in labels:
        by_row.setdefault(round(t.get_position()[1], 3), []).append(t.get_window_extent(renderer))
    for boxes in by_row.values():
        boxes.sort(key=lambda b: b.x0)
        assert all(a.x1 <= b.x0 for a, b in zip(boxes, boxes[1:])), "chapter labels overlap"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "untraced (idle)" in legend
    breakdown_legend = [t.get_text() for t in figures.breakdown_figure(s).axes[0].get_legend().get_texts()]
    assert "untraced (idle)" in breakdown_legend


@pytest.mark.parametrize("name", ["outputs_of_a_sweep_with_underscores_only_in_its_rather_long_name_x",
                                  "x" * 150, "short"])
def test_titles_wrap_to_the_figure(name):
    fig = figures.new_figure(5, 3)
    fig.add_subplot()
    figures.title(fig, f"{name}: time per rank")
    _draw(fig)
    assert _inside(fig, fig._suptitle), fig.get_suptitle()
    assert fig.get_suptitle().replace("\n", "").replace(": ", ":") == f"{name}:time per rank"


def test_every_figure_is_a_200_dpi_png_and_a_pdf(tmp_path):
    run_dir = _run_with_long_name(tmp_path, chapters=6)
    assert report.main([run_dir]) == 0
    out = os.path.join(run_dir, "report")
    for name in ("timeline", "breakdown", "accuracy"):
        with open(os.path.join(out, f"{name}.pdf"), "rb") as fh:
            assert fh.read(5) == b"%PDF-"
        png = os.path.join(out, f"{name}.png")
        with open(png, "rb") as fh:
            data = fh.read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        # pHYs: pixels per metre, as matplotlib writes the dpi
        i = data.index(b"pHYs")
        ppm = int.from_bytes(data[i + 4:i + 8], "big")
        assert round(ppm * 0.0254) >= 200, (name, ppm * 0.0254)
    text = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    assert "Chapters are counted from 1." in text


# ------------------------------------------------------------------ model.h5 and the umask

def _save_small_model(path, cfg):
    net = FFNet(cfg.model.dims)
    save_model(str(path), net, cfg, input_mean=np.zeros(784, np.float32),
               input_std=np.ones(784, np.float32), test_accuracy=0.5)


@pytest.fixture
def umask():
    """Set the process umask for one test, restoring it afterwards."""
    saved = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(saved)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_model_files_follow_the_umask(tmp_path, umask, mask, mode):
    """model.h5, and atomic_h5, which every checkpoint file is written with (the tiny run below
    checks real checkpoints)."""
    umask(mask)
    assert current_umask() == mask
    _save_small_model(tmp_path / "model.h5", small_config())
    with atomic_h5(str(tmp_path / "checkpoints" / "c00001" / "rank0000.h5")) as f:
        f.create_dataset("x", data=np.zeros(3))
    for path in (tmp_path / "model.h5", tmp_path / "checkpoints" / "c00001" / "rank0000.h5"):
        assert os.stat(path).st_mode & 0o777 == mode, (path, oct(os.stat(path).st_mode))
    if mask == 0o022:  # what a group shares: readable by the group and the world
        assert os.stat(tmp_path / "model.h5").st_mode & 0o044 == 0o044


def test_model_h5_describes_its_layout(tmp_path):
    cfg = small_config()
    _save_small_model(tmp_path / "model.h5", cfg)
    with h5py.File(tmp_path / "model.h5", "r") as f:
        w = f["layers/0/weight"]
        assert w.shape == (8, 784) and w.attrs["layout"] == "(out_features, in_features)"
        assert f["layers/0/bias"].attrs["layout"] == "(out_features,)"
        assert f["head/weight"].attrs["layout"].startswith("(classes,")
        for name in ("input/mean", "input/std"):
            assert "scale" in f[name].attrs["units"] and f[name].attrs["description"]
        assert "x = (raw / scale - mean) / std" in f["input"].attrs["description"]
        assert "y = x @ weight.T + bias" in f.attrs["weights_layout"]


def test_model_files_without_the_attributes_still_load_and_newer_ones_are_refused(tmp_path):
    cfg = small_config()
    path = tmp_path / "model.h5"
    _save_small_model(path, cfg)
    with h5py.File(path, "a") as f:  # as a file written before the attributes existed
        f.visititems(lambda name, obj: [obj.attrs.__delitem__(k) for k in ("layout", "units",
                                                                              "description")
                                        if k in obj.attrs])
        del f.attrs["weights_layout"]
    model = load_model(str(path))
    assert model.net.dims == cfg.model.dims
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(ConfigError, match="newer than this mpff reads"):
        load_model(str(path))


# ------------------------------------------------------------------ presets and first contact

def test_presets_ship_in_the_package(tmp_path):
    assert preset_names() == ["backprop", "paper", "tiny", "workstation"]
    for name in preset_names():
        packaged = os.path.join(ROOT, "mpff", "presets", f"{name}.toml")
        link = os.path.join(ROOT, "configs", f"{name}.toml")
        assert os.path.islink(link) and os.path.samefile(link, packaged)  # configs/ still works
        assert load(name).to_dict() == load(f"{name}.toml").to_dict() == load(link).to_dict()
        assert load(name).name == name
    with pytest.raises(ConfigError, match="preset name .*paper, tiny, workstation"):
        load("no-such-preset")
    # a file of the same name in the working directory wins over the preset
    own = tmp_path / "tiny.toml"
    own.write_text("[train]\nepochs = 2\nchapters = 2\n")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert load("tiny.toml").train.epochs == 2
    finally:
        os.chdir(cwd)


def test_the_wheel_carries_the_presets(tmp_path):
    """setup.py's package_data: a pip-installed mpff has them, not only a clone."""
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), ROOT]
    try:
        import setuptools  # noqa: F401  (then no isolated build environment is needed)
        cmd.insert(4, "--no-build-isolation")
    except ImportError:
        pass
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = glob.glob(str(tmp_path / "mpff-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for name in preset_names():
        assert f"mpff/presets/{name}.toml" in names


def test_tiny_preset_learns_in_seconds_from_any_directory(tmp_path):
    """`mpff train --config tiny` from a directory outside the clone, one process: above 60 %
    test accuracy, and every file it writes readable by the group under umask 022. The issue's
    budget of 15 s from start to exit is held in benchmarks/tiny_preset.py, with nothing else
    running: here, beside the suite's other tests on two cores, the CPU time counts their load
    too (12.8 s alone, 15.7 s in the suite on 2026-12-04); it is printed."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    # checkpoints on (as a long run has them), to see that they follow the umask too
    proc = subprocess.run([sys.executable, "-m", "mpff", "train", "--config", "tiny", "--out", "run",
                           "--set", "run.checkpoint_every=1"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: os.umask(0o022))
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    print(f"tiny: {100 * info['test_accuracy']:.1f} % in {wall:.1f} s wall, {cpu:.1f} s CPU")
    assert info["test_accuracy"] > 0.60, proc.stdout
    # it learns visibly: accuracy rises from the first chapter to the last
    per_chapter = [info["accuracy_per_chapter"][k] for k in sorted(info["accuracy_per_chapter"], key=int)]
    assert per_chapter[-1] > per_chapter[0] + 0.2
    assert (tmp_path / "run" / "report" / "report.md").is_file()
    # under umask 022 everything the run wrote is readable by the group and the world
    assert glob.glob(str(tmp_path / "run" / "checkpoints" / "*" / "rank*.h5"))
    for folder, _, files in os.walk(tmp_path / "run"):
        for name in files:
            mode = os.stat(os.path.join(folder, name)).st_mode
            assert mode & 0o044 == 0o044, (os.path.join(folder, name), oct(mode))


# ------------------------------------------------------------------ mpff settings and train --help

def test_settings_lists_every_setting_with_its_help(capsys):
    assert settings.main([]) == 0
    out = capsys.readouterr().out
    docs = settings.field_docs()
    for section, cls in SECTIONS.items():
        for field in cls.__dataclass_fields__:
            assert f"{section}.{field} = " in out, field
            assert docs[section][field].split()[0] in out
    assert "model.dims = [784, 2000, 2000, 2000, 2000]  (list of integers)" in out
    assert "run.schedule = \"sequential\"  (string)" in out
    # a preset's values beside the defaults
    assert settings.main(["--config", "tiny", "--set", "train.seed=3"]) == 0
    out = capsys.readouterr().out
    assert "train.lr = 0.1  (number; default 0.01)" in out
    assert "train.seed = 3  (integer; default 0)" in out


def test_settings_toml_is_a_config_file(tmp_path, capsys):
    assert settings.main(["--toml", "--config", "workstation"]) == 0
    text = capsys.readouterr().out
    path = tmp_path / "mine.toml"
    path.write_text(text)
    assert load(str(path)).to_dict() == {**load("workstation").to_dict(), "name": "mine"}
    assert "# Layer widths, input first" in text


def test_settings_errors_are_one_line(capsys):
    assert settings.main(["--config", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mpff settings: error: ") and err.count("\n") == 1


def test_train_epilog_has_schedules_presets_and_examples():
    text = settings.TRAIN_EPILOG
    for schedule in ("sequential", "single_layer", "all_layers", "federated"):
        assert f"  {schedule} " in text
    for name in preset_names():
        assert name in text
    assert "mpff train --config tiny" in text and "mpiexec -n 2 python -m mpi4py -m mpff train" in text
    assert "mpff settings" in text


# ------------------------------------------------------------------ provenance

def test_provenance(monkeypatch):
    for var in list(os.environ):
        if var.startswith("SLURM_"):
            monkeypatch.delenv(var)
    p = provenance(["train", "--config", "tiny", "--set", "run.schedule=all_layers"])
    assert p["command_line"] == "python -m mpff train --config tiny --set run.schedule=all_layers"
    assert p["slurm"] is None
    for key in ("python", "torch", "numpy", "h5py", "mpi4py", "mpff"):
        assert p["versions"][key], key
    assert p["mpff_version"] == p["versions"]["mpff"]
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert p["git_commit"] == head.stdout.strip() and isinstance(p["git_dirty"], bool)
    json.dumps(p)  # run.json must be able to hold it
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4240")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "n[1-2]")
    s = provenance([])["slurm"]
    assert s == {"job_id": "4242", "array_job_id": "4240", "array_task_id": "2",
                 "restart_count": "1", "nodelist": "n[1-2]"}
