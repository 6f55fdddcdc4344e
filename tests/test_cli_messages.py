"""Every flag an error or warning message tells the user to give exists on the commands that can
show that message (a message pointing at a missing knob is worse than none)."""
from __future__ import annotations

import argparse
import ast
import re
import shlex
from pathlib import Path

import pytest

import mlla
from mlla.cli import build_parser

SRC = Path(mlla.__file__).resolve().parent
_TRAIN = ("train", "det train", "seg train")
_READ_DATA = _TRAIN + ("validate", "det eval", "seg eval", "ablate")
#: Which commands can show a message of a module (by path prefix; the first match wins). A flag of
#: a shared module's message must exist on all of them; one of a command module's, on one of its commands.
_SHOWN_BY = (
    ("engine/task.py", _TRAIN + ("det eval", "seg eval"), any),  # the Task protocol: training and from_checkpoint
    ("engine/", _TRAIN, all),
    ("data/", _READ_DATA, all),
    ("tasks/classification/", ("train",), all),
    ("tasks/detection/", ("det train",), all),
    ("tasks/segmentation/", ("seg train",), all),
    ("tasks/study/analyze", ("analyze",), all),
    ("tasks/study/", ("ablate",), all),
    ("checkpoint.py", ("validate", "convert", "train"), any),
    ("benchmark.py", ("benchmark",), any),
    ("ops/mlla_attn/backend.py", _TRAIN + ("validate", "det eval", "seg eval", "det predict", "seg predict", "benchmark"), all),
    ("commands/det.py", ("det train", "det eval", "det predict"), any),
    ("commands/seg.py", ("seg train", "seg eval", "seg predict"), any),
    ("commands/_task.py", ("det train", "det eval", "det predict", "seg train", "seg eval", "seg predict"), any),
)
_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _message_flags() -> list[tuple[str, int, str]]:
    """``(module, line, flag)`` for each flag in a raised error's or a logged warning's text (or
    in a function that writes one)."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        module = path.relative_to(SRC).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                message = node.exc
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr in ("warning", "error", "warn", "exception", "critical")):
                message = node
            elif isinstance(node, ast.FunctionDef) and ("message" in node.name or "error" in node.name):
                message = node  # a function that writes a message (e.g. TooManyFailedSamples')
            else:
                continue
            for const in ast.walk(message):
                if isinstance(const, ast.Constant) and isinstance(const.value, str):
                    found += [(module, const.lineno, flag) for flag in _FLAG.findall(const.value)]
    return found


def _command(parser: argparse.ArgumentParser, path: str) -> argparse.ArgumentParser:
    for name in path.split():
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


def _accepts(parser: argparse.ArgumentParser, flag: str) -> bool:
    action = parser._option_string_actions.get(flag)
    return action is not None and action.help != argparse.SUPPRESS


def test_every_flag_a_message_names_is_accepted_by_its_commands():
    parser = build_parser()
    flags = _message_flags()
    assert len(flags) > 40  # the scan reads the messages (not an empty pass)
    missing = []
    for module, line, flag in flags:
        rule = next(((cmds, need) for prefix, cmds, need in _SHOWN_BY if module.startswith(prefix)), None)
        if rule is None:
            commands, need = (module.removeprefix("commands/").removesuffix(".py"),), any
        else:
            commands, need = rule
        if flag == "--help" or module == "cli.py":
            continue
        if not need(_accepts(_command(parser, c), flag) for c in commands):
            missing.append(f"{module}:{line} names {flag}, which {' / '.join(commands)} lack(s)")
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("argv", [["seg", "train", "--mixup", "0.8"], ["det", "train", "--aa", "rand-m9"],
                                  ["seg", "train", "--img-size", "64"], ["train", "--seg-crop-size", "64"]])
def test_a_flag_of_another_task_is_refused_naming_the_task(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    task = {"seg": "segmentation", "det": "detection", "train": "classification"}[argv[0]]
    assert f"{argv[-2]} does not apply to the {task} task" in err


def _doc_command_lines() -> list[tuple[str, list[str]]]:
    """``(file, argv)`` of each ``mlla ...`` (or ``torchrun ... -m mlla.cli ...``) line in a shell
    block of README.md and docs/ (continuation lines joined, comments dropped)."""
    root = SRC.parents[1]
    found = []
    for path in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        in_block, lang, line = False, "", ""
        for raw in path.read_text().splitlines():
            if raw.startswith("```"):
                in_block, lang = not in_block, raw[3:].strip()
                continue
            if not in_block or lang not in ("", "bash", "sh"):
                continue
            line += raw.rstrip("\\")
            if raw.endswith("\\"):
                continue
            command, line = line.split(" #")[0].strip(), ""
            match = re.match(r"^(?:\S*/)?(?:mlla|torchrun .*? -m mlla\.cli)\s+([a-z].*)$", command)
            if match and "..." not in command and "[" not in command:
                found.append((path.name, shlex.split(match.group(1))))
    return found


def test_every_command_line_in_the_docs_parses(capsys):
    lines = [(name, argv) for name, argv in _doc_command_lines() if argv[0] in _command_names()]
    assert len(lines) > 30
    refused = []
    for name, argv in lines:
        try:
            build_parser().parse_args(argv)
        except SystemExit as e:
            if e.code:
                refused.append(f"{name}: mlla {' '.join(argv)}: {capsys.readouterr().err.strip().splitlines()[-1]}")
    assert not refused, "\n".join(refused)


def _command_names() -> set[str]:
    return set(next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices)
