"""The design-study sections of README.md and docs/study.md: generated from the committed files."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from mlla.models import PAPER_RESULTS
from mlla.tasks.study.ablate import DESIGNS, STUDY_SEEDS, StudySpec, study_settings
from mlla.tasks.study.report import RUN_COLUMNS, VARIANT_COLUMNS, _csv_text, aggregate, read_study_files, render_summary

ROOT = Path(__file__).resolve().parents[1]


def _study_table():
    spec = importlib.util.spec_from_file_location("study_table", ROOT / "benchmarks" / "study_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_and_docs_study_sections_are_the_committed_files() -> None:
    table = _study_table()
    for path, text in table.updated().items():  # `python benchmarks/study_table.py` is a no-op
        assert text == path.read_text(), f"{path} is out of date: run benchmarks/study_table.py"
    rows = aggregate(*read_study_files(table.RESULTS))
    readme = (ROOT / "README.md").read_text().split(table.BEGIN)[1].split(table.END)[0]
    for r in rows:  # every variant's mean top-1 as the files give it
        assert f"| {r['design']} | {float(r['params_m']):.3f} | {r['seeds']} | {float(r['top1_mean']):.1f}" in readme
    committed = json.loads((table.RESULTS / "results.json").read_text())
    assert [r["variant"] for r in committed] == [r["variant"] for r in rows]
    assert [r["top1_mean"] for r in committed] == pytest.approx([r["top1_mean"] for r in rows])


def _fake_study(folder: Path, seeds=STUDY_SEEDS) -> None:
    spec = StudySpec(output=folder)
    (folder / "study.json").write_text(json.dumps(dict(settings=study_settings(spec), data={})))
    base = PAPER_RESULTS["ablation_baseline"]["top1"]
    runs, variants = [], []
    for i, v in enumerate(spec.variants):
        paper = PAPER_RESULTS.get(v, {})
        variants.append(dict(variant=v, design=DESIGNS[v], params_m=0.3, gmacs=0.001, img_per_s=100,
                             paper_top1=paper.get("top1"), paper_delta_top1=paper["top1"] - base if paper else None))
        for s in seeds:  # the study's changes follow the paper's, plus a seed wobble
            delta = (paper.get("top1", base) - base) * 3
            runs.append(dict(variant=v, seed=s, epochs=10, top1=50 + delta + s * 0.1, best_top1=51 + delta,
                             relational_top1=40, counting_top1=60, wall_min=1, cpu_s_per_epoch=5, num_classes=8))
    (folder / "runs.csv").write_text(_csv_text(runs, RUN_COLUMNS))
    (folder / "variants.csv").write_text(_csv_text(variants, VARIANT_COLUMNS))


def test_summary_of_the_default_study_states_agreement_and_rank_correlation(tmp_path) -> None:
    _fake_study(tmp_path)
    text = render_summary(tmp_path)
    assert "Not the study's findings" not in text and "The default study: 16 variants x 3 seeds" in text
    assert "- + forget gate: agrees" in text and "- - normalization: agrees" in text
    assert "over 11 designs: +1.00" in text  # the fake study follows the paper's ranking exactly
    _fake_study(tmp_path, seeds=(0, 1))
    reduced = render_summary(tmp_path, full=True)
    assert reduced.startswith("**Not the study's findings.**") and "seeds [0, 1]" in reduced
    assert "paper top-1" in reduced  # the full table
