"""Every setting with its type, default and meaning, for ``mpff settings`` and ``train --help``.

    python -m mpff settings                      # every setting: type, default, help
    python -m mpff settings --config tiny        # the values a preset (and --set) gives, beside the defaults
    python -m mpff settings --toml > my.toml     # a commented TOML file to edit and pass to --config

(``python -m mpff.settings ...`` does the same.) The help text is the docstring under each
field of the dataclasses in :mod:`mpff.config`, read from its source with :mod:`ast`, so it
is written once. :data:`TRAIN_EPILOG` is the schedules table and example command lines shown
at the end of ``mpff train --help``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
import textwrap
from typing import Any

from . import config as config_mod
from .config import SECTIONS, Config, ConfigError, load, preset_names

#: How each field annotation reads for a user.
TYPE_NAMES = {"int": "integer", "float": "number", "str": "string", "bool": "true or false",
              "tuple[int, ...]": "list of integers"}


def field_docs() -> dict[str, dict[str, str]]:
    """{section: {key: help}} from the string literal under each field in mpff/config.py."""
    tree = ast.parse(inspect.getsource(config_mod))
    classes = {cls.__name__: section for section, cls in SECTIONS.items()}
    docs: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if not (isinstance(node, ast.ClassDef) and node.name in classes):
            continue
        section = docs.setdefault(classes[node.name], {})
        body = node.body
        for field_node, after in zip(body, body[1:] + [None]):
            if (isinstance(field_node, ast.AnnAssign) and isinstance(field_node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                section[field_node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


@dataclasses.dataclass(frozen=True)
class Setting:
    section: str
    key: str
    type: str        # as a user reads it: integer, number, string, ...
    default: Any
    value: Any       # under the configuration asked for (the default without one)
    help: str

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"


def settings(cfg: Config | None = None) -> list[Setting]:
    """Every setting, in the order of mpff/config.py; ``value`` from ``cfg`` (default: defaults)."""
    docs = field_docs()
    values = (cfg or Config()).to_dict()
    out = []
    for section, cls in SECTIONS.items():
        defaults = Config().to_dict()[section]
        for f in dataclasses.fields(cls):
            help_text = docs.get(section, {}).get(f.name)
            if help_text is None:  # internal invariant: every field is documented
                raise AssertionError(f"{cls.__name__}.{f.name} has no docstring in mpff/config.py")
            out.append(Setting(section, f.name, TYPE_NAMES.get(str(f.type), str(f.type)),
                               defaults[f.name], values[section][f.name], help_text))
    return out


def _toml(value: Any) -> str:
    return config_mod.toml_value(value)


def as_text(items: list[Setting], width: int = 100) -> str:
    lines = []
    section = None
    for s in items:
        if s.section != section:
            section = s.section
            lines += ["" if lines else None, f"[{section}]"]
        value = f"{s.name} = {_toml(s.value)}"
        note = f"({s.type}" + (f"; default {_toml(s.default)})" if s.value != s.default else ")")
        lines.append(f"{value}  {note}")
        lines += textwrap.wrap(s.help, width, initial_indent="    ", subsequent_indent="    ")
    return "\n".join(line for line in lines if line is not None) + "\n"


def as_toml(items: list[Setting], name: str) -> str:
    lines = [f"# mpff settings ({name}): every setting with its meaning; edit, then",
             "#   mpff train --config THIS_FILE [--set section.key=value ...]",
             "# Keys left out take their defaults (mpff settings lists them).", ""]
    section = None
    for s in items:
        if s.section != section:
            if section is not None:
                lines.append("")
            section = s.section
            lines.append(f"[{section}]")
        lines += textwrap.wrap(s.help, 96, initial_indent="# ", subsequent_indent="# ")
        default = f"  # default {_toml(s.default)}" if s.value != s.default else ""
        lines.append(f"{s.key} = {_toml(s.value)}{default}")
    return "\n".join(lines) + "\n"


SCHEDULES_TABLE = """\
schedules (--set run.schedule=...; N ranks, L layers):
  sequential     1 rank        every task on rank 0: plain chapter-wise FF
  single_layer   1 <= N <= L   rank k owns layer k (a block of layers when L > N) and
                               recomputes its inputs through the layers below it
  all_layers     any N         chapter c on rank c mod N; each layer goes round the ring
                               as soon as it is trained
  federated      any N         All Layers where each rank trains only on its own data shard
  data_parallel  any N         backprop (train.algorithm = "backprop"): every rank takes a slice
                               of every batch, DDP averages the gradients (run.scaling)"""

TRAIN_EPILOG = f"""\
{SCHEDULES_TABLE}

presets (--config NAME from any directory, or --config FILE.toml): {', '.join(preset_names())}
  tiny: seconds on one core (smoke test); workstation: about a minute on 2 cores;
  paper: the paper's 4 x 2000 network, E = S = 100 (hours on a CPU: use GPUs);
  backprop: the same network as an MLP trained with backpropagation (FF against BP)

examples:
  mpff train --config tiny
  mpiexec -n 2 python -m mpi4py -m mpff train --config workstation --set run.schedule=all_layers
  mpiexec -n 4 python -m mpi4py -m mpff train --config paper --set run.schedule=single_layer \\
      --set train.negatives=random --out outputs/paper-sl4
  mpff train --config workstation --set train.epochs=4 --set train.chapters=4 --out outputs/short
  mpiexec -n 4 python -m mpi4py -m mpff train --resume --out outputs/paper-sl4   # after a stop
  mpff report outputs/paper-sl4          # tables and figures (also written at the end of a run)

Launch MPI runs through `python -m mpi4py` so that an error on one rank ends the whole job.
Every setting, its default and its meaning: mpff settings (--toml writes an editable file)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpff settings",
        description="Print every setting (section.key) with its type, default and meaning; with "
                    "--config/--set, the values they give. Set one with --set section.key=value "
                    "or in a TOML file's [section].",
        epilog=SCHEDULES_TABLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="PRESET_OR_FILE",
                        help=f"show the values of a preset ({', '.join(preset_names())}) or TOML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set train.epochs=4 (repeatable)")
    parser.add_argument("--toml", action="store_true",
                        help="print a commented TOML file instead (to edit and pass to --config)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``mpff settings`` (argv excludes the word 'settings'); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse printed usage (2) or help (0)
        return int(exc.code or 0)
    try:
        cfg = load(args.config, args.overrides) if (args.config or args.overrides) else None
    except ConfigError as exc:
        print(f"mpff settings: error: {exc}", file=sys.stderr)
        return 2
    items = settings(cfg)
    name = cfg.name if cfg is not None and args.config else "defaults"
    sys.stdout.write(as_toml(items, name) if args.toml else as_text(items))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
