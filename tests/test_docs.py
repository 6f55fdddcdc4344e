"""The README and docs/ hold together: every relative link, image and ``docs/...`` path they
name exists, and every ``#anchor`` into a Markdown file names one of its headings."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target) and ![alt](target)
_SRC = re.compile(r"""<(?:img|a)\b[^>]*?\b(?:src|href)=["']([^"']+)["']""")
_DOCS_PATH = re.compile(r"(?<![\w/.-])docs/[\w./-]*[\w/]")  # a docs/... path named in the text


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*|_{2}|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", text, flags=re.M)}


def _targets(page: Path) -> list[tuple[str, Path, str]]:
    """``(as written, file it resolves to, anchor)`` for each relative link and docs path of ``page``."""
    text = page.read_text()
    found = []
    for target in _LINK.findall(text) + _SRC.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        found.append((target, (page.parent / path).resolve() if path else page, anchor))
    for path in _DOCS_PATH.findall(text):
        found.append((path, (ROOT / path.rstrip(".")).resolve(), ""))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_docs_path_resolves(page):
    targets = _targets(page)
    missing = [written for written, path, _ in targets if not path.exists()]
    assert not missing, f"{page.relative_to(ROOT)} names files that do not exist: {missing}"
    bad_anchors = [written for written, path, anchor in targets
                   if anchor and path.suffix == ".md" and anchor not in _anchors(path)]
    assert not bad_anchors, f"{page.relative_to(ROOT)} links to headings that do not exist: {bad_anchors}"


def test_the_checker_sees_links_paths_and_anchors(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A `code` heading\nsee [x](other.md#b-c), ![i](img.png), <img src='pic.png'>, docs/a/b.md. "
                    "[web](https://example.org) [top](#a-code-heading)\n")
    written = {t[0]: t for t in _targets(page)}
    assert set(written) == {"other.md#b-c", "img.png", "pic.png", "docs/a/b.md", "#a-code-heading"}
    assert written["other.md#b-c"][1:] == (tmp_path / "other.md", "b-c")
    assert written["docs/a/b.md"][1] == ROOT / "docs" / "a" / "b.md"
    assert _anchors(page) == {"a-code-heading"}


def test_the_demo_models_parameter_count_is_the_one_quoted():
    import mlla
    from mlla.tasks.classification.settings import PRESETS
    from mlla.tasks.classification import DEMO_CLASSES

    demo = PRESETS["demo"]
    model = mlla.create_model(demo["model"], num_classes=len(DEMO_CLASSES), **demo["model_kwargs"])
    count = f"{sum(p.numel() for p in model.parameters()):,}"
    for page in ("README.md", "docs/training.md"):
        assert count in (ROOT / page).read_text(), f"{page} should quote the demo model's {count} parameters"
    assert "num_classes=10, embed_dim=24, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8)" in (ROOT / "docs/training.md").read_text()
    assert demo["model_kwargs"] == dict(embed_dim=24, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8)) and len(DEMO_CLASSES) == 10


def test_the_quoted_demo_accuracy_is_the_committed_runs():
    import json

    run = json.loads((ROOT / "docs" / "results" / "make_demo.json").read_text())
    final = run["rows"][-1]
    assert run["final"] == dict(val_top1=final["val_top1"], ema_top1=final["ema_top1"]) and final["epoch"] == 6
    readme = (ROOT / "README.md").read_text()
    assert f"the latest gave {final['val_top1']:.1f}% (EMA\n{final['ema_top1']:.1f}%)" in readme
    assert f"| 4 | {final['val_top1']:.1f} % | {final['ema_top1']:.1f} % |" in (ROOT / "docs" / "training.md").read_text()
