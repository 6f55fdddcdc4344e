"""What a study folder is: its settings and a fingerprint of its data, and the wall time of its runs.

``OUT/study.json`` records the settings every run of a study shares (recipe, model size, task) and
a fingerprint of the data (a SHA-256 per class folder and split, over file names and bytes). A
study continues only with the same settings and the same data: :func:`check_manifest` names what
differs otherwise. Variants and seeds are not part of the key: adding either to a finished study
trains only the new runs.

Each run's wall time is kept in ``wall.json`` as a list of parts (one per process that worked on
the run), each ``[start, last, cpu_s]``: wall-clock start and last heartbeat in seconds since the
epoch, and the process CPU time spent in it. The part is refreshed every second while the run
trains (:class:`WallClock`), so a part ended by SIGKILL still counts up to its last heartbeat.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Mapping

from ...checkpoint import atomic_save

__all__ = ["StudyMismatch", "WallClock", "check_manifest", "data_fingerprint", "manifest_differences", "wall_seconds"]

MANIFEST = "study.json"


class StudyMismatch(ValueError):
    """A study folder holds runs of other settings or other data."""


def data_fingerprint(root: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``'split/class' -> {'files': count, 'sha256': digest}`` over every file under ``root``'s
    class folders (names and bytes, sorted), marker files at the top level excluded."""
    root = Path(root)
    out: dict[str, dict[str, Any]] = {}
    for folder in sorted(p for p in root.glob("*/*") if p.is_dir()):
        digest, count = hashlib.sha256(), 0
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            digest.update(str(f.relative_to(folder)).encode() + b"\0")
            digest.update(f.read_bytes())
            count += 1
        out[folder.relative_to(root).as_posix()] = dict(files=count, sha256=digest.hexdigest())
    if not out:
        raise FileNotFoundError(f"{root}: no class folders (expected {root}/train/<class>/...)")
    return out


def _describe(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def _flatten(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def manifest_differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two manifests: each setting by its dotted name
    (``recipe.epochs: 10 -> 12``), the data by class folder. A recipe setting recorded on one side
    only (one the library has since added or dropped, e.g. another task's) is not a difference."""
    diffs = []
    s_set, n_set = _flatten(saved.get("settings", {})), _flatten(now.get("settings", {}))
    for key in sorted(set(s_set) | set(n_set)):
        if key.startswith("recipe.") and (key in s_set) != (key in n_set):
            continue  # a setting the library added or dropped since: recorded on one side only
        if s_set.get(key) != n_set.get(key):
            diffs.append(f"{key}: {_describe(s_set.get(key))} -> {_describe(n_set.get(key))}")
    if "data" not in now:
        return diffs
    s_data, n_data = saved.get("data", {}), now["data"]
    for folder in sorted(set(s_data) | set(n_data)):
        a, b = s_data.get(folder), n_data.get(folder)
        if a == b:
            continue
        if a is None or b is None:
            diffs.append(f"data {folder}: {'added' if a is None else 'removed'}")
        elif a["files"] != b["files"]:
            diffs.append(f"data {folder}: {a['files']} -> {b['files']} files")
        else:
            diffs.append(f"data {folder}: same {a['files']} files, other contents")
    return diffs


def check_manifest(output: str | os.PathLike, manifest: dict[str, Any], *, new_study: bool = False) -> Path | None:
    """Make ``output`` a study folder of ``manifest``: write it if there is none; if there is
    one with other settings or data, raise :class:`StudyMismatch` naming the differences, or
    with ``new_study`` move the old study aside to ``output/previous-<n>`` (returned). A
    ``manifest`` without ``data`` compares the settings only and writes nothing."""
    output = Path(output)
    path = output / MANIFEST
    moved = None
    if path.is_file():
        saved = json.loads(path.read_text())
        diffs = manifest_differences(saved, manifest)
        if diffs and not new_study:
            raise StudyMismatch(
                f"{output} holds a study with other settings or data: {'; '.join(diffs)}. Rerun with the same "
                f"settings to continue it, use another --output, or add --new-study to move it to "
                f"{output}/previous-<n>/ and start anew"
            )
        if diffs:
            n = 1
            while (output / f"previous-{n}").exists():
                n += 1
            moved = output / f"previous-{n}"
            moved.mkdir()
            for entry in list(output.iterdir()):
                if not entry.name.startswith("previous-"):
                    entry.rename(moved / entry.name)
    output.mkdir(parents=True, exist_ok=True)
    if "data" not in manifest:
        return moved
    text = json.dumps(manifest, indent=1, sort_keys=True)
    atomic_save(lambda tmp: Path(tmp).write_text(text), path)
    return moved


def wall_seconds(run_dir: str | os.PathLike) -> float:
    """Seconds a run has trained, summed over its parts (0 if it never started)."""
    path = Path(run_dir) / "wall.json"
    if not path.is_file():
        return 0.0
    return sum(part[1] - part[0] for part in json.loads(path.read_text())["parts"])


class WallClock:
    """Records one part of a run's wall time in ``run_dir/wall.json``: a daemon thread refreshes
    the part's end every ``interval_s`` while it runs, so a killed process loses at most
    ``interval_s``; :meth:`stop` closes the part."""

    def __init__(self, run_dir: str | os.PathLike, interval_s: float = 1.0) -> None:
        self.path = Path(run_dir) / "wall.json"
        self.parts = json.loads(self.path.read_text())["parts"] if self.path.is_file() else []
        self._cpu0 = time.process_time()
        now = time.time()
        self.parts.append([now, now, 0.0])
        self._write()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True, name="study-wall-clock")
        self._thread.start()

    def _write(self) -> None:
        self.parts[-1][1:] = [time.time(), time.process_time() - self._cpu0]
        text = json.dumps(dict(parts=self.parts))
        atomic_save(lambda tmp: Path(tmp).write_text(text), self.path)

    def _run(self, interval_s: float) -> None:
        while not self._stopped.wait(interval_s):
            self._write()

    def stop(self) -> tuple[float, float]:
        """Close the part; returns the run's total wall and CPU seconds over its parts."""
        self._stopped.set()
        self._thread.join()
        self._write()
        return sum(p[1] - p[0] for p in self.parts), sum(p[2] for p in self.parts)
