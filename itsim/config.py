"""One dataclass per job; flags, YAML/TOML files and saved copies all derive from it.

Precedence: dataclass defaults < config file (`--config FILE`) < flags given on the command line.
The resolved config is printed at start and saved beside the job's outputs, so a run can always be
explained and repeated.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from itsim.errors import UserError

T = TypeVar("T")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def secret_field(default: Any = None, help: str = "") -> Any:
    """A field whose value is never printed, saved or passed on: `to_dict` (config.yaml, manifests,
    trackers) leaves it out, `describe` shows only whether it is set, `repr` omits it. For settings
    that may hold credentials, such as storage options; a saved config reloads without them, so they
    come again from the flag, the config file or the environment."""
    return dataclasses.field(default=default, repr=False, metadata={"help": help, "secret": True})


def _secret(field: dataclasses.Field) -> bool:
    return bool(field.metadata.get("secret"))


def _base_type(tp: Any) -> Any:
    """Optional[X] / X | None -> X."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def _parse_value(tp: Any, raw: Any) -> Any:
    tp = _base_type(tp)
    origin = typing.get_origin(tp)
    if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null") and tp is not str):
        return None
    if origin is typing.Literal:
        if raw not in typing.get_args(tp):
            raise ValueError(f"{raw!r} is not one of {typing.get_args(tp)}")
        return raw
    if origin is dict or tp is dict:  # a JSON object on the command line, a mapping in a config file
        value = raw
        if isinstance(raw, str):
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as exc:  # the message names the position, never the text
                raise ValueError(f"not a JSON object ({exc.msg} at character {exc.pos})") from None
        if not isinstance(value, dict):
            raise ValueError("not a JSON object")
        return value
    if origin in (tuple, list):
        (item,) = typing.get_args(tp)[:1] or (str,)
        items = raw.split(",") if isinstance(raw, str) else list(raw)
        items = [_parse_value(item, x.strip() if isinstance(x, str) else x) for x in items if x != ""]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        if str(raw).lower() in ("1", "true", "yes", "on"):
            return True
        if str(raw).lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"not a boolean: {raw!r}")
    if tp in (int, float, str):
        return tp(raw)
    return raw


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per dataclass field; help text from the field's `metadata={"help": ...}`."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        tp = _base_type(hints[field.name])
        default = field.default if field.default is not dataclasses.MISSING else (
            field.default_factory() if field.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        help_text = field.metadata.get("help", "")
        help_text = f"{help_text} (default: {default})" if help_text else f"default: {default}"
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text, "dest": field.name}
        if tp is bool:
            parser.add_argument(_flag(field.name), action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if typing.get_origin(tp) is typing.Literal:
            kwargs["choices"] = typing.get_args(tp)
        parser.add_argument(_flag(field.name), type=str, metavar=field.name.upper(), **kwargs)


def load_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".toml":
        data = tomllib.loads(text)
    else:
        data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must hold a mapping of field: value")
    return data


def build(cls: type[T], file_values: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Defaults < file < overrides, each value parsed to the field's type; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for source in (file_values or {}, overrides or {}):
        for key, raw in source.items():
            key = key.replace("-", "_")
            if key not in names:
                raise ValueError(f"unknown {cls.__name__} option {key!r}; known: {', '.join(sorted(names))}")
            try:
                values[key] = _parse_value(hints[key], raw)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"option {key}: {exc}") from None
    return cls(**values)


def from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Config from parsed flags, reading `args.config` (a YAML/TOML file) first when given.

    Any problem with the file or a value is a UserError: one clear line for the user, no traceback.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    try:
        file_values = load_file(args.config) if getattr(args, "config", None) else None
        return build(cls, file_values, overrides)
    except (OSError, ValueError, TypeError, yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise UserError(str(exc)) from None


def add_command(subparsers: Any, name: str, cls: type, func: Any, help: str, description: str | None = None,
                skip: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """A subcommand whose flags are `cls`'s fields, plus `--config FILE`; returns the parser."""
    parser = subparsers.add_parser(name, help=help, description=description or help)
    parser.add_argument("--config", metavar="FILE", help=f"YAML/TOML file of {cls.__name__} fields (flags override it)")
    add_arguments(parser, cls, skip=skip)
    parser.set_defaults(func=func)
    return parser


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as JSON-able values, without its secret fields (see `secret_field`)."""
    values = dataclasses.asdict(cfg)
    for field in dataclasses.fields(cfg):
        if _secret(field):
            del values[field.name]
    return json.loads(json.dumps(values, default=str))


def describe(cfg: Any) -> str:
    lines = [f"  {k}: {v}" for k, v in to_dict(cfg).items()]
    lines += [f"  {f.name}: {'<set, not shown>' if getattr(cfg, f.name) else None}"
              for f in dataclasses.fields(cfg) if _secret(f)]
    return f"{type(cfg).__name__}:\n" + "\n".join(lines)


def save(cfg: Any, path: str | Path) -> None:
    """YAML beside the outputs; loadable again with `--config`."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def check(cfg: Any, required: tuple[str, ...] = (), rules: list[tuple[bool, str]] | None = None) -> None:
    """Every command's input check: one UserError listing each missing flag and each broken rule
    (`(ok, message)`), so a user fixes them all in one go instead of one per run."""
    problems = [f"--{name.replace('_', '-')} is required" for name in required if not getattr(cfg, name)]
    problems += [message for ok, message in rules or () if not ok]
    if problems:
        raise UserError("; ".join(problems))
