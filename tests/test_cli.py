"""The `itsim` command line as a whole: every command's `--help`, and config files (TOML, YAML) against flags.

The commands come from `itsim.cli.COMMANDS`, so a new command is covered (and must name its config
dataclass in CONFIGS below, or the first test fails).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import json
import os
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest

from itsim import config
from itsim.cli import COMMANDS
from itsim.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]


def _configs() -> dict[str, type]:
    from itsim.data.shards import ShardConfig
    from itsim.data.synth.writer import SynthConfig
    from itsim.demo import DemoConfig
    from itsim.eval import EvalConfig
    from itsim.model.export import ExportConfig
    from itsim.score.config import ScoreConfig
    from itsim.train import TrainConfig

    return {"synth": SynthConfig, "build-shards": ShardConfig, "train": TrainConfig, "eval": EvalConfig,
            "score": ScoreConfig, "demo": DemoConfig, "export": ExportConfig}


CONFIGS = _configs()
# Fields a command takes other than as `--field VALUE`: synth's output folder is positional; score's
# --input takes several values.
POSITIONAL = {("synth", "out")}
MULTI = {("score", "input")}


def test_every_command_has_its_config_class_here():
    assert set(CONFIGS) == set(COMMANDS)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_of_every_command_exits_0_and_lists_every_flag(command, capsys):
    with pytest.raises(SystemExit) as done:
        cli_main([command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: itsim {command}")
    assert "--config" in text
    for field in dataclasses.fields(CONFIGS[command]):
        flag = "--" + field.name.replace("_", "-")
        if (command, field.name) in POSITIONAL:
            assert f" {field.name}" in text, (command, field.name)
        elif typing.get_type_hints(CONFIGS[command])[field.name] is bool:
            assert f"{flag}, --no-{flag[2:]}" in text, (command, flag)
        else:
            assert flag in text, (command, flag)


def _base(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _other_value(cls: type, field: dataclasses.Field):
    """A value of the field's type that differs from its default."""
    tp = _base(typing.get_type_hints(cls)[field.name])
    default = field.default if field.default is not dataclasses.MISSING else None
    if typing.get_origin(tp) is typing.Literal:
        return next(c for c in typing.get_args(tp) if c != default)
    if typing.get_origin(tp) is tuple:
        item = typing.get_args(tp)[0]
        return {int: (5, 6), float: (0.7, 0.2, 0.1), str: ("a.csv", "b.csv")}[item]
    if tp is bool:
        return not default
    if tp is int:
        return (default or 0) + 3
    if tp is float:
        return (default or 0.0) + 0.25
    assert tp is str, (cls.__name__, field.name, tp)
    return f"v_{field.name}"


def _flags(command: str, values: dict) -> list[str]:
    out: list[str] = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if (command, name) in POSITIONAL:
            out.append(str(value))
        elif (command, name) in MULTI:
            out += [flag, *value]
        elif isinstance(value, bool):
            out.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, tuple):
            out += [flag, ",".join(map(str, value))]
        else:
            out += [flag, str(value)]
    return out


def _toml(values: dict) -> str:
    """TOML for str/int/float/bool/tuple values (JSON's spelling of these is TOML's)."""
    return "".join(f"{name} = {json.dumps(list(v) if isinstance(v, tuple) else v)}\n" for name, v in values.items())


def _parse(command: str, argv: list[str]):
    """Flags -> the command's config through the real parser and `config.from_args`, as the CLI does."""
    parser = argparse.ArgumentParser(prog="itsim")
    importlib.import_module(COMMANDS[command]).add_cli(parser.add_subparsers(dest="command"))
    return config.from_args(CONFIGS[command], parser.parse_args([command, *argv]))


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_config_file_gives_the_same_config_as_flags_and_flags_override_it(command, suffix, tmp_path):
    cls = CONFIGS[command]
    # Every field off its default; secret fields (storage options) are never saved, so a saved config
    # cannot give them back (tests/test_storage.py checks them).
    values = {f.name: _other_value(cls, f) for f in dataclasses.fields(cls) if not f.metadata.get("secret")}
    expected = cls(**values)
    assert all(getattr(expected, k) != getattr(cls(), k) for k in values)
    assert _parse(command, _flags(command, values)) == expected
    path = tmp_path / f"cfg{suffix}"
    if suffix == ".toml":
        path.write_text(_toml(values))
    else:
        config.save(expected, path)  # the copy every command saves beside its outputs
    positional = [str(values[n]) for c, n in POSITIONAL if c == command]
    assert _parse(command, ["--config", str(path), *positional]) == expected
    # A flag given beside the file wins over the file: one field set back to its default by a flag.
    name = next(f.name for f in dataclasses.fields(cls)
                if (command, f.name) not in POSITIONAL | MULTI and getattr(cls(), f.name) not in (None, "", ()))
    default = getattr(cls(), name)
    got = _parse(command, ["--config", str(path), *positional, *_flags(command, {name: default})])
    assert got == dataclasses.replace(expected, **{name: default}) != expected


def test_synth_from_a_toml_file_writes_the_same_files_as_from_flags(tmp_path):
    """The whole command, as a user runs it: identical bytes either way."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    flags = ["--images", "3", "--seed", "7", "--min-size", "64", "--max-size", "80", "--captions-per-image", "2"]
    toml = tmp_path / "synth.toml"
    toml.write_text('images = 3\nseed = 7\nmin_size = 64\nmax_size = 80\ncaptions_per_image = 2\n')
    for name, args in (("flags", flags), ("toml", ["--config", str(toml)])):
        done = subprocess.run([sys.executable, "-m", "itsim.cli", "synth", str(tmp_path / name), *args], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]

    def files(folder: Path) -> dict[str, str]:
        return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.endswith(".yaml")}

    made = files(tmp_path / "flags")
    assert sum(k.startswith("images/") for k in made) == 3 and "results.csv" in made
    assert files(tmp_path / "toml") == made
