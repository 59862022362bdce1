"""``foldhpc init [--preset tiny|default|gpu|large] [--data DIR] [--force] FILE``: a starter config.

The presets are the repository's ``configs/*.toml``. They also ship inside the package as
``foldhpc/configs/`` (pyproject.toml maps the package ``foldhpc.configs`` onto the top-level
``configs/`` folder, so there is one copy of each), which is what a ``pip install`` from a wheel,
without a clone, has. The file written is the preset with comments: how to get going, what each
section is for and the keys it leaves at their defaults; ``--data`` sets ``data.path``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import textwrap
from pathlib import Path

import foldhpc
from foldhpc.config import Config, ConfigError, _toml_value, load_config
from foldhpc.records.exitcodes import ExitCode

PRESETS = ("tiny", "default", "gpu", "large")
DEFAULT_PRESET = "default"

_SECTION_RE = re.compile(r"^\[(\w+)\]\s*(#.*)?$")
_KEY_RE = re.compile(r"^(\w+)\s*=")

GETTING_GOING = """\
Getting going:
  1. Put protein structures in one folder: PDB (.pdb, .ent) or mmCIF (.cif, .mmcif) files,
     optionally gzipped (.gz), e.g. downloaded from the RCSB PDB. foldhpc trains on each file's
     primary protein chain; files it cannot use are listed with the reason.
  2. Point data.path below at that folder (a relative path is taken from where foldhpc runs).
  3. foldhpc data info --config {file}   # what was found, what was skipped and why
  4. foldhpc train --config {file}       # trains into run.dir; run it again to resume
     foldhpc submit --config {file}      # the same as a Slurm job that requeues itself
     foldhpc status {run_dir}
Any key can be changed for one run: --set train.max_steps=200 --set run.dir=runs/try1
Keys not written here keep their defaults (each section's comment lists them); an unknown key or
a wrong value is refused before anything runs."""


def configs_dir() -> Path:
    """Where the preset TOML files are: inside the installed package (a wheel), else the
    repository's ``configs/`` beside the ``foldhpc`` folder (a source checkout or an editable
    install made before the packaging mapped it)."""
    pkg = Path(foldhpc.__file__).resolve().parent
    for d in (pkg / "configs", pkg.parent / "configs"):
        if (d / f"{DEFAULT_PRESET}.toml").is_file():
            return d
    raise FileNotFoundError(f"foldhpc's starter configs are missing (looked in {pkg / 'configs'} and "
                            f"{pkg.parent / 'configs'}): reinstall foldhpc")


def preset_path(name: str) -> Path:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return configs_dir() / f"{name}.toml"


_NBSP = "\u00a0"  # textwrap does not break at it: keeps "key = value" on one line


def _comment(text: str) -> list[str]:
    out: list[str] = []
    for para in text.splitlines():
        wrapped = textwrap.wrap(para, width=98, subsequent_indent="  ") if para.strip() else [""]
        out += [f"# {w}".rstrip().replace(_NBSP, " ") for w in wrapped]
    return out


def _value(v: object) -> str:
    return "{}" if v == {} else _toml_value(v)


def _section_doc(section: str) -> str:
    cls = type(getattr(Config(), section))
    return (cls.__doc__ or "").strip().splitlines()[0].replace("``", "`")


def _defaults(section: str) -> dict[str, object]:
    return dataclasses.asdict(getattr(Config(), section))


def starter_text(preset: str = DEFAULT_PRESET, data: str | None = None, file_name: str = "FILE") -> str:
    """The commented starter config for ``preset`` (``data`` replaces ``data.path``)."""
    lines = preset_path(preset).read_text().splitlines()
    intro = []
    while lines and (lines[0].startswith("#") or not lines[0].strip()):
        intro.append(lines.pop(0).lstrip("# ").rstrip())
    # which keys each section of the preset sets
    set_keys: dict[str, list[str]] = {}
    section = ""
    for ln in lines:
        m = _SECTION_RE.match(ln.strip())
        if m:
            section = m.group(1)
            set_keys.setdefault(section, [])
        elif section and (k := _KEY_RE.match(ln.strip())):
            set_keys[section].append(k.group(1))
    run_dir = re.search(r'^dir\s*=\s*"([^"]*)"', "\n".join(lines), re.M)
    out = [f"# foldhpc starter config, preset {preset!r} (written by `foldhpc init`, foldhpc {foldhpc.__version__})."]
    out += _comment(" ".join(x for x in intro if x))
    out += ["#"] + _comment(GETTING_GOING.format(file=file_name, run_dir=run_dir.group(1) if run_dir else "RUN_DIR"))
    out.append("")
    section = ""
    for ln in lines:
        m = _SECTION_RE.match(ln.strip())
        if m:
            section = m.group(1)
            out.append(ln)
            others = {k: v for k, v in _defaults(section).items() if k not in set_keys[section]}
            doc = _section_doc(section)
            if others:
                doc += " Other keys (default): " + ", ".join(f"{k}{_NBSP}={_NBSP}{_value(v)}".replace(" ", _NBSP)
                                                             for k, v in others.items())
            out += _comment(doc)
            continue
        if section == "data" and data is not None and (k := _KEY_RE.match(ln.strip())) and k.group(1) == "path":
            ln = f"path = {json.dumps(data)}"
        out.append(ln)
    if data is not None and "path" not in set_keys.get("data", []):
        raise ConfigError(f"preset {preset!r} has no data.path to replace")  # pragma: no cover - every preset has one
    for section in ("slurm", "fault"):  # what a cluster user will want to see, commented out
        if section in set_keys:
            continue
        out += ["", f"# [{section}]"] + _comment(_section_doc(section) + " Uncomment to change:")
        out += [f"# {k} = {_value(v)}" for k, v in _defaults(section).items()]
    return "\n".join(out).rstrip() + "\n"


def write_starter(path: Path, preset: str = DEFAULT_PRESET, data: str | None = None, force: bool = False) -> str:
    """Write the starter config to ``path`` (never over an existing file unless ``force``);
    returns the text. Raises FileExistsError."""
    text = starter_text(preset, data, file_name=str(path))
    if path.exists() and not force:
        raise FileExistsError(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    load_config(path)  # what was written must load: a failure here is a bug in this module
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="where to write the config (.toml); - prints it")
    p.add_argument("--preset", choices=PRESETS, default=DEFAULT_PRESET,
                   help="tiny: seconds on a CPU (tests); default: CPU demo, minutes; gpu: one GPU, bf16, "
                        "torch.compile; large: an OpenFold-sized trunk for one GPU (default: %(default)s)")
    p.add_argument("--data", metavar="DIR", help="set data.path: the folder of .pdb/.cif files (optionally .gz)")
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists")


def run(args: argparse.Namespace) -> int:
    if args.file == "-":
        sys.stdout.write(starter_text(args.preset, args.data, file_name="FILE"))
        return 0
    path = Path(args.file)
    try:
        write_starter(path, args.preset, args.data, force=args.force)
    except FileExistsError:
        print(f"foldhpc init: {path} exists; not overwritten (use --force to replace it)", file=sys.stderr)
        return ExitCode.USAGE
    except OSError as e:
        print(f"foldhpc init: cannot write {path}: {e.strerror or e}", file=sys.stderr)
        return ExitCode.USAGE
    cfg = load_config(path)
    print(f"wrote {path} (preset {args.preset})")
    data_path = Path(cfg.data.path)
    if not data_path.is_dir():
        print(f"next: put .pdb/.cif files (optionally .gz) in {data_path} -- it does not exist yet"
              f"{' here' if not data_path.is_absolute() else ''} -- or set data.path in {path} (or rerun with "
              "--data DIR)")
    print(f"then: foldhpc train --config {path}")
    return 0
