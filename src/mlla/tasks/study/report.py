"""A study's results: per-seed rows, the aggregate with intervals, the table, the chart.

Everything here is computed from two files a study writes, ``runs.csv`` (one row per variant and
seed) and ``variants.csv`` (one row per variant), so the aggregate can be rebuilt from committed
files (``mlla ablate --report``) without the checkpoints. Statistics: :mod:`mlla.tasks.study.stats`
(mean, sample std, 95% t-interval; changes against the baseline as per-seed paired differences).
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Sequence

from ...checkpoint import atomic_save
from .stats import Summary, paired_difference, spearman, summarize

__all__ = [
    "AGGREGATE_COLUMNS",
    "BASELINE",
    "RUN_COLUMNS",
    "VARIANT_COLUMNS",
    "aggregate",
    "format_study_table",
    "paper_agreement",
    "plot_study",
    "read_study_files",
    "write_study_results",
    "write_summary",
]

BASELINE = "ablation_baseline"
RUN_COLUMNS = [
    "variant", "seed", "epochs", "top1", "top5", "best_top1", "best_epoch", "relational_top1", "counting_top1",
    "train_loss", "wall_min", "cpu_s_per_epoch", "num_classes",
]
VARIANT_COLUMNS = [
    "variant", "design", "params_m", "gmacs", "img_per_s", "paper_params_m", "paper_gmacs", "paper_top1",
    "paper_delta_top1", "img_size", "throughput_batch", "device", "threads",
]
_STATS = ("mean", "std", "low", "high")
AGGREGATE_COLUMNS = [
    "variant", "design", "params_m", "gmacs", "img_per_s", "seeds",
    *[f"top1_{s}" for s in _STATS], *[f"best_top1_{s}" for s in _STATS],
    *[f"delta_top1_{s}" for s in ("mean", "low", "high")], "delta_top1_excludes_zero",
    *[f"delta_best_top1_{s}" for s in ("mean", "low", "high")], "delta_best_top1_excludes_zero",
    *[f"relational_top1_{s}" for s in ("mean", "std")], *[f"counting_top1_{s}" for s in ("mean", "std")],
    "wall_min", "cpu_s_per_epoch", "epochs", "num_classes",
    "paper_params_m", "paper_gmacs", "paper_top1", "paper_delta_top1",
]


def _num(v: Any) -> float | None:
    return None if v in (None, "") else float(v)


def run_row(result: dict[str, Any]) -> dict[str, Any]:
    """A run's ``result.json`` as a ``runs.csv`` row."""
    return dict(
        {k: result.get(k) for k in RUN_COLUMNS if k in result},
        wall_min=result["wall_s"] / 60, cpu_s_per_epoch=result["cpu_s"] / max(1, result["epochs"]),
    )


def _put(row: dict[str, Any], prefix: str, s: Summary | None, keys: Sequence[str] = _STATS) -> None:
    for k in keys:
        row[f"{prefix}_{k}"] = None if s is None else getattr(s, k)
    if "std" not in keys:
        row[f"{prefix}_excludes_zero"] = None if s is None else s.excludes_zero


def aggregate(runs: Sequence[dict[str, Any]], variants: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per variant (in ``variants``' order): top-1 of the last and best epoch over the
    seeds (mean, std, 95% interval), the change against the baseline (per-seed paired differences
    with their interval; the first variant is the baseline when ``ablation_baseline`` is absent),
    per-group top-1, total wall minutes, mean CPU seconds per epoch, and the paper's figures."""
    by_variant: dict[str, dict[int, dict[str, Any]]] = {}
    for r in runs:
        by_variant.setdefault(r["variant"], {})[int(r["seed"])] = r
    names = [v["variant"] for v in variants]
    base_name = BASELINE if BASELINE in by_variant else names[0]
    base = by_variant.get(base_name, {})
    rows = []
    for v in variants:
        seeds = by_variant.get(v["variant"], {})
        if not seeds:
            continue
        last = {s: float(r["top1"]) for s, r in seeds.items()}
        best = {s: float(r["best_top1"]) for s, r in seeds.items()}
        row: dict[str, Any] = {k: v.get(k) for k in ("variant", "design", "params_m", "gmacs", "img_per_s")}
        row["seeds"] = len(seeds)
        _put(row, "top1", summarize(list(last.values())))
        _put(row, "best_top1", summarize(list(best.values())))
        _put(row, "delta_top1", paired_difference(last, {s: float(r["top1"]) for s, r in base.items()}),
             ("mean", "low", "high"))
        _put(row, "delta_best_top1", paired_difference(best, {s: float(r["best_top1"]) for s, r in base.items()}),
             ("mean", "low", "high"))
        for group in ("relational", "counting"):
            values = [_num(r.get(f"{group}_top1")) for r in seeds.values()]
            _put(row, f"{group}_top1", summarize(values) if values and None not in values else None, ("mean", "std"))
        row["wall_min"] = sum(float(r["wall_min"]) for r in seeds.values())
        row["cpu_s_per_epoch"] = sum(float(r["cpu_s_per_epoch"]) for r in seeds.values()) / len(seeds)
        row["epochs"] = int(next(iter(seeds.values()))["epochs"])
        row["num_classes"] = int(next(iter(seeds.values()))["num_classes"])
        for k in ("paper_params_m", "paper_gmacs", "paper_top1", "paper_delta_top1"):
            row[k] = _num(v.get(k))
        rows.append(row)
    return rows


def paper_agreement(rows: Sequence[dict[str, Any]]) -> tuple[list[tuple[str, str]], float | None, int]:
    """Per variant with a paper change: ``(design, verdict)`` where the verdict is 'agrees' or
    'opposite sign' when the study's interval of the last-epoch change excludes zero, else
    'no conclusion (interval includes 0)'; and Spearman's rank correlation between the study's
    mean changes and the paper's over those variants (and how many there are)."""
    verdicts, ours, paper = [], [], []
    for r in rows:
        if r["variant"] == BASELINE or r.get("paper_delta_top1") is None or r.get("delta_top1_mean") is None:
            continue
        ours.append(r["delta_top1_mean"])
        paper.append(r["paper_delta_top1"])
        if r["delta_top1_excludes_zero"] in (True, "True"):
            same = (r["delta_top1_mean"] > 0) == (r["paper_delta_top1"] > 0)
            verdicts.append((r["design"], "agrees" if same else "opposite sign"))
        else:
            verdicts.append((r["design"], "no conclusion (interval includes 0)"))
    return verdicts, spearman(ours, paper), len(ours)


def _fmt(v: Any, spec: str) -> str:
    return "-" if v in (None, "") else format(float(v), spec)


def _pm(mean: Any, std: Any) -> str:
    return _fmt(mean, ".1f") + ("" if std in (None, "") else " ± " + _fmt(std, ".1f"))


def _ci(low: Any, high: Any) -> str:
    return "-" if low in (None, "") else f"[{float(low):.1f}, {float(high):.1f}]"


def _delta(r: dict[str, Any], prefix: str) -> str:
    text = _fmt(r[f"{prefix}_mean"], "+.1f")
    if r.get(f"{prefix}_low") not in (None, ""):
        text += " " + _ci(r[f"{prefix}_low"], r[f"{prefix}_high"])
    if r.get(f"{prefix}_excludes_zero") in (True, "True"):
        text += " *"
    return text


def format_study_table(rows: Sequence[dict[str, Any]]) -> str:
    """The aggregate as a Markdown table (``*``: the 95% interval of the change excludes 0)."""
    head = ["variant", "design", "params (M)", "seeds", "top-1 last", "95% CI", "Δ last [95% CI]", "top-1 best",
            "Δ best [95% CI]", "relational", "counting", "CPU s/epoch", "wall (min)", "GMACs", "img/s",
            "paper params (M)", "paper top-1", "paper Δ"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["variant"], r["design"], _fmt(r["params_m"], ".3f"), str(r["seeds"]),
            _pm(r["top1_mean"], r["top1_std"]), _ci(r["top1_low"], r["top1_high"]), _delta(r, "delta_top1"),
            _pm(r["best_top1_mean"], r["best_top1_std"]), _delta(r, "delta_best_top1"),
            _pm(r["relational_top1_mean"], r["relational_top1_std"]), _pm(r["counting_top1_mean"], r["counting_top1_std"]),
            _fmt(r["cpu_s_per_epoch"], ".1f"), _fmt(r["wall_min"], ".1f"), _fmt(r["gmacs"], ".4f"),
            _fmt(r["img_per_s"], ".0f"), _fmt(r["paper_params_m"], ".0f"), _fmt(r["paper_top1"], ".1f"),
            _fmt(r["paper_delta_top1"], "+.1f"),
        ]) + " |")
    return "\n".join(lines)


def plot_study(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Bar chart with 95% intervals: last-epoch top-1 per variant (left) and its change against
    the baseline, study beside paper (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def err(r: dict[str, Any], prefix: str) -> tuple[float, float]:
        if r.get(f"{prefix}_low") in (None, ""):
            return 0.0, 0.0
        mean = float(r[f"{prefix}_mean"])
        return mean - float(r[f"{prefix}_low"]), float(r[f"{prefix}_high"]) - mean

    labels = [f"{r['design']} ({float(r['params_m']):.2f}M)" for r in rows]
    y = list(range(len(rows)))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 0.45 * len(rows) + 1.8), sharey=True)
    top = [float(r["top1_mean"]) for r in rows]
    ax1.barh(y, top, xerr=list(zip(*[err(r, "top1") for r in rows])), color="C0", capsize=3)
    for i, t in enumerate(top):
        ax1.text(t + 1, i + 0.3, f"{t:.1f}", fontsize=7)
    if rows:
        ax1.axvline(100 / int(rows[0]["num_classes"]), color="k", ls="--", lw=0.8, label="chance")
        ax1.legend(fontsize=8, loc="lower right")
    ax1.set_yticks(y, labels, fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xlim(0, 105)
    seeds = sorted({int(r["seeds"]) for r in rows})
    ax1.set_xlabel(f"top-1 (%), last epoch: mean and 95% interval over {'/'.join(map(str, seeds))} seeds")
    h = 0.38
    ax2.barh([i - h / 2 for i in y], [_num(r["delta_top1_mean"]) or 0.0 for r in rows], height=h, color="C0",
             xerr=list(zip(*[err(r, "delta_top1") for r in rows])), capsize=3, label="this study (paired by seed)")
    ax2.barh([i + h / 2 for i in y], [_num(r["paper_delta_top1"]) or 0.0 for r in rows], height=h, color="C1",
             label="paper, ImageNet-1K (one run)")
    ax2.axvline(0, color="k", lw=0.8)
    ax2.set_xlabel("top-1 change against the baseline (points)")
    ax2.legend(fontsize=8, loc="lower right")
    for ax in (ax1, ax2):
        ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_save(lambda tmp: Path(tmp).write_bytes(buf.getvalue()), path)


def _csv_text(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _save(text: str, path: Path) -> Path:
    return atomic_save(lambda tmp: Path(tmp).write_text(text), path)


def write_summary(runs: Sequence[dict[str, Any]], variants: Sequence[dict[str, Any]],
                  out_dir: str | os.PathLike) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """From per-run and per-variant rows: ``results.csv``, ``results.json``, ``table.md`` and ``chart.png``."""
    out_dir = Path(out_dir)
    rows = aggregate(runs, variants)
    return rows, {
        "csv": _save(_csv_text(rows, AGGREGATE_COLUMNS), out_dir / "results.csv"),
        "json": _save(json.dumps(rows, indent=1), out_dir / "results.json"),
        "table": _save(format_study_table(rows) + "\n", out_dir / "table.md"),
        "chart": plot_study(rows, out_dir / "chart.png"),
    }


def write_study_results(results: Sequence[dict[str, Any]], variants: Sequence[dict[str, Any]],
                        out_dir: str | os.PathLike) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """Write ``runs.csv`` and ``variants.csv`` from the runs' ``result.json`` contents, then the aggregate."""
    out_dir = Path(out_dir)
    runs = [run_row(r) for r in results]
    paths = {
        "runs": _save(_csv_text(runs, RUN_COLUMNS), out_dir / "runs.csv"),
        "variants": _save(_csv_text(variants, VARIANT_COLUMNS), out_dir / "variants.csv"),
    }
    rows, more = write_summary(read_csv(paths["runs"]), read_csv(paths["variants"]), out_dir)
    return rows, dict(paths, **more)


def read_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_study_files(folder: str | os.PathLike) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``runs.csv`` and ``variants.csv`` of a study folder (FileNotFoundError naming what is missing)."""
    folder = Path(folder)
    missing = [n for n in ("runs.csv", "variants.csv") if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: no {' or '.join(missing)}; run `mlla ablate --output {folder}` first")
    return read_csv(folder / "runs.csv"), read_csv(folder / "variants.csv")


def default_study_differences(folder: str | os.PathLike) -> list[str]:
    """How the study in ``folder`` (its ``study.json`` and ``runs.csv``) differs from the default
    study (every default variant, the default seeds, settings and task); empty if it is the default."""
    from .ablate import STUDY_SEEDS, StudySpec, study_settings
    from .manifest import manifest_differences

    folder = Path(folder)
    saved = json.loads((folder / "study.json").read_text())
    default = StudySpec(output=folder)
    diffs = manifest_differences(dict(settings=saved["settings"]), dict(settings=study_settings(default)))
    runs, _ = read_study_files(folder)
    have = {(r["variant"], int(r["seed"])) for r in runs}
    want = {(v, s) for v in default.variants for s in STUDY_SEEDS}
    if have != want:
        variants = sorted({v for v, _ in have})
        seeds = sorted({s for _, s in have})
        diffs.append(f"runs: {len(variants)} of {len(default.variants)} variants x seeds {seeds} "
                     f"(default: all x {list(STUDY_SEEDS)})")
    return diffs


def render_summary(folder: str | os.PathLike, *, full: bool = False) -> str:
    """Markdown for the README (``full=False``: compact table) or docs/study.md (``full``: every
    column) from a study folder's ``study.json``, ``runs.csv`` and ``variants.csv``: what was run,
    the table, per design whether the study agrees with the paper's sign (only where the 95%
    interval excludes zero) and the rank correlation with the paper's changes."""
    folder = Path(folder)
    rows = aggregate(*read_study_files(folder))
    diffs = default_study_differences(folder)
    epochs = rows[0]["epochs"] if rows else "-"
    seeds = sorted({int(r["seeds"]) for r in rows})
    lines = []
    if diffs:
        lines += [
            f"**Not the study's findings.** These files hold a reduced verification run ({len(rows)} variants, "
            f"{'/'.join(map(str, seeds))} seeds, {epochs} epochs), not the default study; it differs from it in "
            f"(this run -> default): "
            + "; ".join(diffs) + ". It shows that the pipeline runs end to end; its numbers say nothing about the "
            "designs. The default study has not been run yet.", "",
        ]
    else:
        lines += [f"The default study: {len(rows)} variants x {seeds[0]} seeds, {epochs} epochs each.", ""]
    if full:
        lines.append(format_study_table(rows))
    else:
        lines += ["| design | params (M) | seeds | top-1 last | Δ last [95% CI] | top-1 best | relational | counting "
                  "| paper Δ |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append("| " + " | ".join([
                r["design"], _fmt(r["params_m"], ".3f"), str(r["seeds"]), _pm(r["top1_mean"], r["top1_std"]),
                _delta(r, "delta_top1"), _pm(r["best_top1_mean"], r["best_top1_std"]),
                _pm(r["relational_top1_mean"], r["relational_top1_std"]),
                _pm(r["counting_top1_mean"], r["counting_top1_std"]), _fmt(r["paper_delta_top1"], "+.1f"),
            ]) + " |")
    verdicts, rho, n = paper_agreement(rows)
    lines += ["", "Mean ± sample std over seeds; Δ: per-seed paired difference to the baseline, mean and 95% "
              "t-interval; `*`: the interval excludes 0. Against the paper's sign (ImageNet-1K, Table 1-2), only "
              "where the interval excludes 0:", ""]
    lines += [f"- {design}: {verdict}" for design, verdict in verdicts] or ["- no design with a paper figure was run."]
    lines += ["", f"Spearman rank correlation between this run's mean changes and the paper's, over {n} design{'s' if n != 1 else ''}: "
              + ("not computed (fewer than 3)" if rho is None else f"{rho:+.2f}") + "."]
    return "\n".join(lines)


def replace_between(text: str, begin: str, end: str, block: str) -> str:
    """``text`` with the part between the ``begin`` and ``end`` marker lines replaced by ``block``."""
    if text.count(begin) != 1 or text.count(end) != 1:
        raise ValueError(f"the text must contain the markers {begin!r} and {end!r} once each")
    head, rest = text.split(begin)
    return f"{head}{begin}\n{block}\n{end}{rest.split(end)[1]}"
