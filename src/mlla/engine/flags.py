"""Command-line flags written from a task's settings dataclass (each field's name, type, default
and help), and the one way parsed flags become settings (:func:`settings_from_args`).

A flag that belongs to another task's settings is refused with a message naming both tasks;
``--preset`` lists the task's own presets only.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from typing import Any, Callable, Mapping

from .config import TrainConfig, parse_kwargs
from .task import Task

__all__ = ["add_settings_arguments", "flag_name", "print_settings", "settings_from_args"]

#: Flags of a training command that are not settings.
_COMMAND_FLAGS = ("preset", "config", "print_config")


def flag_name(name: str) -> str:
    """``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def _optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse_optional(text: str) -> Any:
        return None if text.lower() in ("none", "null", "off", "") else parse(text)

    parse_optional.__name__ = getattr(parse, "__name__", "value")
    return parse_optional


def _sequence(kind: type, length: int | None) -> Callable[[str], tuple]:
    example = {int: "480,512,800", float: "0.9,0.999"}[kind]

    def parse(text: str) -> tuple:
        parts = [t for t in text.lower().replace("x", ",").split(",") if t.strip()]
        try:
            values = tuple(kind(t) for t in parts)
        except ValueError:
            values = None
        if values is None or (length is not None and len(values) != length):
            count = f"{length} " if length else ""
            raise argparse.ArgumentTypeError(f"expected {count}{kind.__name__}s separated by commas like "
                                             f"{','.join(example.split(',')[:length or 3])}, got {text!r}")
        return values

    parse.__name__ = f"{kind.__name__}s"
    return parse


def _argument(f: dataclasses.Field, hint: Any) -> dict[str, Any]:
    """``add_argument`` options for a settings field of type ``hint``."""
    meta = f.metadata
    options: dict[str, Any] = {"help": meta.get("help") or None}
    if "choices" in meta:
        options["choices"] = meta["choices"]
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if hint is bool:
        return dict(options, action=argparse.BooleanOptionalAction)
    if origin is dict:
        return dict(options, nargs="*", metavar="NAME=VALUE")
    if origin is tuple:
        parse = _sequence(args[0], None if args[-1] is Ellipsis else len(args))
    elif hint in (int, float, str):
        parse = hint
    else:
        raise TypeError(f"setting {f.name}: no flag for type {hint!r}")
    return dict(options, type=_optional(parse) if optional else parse)


class _RefuseForeign(argparse.Action):
    """A flag of another task's settings: refused, naming both tasks."""

    def __init__(self, option_strings: list[str], dest: str, *, task: str, owners: list[str], **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS, **kwargs)
        self.task, self.owners = task, owners

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option_string: str | None = None) -> None:
        parser.error(f"{option_string} does not apply to the {self.task} task (it is a setting of "
                     f"{' and '.join(self.owners)}); see `{parser.prog} --help` for the {self.task} task's settings")


def add_settings_arguments(
    parser: argparse.ArgumentParser,
    task: type[Task],
    *,
    others: Mapping[str, type[Task]] = {},
    preset_help: str = "recipe preset",
) -> None:
    """Add ``--preset``, ``--config``, ``--print-config`` and a flag per field of
    ``task.settings`` (in the fields' groups) to ``parser``, whose ``argument_default`` must be
    ``argparse.SUPPRESS`` (only given flags are set). ``others``: the other tasks by name, whose
    settings' flags are refused with a message."""
    cls = task.settings
    hints = typing.get_type_hints(cls)
    groups: dict[str, argparse._ArgumentGroup] = {}
    run = groups["run"] = parser.add_argument_group("run")
    run.add_argument("--preset", choices=sorted(task.presets), help=preset_help)
    run.add_argument("--config", help="YAML file of settings (keys as the flags, with _ for -), e.g. a run's config.yaml")
    run.add_argument("--print-config", action="store_true", help="print the resolved settings this task uses and exit")
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if meta.get("flag", True) is False:
            continue
        group = groups.get(meta["group"]) or groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        names = ([meta["short"]] if "short" in meta else []) + [flag_name(f.name)]
        group.add_argument(*names, dest=f.name, **_argument(f, hints[f.name]))
    owners: dict[str, list[str]] = {}
    for name, other in others.items():
        if other is task:
            continue
        other_hints = typing.get_type_hints(other.settings)
        for f in dataclasses.fields(other.settings):
            if f.name not in cls.__dataclass_fields__ and f.metadata.get("flag", True) is not False:
                flags = [flag_name(f.name)] + ([f"--no-{f.name.replace('_', '-')}"] if other_hints[f.name] is bool else [])
                for flag in flags:
                    owners.setdefault(flag, []).append(f"the {name} task")
    for flag, who in owners.items():
        parser.add_argument(flag, dest=f"_foreign_{flag}", action=_RefuseForeign, task=task.name, owners=who)


def settings_from_args(task: type[Task], args: argparse.Namespace) -> TrainConfig:
    """The task's settings from flags parsed by a parser of :func:`add_settings_arguments`:
    defaults < ``--preset`` (or the task's default one) < ``--config`` < flags."""
    given = {k: v for k, v in vars(args).items() if k in task.settings.__dataclass_fields__}
    if "model_kwargs" in given:
        given["model_kwargs"] = parse_kwargs(given["model_kwargs"])
    preset = getattr(args, "preset", None)
    yaml_path = getattr(args, "config", None)
    if preset is None and yaml_path is None:
        preset = task.default_preset(given)
    return task.resolve_settings(preset, yaml_path, given)


def print_settings(cfg: TrainConfig) -> None:
    """Print the settings a run uses (``--print-config``), as JSON."""
    unused = cfg.unused()
    print(json.dumps({k: v for k, v in cfg.to_dict().items() if k not in unused}, indent=1))
