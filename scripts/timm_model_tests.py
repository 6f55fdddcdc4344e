"""Run timm's own model test suite (``tests/test_models.py``) on our models, against the installed timm.

    .venv/bin/python scripts/timm_model_tests.py                 # mlla_* and test_mlla
    .venv/bin/python scripts/timm_model_tests.py -k "mlla_tiny"  # a narrower pytest -k expression

Steps: download the source distribution of the *installed* timm version from the package
registry (``pip download --no-deps --no-binary :all: timm==<version>``, cached under
``$MLLA_CACHE_DIR`` or ``~/.cache/mlla``), extract ``tests/test_models.py``, patch it (import
``mlla`` so our models register; add our model modules to ``FEAT_INTER_FILTERS``, the models with
``forward_intermediates``; add our TorchScript exclusions to ``EXCLUDE_JIT_FILTERS``, the way timm
excludes some of its own models, reasons in docs/compat.md), run it with pytest for our models
only, and print a summary: passed, failed and skipped tests by test function, and every excluded
test with its reason. Exit status: pytest's (non-zero if any test failed or none ran).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

# Our model modules (timm's registry names a model's module by the last part of its module path).
# The ablation models (module 'ablation') are research models outside this contract: docs/compat.md.
OUR_MODULES = ["mlla"]
# Our models in timm's list_models: the default pytest -k expression selects their tests.
DEFAULT_K = "mlla"
# TorchScript is not supported (docs/compat.md): excluded as timm excludes some of its own models.
JIT_EXCLUDE = {
    "mlla_*": "TorchScript is not supported (docs/compat.md): use torch.compile or torch.export",
    "test_mlla*": "TorchScript is not supported (docs/compat.md): use torch.compile or torch.export",
}


def cache_dir() -> Path:
    return Path(os.environ.get("MLLA_CACHE_DIR", Path.home() / ".cache" / "mlla")) / "timm-tests"


def fetch_test_file(version: str) -> Path:
    """``tests/test_models.py`` of timm ``version``, from its sdist (downloaded once, then cached)."""
    dest = cache_dir() / f"timm-{version}" / "test_models.py"
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--no-binary", ":all:", f"timm=={version}", "-d", tmp]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        sdists = list(Path(tmp).glob("timm-*.tar.gz"))
        if len(sdists) != 1:
            raise SystemExit(f"expected one timm sdist in {tmp}, found {[p.name for p in Path(tmp).iterdir()]}")
        member = f"timm-{version}/tests/test_models.py"
        with tarfile.open(sdists[0]) as tar:
            try:
                data = tar.extractfile(member).read()
            except KeyError:
                raise SystemExit(f"{sdists[0].name} has no {member}: this timm version ships no model tests") from None
    tmp_dest = dest.with_suffix(".tmp")
    tmp_dest.write_bytes(data)
    tmp_dest.replace(dest)
    return dest


def _insert_after(source: str, anchor: str, text: str) -> str:
    """Insert ``text`` right after the first match of the regex ``anchor``; fail loudly if it is absent."""
    m = re.search(anchor, source, flags=re.MULTILINE)
    if m is None:
        raise SystemExit(f"cannot patch timm's test_models.py: no line matches {anchor!r} (timm changed its tests?)")
    return source[: m.end()] + text + source[m.end():]


def patch(source: str) -> str:
    """Register our models and add our filters to timm's test module."""
    source = _insert_after(source, r"^import timm\n", "import mlla  # noqa: F401  (registers the MLLA models)\n")
    source = _insert_after(source, r"^FEAT_INTER_FILTERS = \[\n", "    " + ", ".join(map(repr, OUR_MODULES)) + ",\n")
    source = _insert_after(source, r"^EXCLUDE_JIT_FILTERS = \[\n", "    " + ", ".join(map(repr, JIT_EXCLUDE)) + ",\n")
    return source


def summarise(junit_xml: Path) -> tuple[int, int, int, int]:
    """Print counts by test function and outcome; return (passed, failed, skipped, errors)."""
    root = ET.parse(junit_xml).getroot()
    by_test: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    failures, skips = [], []
    for case in root.iter("testcase"):
        name = case.get("name", "")
        func = name.split("[", 1)[0]
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "error"
                failures.append(f"{name}: {(child.get('message') or '').splitlines()[0][:200] if child.get('message') else ''}")
            elif child.tag == "skipped":
                outcome = "skipped"
                skips.append(f"{name}: {child.get('message', '')[:200]}")
        by_test[func][outcome] += 1
    total = collections.Counter()
    print("\ntimm test_models.py on our models")
    print(f"{'test':45s} {'passed':>7s} {'failed':>7s} {'skipped':>8s}")
    for func in sorted(by_test):
        c = by_test[func]
        total.update(c)
        print(f"{func:45s} {c['passed']:7d} {c['failed'] + c['error']:7d} {c['skipped']:8d}")
    print(f"{'total':45s} {total['passed']:7d} {total['failed'] + total['error']:7d} {total['skipped']:8d}")
    print("\nExcluded (not collected for our models):")
    for pattern, reason in JIT_EXCLUDE.items():
        print(f"  test_model_forward_torchscript, test_model_forward_fx_torchscript [{pattern}]: {reason}")
    for s in skips:
        print(f"  skipped {s}")
    for f in failures:
        print(f"  FAILED {f}")
    return total["passed"], total["failed"], total["skipped"], total["error"]


def seed_pretrained_cache(torch_home: Path) -> list[str]:
    """Put weights for every pretrained cfg of ours into timm's cache under ``torch_home``.

    CI has no network, and timm's pretrained tests download each model's ``url``. With a file of
    the cached name already there timm downloads nothing, so those tests still run timm's
    pretrained route through our ``load_pretrained`` (safe reader, checkpoint filter, features
    wrapper). The weights are the models' random initial ones, in a training checkpoint as the
    authors save it (``model`` key): this checks the route, not the authors' values.
    """
    import timm
    import torch
    from timm.models import get_pretrained_cfg

    import mlla  # noqa: F401  (registers our models)

    cache = torch_home / "hub" / "checkpoints"
    cache.mkdir(parents=True, exist_ok=True)
    seeded = []
    for name in timm.list_models(module=["mlla"], pretrained=True):
        url = get_pretrained_cfg(name).url
        file = cache / (url[1] if isinstance(url, (list, tuple)) else Path(url).name)
        model = timm.create_model(name.split(".")[0])
        torch.save({"model": model.state_dict()}, file)
        seeded.append(f"{name} -> {file.name}")
    return seeded


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-k", default=DEFAULT_K, help="pytest -k expression selecting the models (default: %(default)r)")
    p.add_argument("-n", default="0", help="pytest-xdist workers (default: %(default)s)")
    p.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = p.parse_args(argv)

    import timm

    source = fetch_test_file(timm.__version__)
    with tempfile.TemporaryDirectory(prefix="timm-model-tests-") as work:
        test_file = Path(work) / "test_models.py"
        test_file.write_text(patch(source.read_text()))
        (Path(work) / "pytest.ini").write_text("[pytest]\nfilterwarnings =\n    ignore::pytest.PytestUnknownMarkWarning\n")
        junit = Path(work) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", str(test_file), "-k", args.k, "-q", "-p", "no:cacheprovider",
               "--rootdir", work, "-c", str(Path(work) / "pytest.ini"), f"--junitxml={junit}", "-n", args.n,
               *args.pytest_args]
        print(f"timm {timm.__version__}: " + " ".join(cmd), flush=True)
        env = dict(os.environ, TORCH_HOME=str(Path(work) / "torch_home"))
        seeded = seed_pretrained_cache(Path(env["TORCH_HOME"]))
        print("offline: timm's pretrained tests load random weights seeded in a temporary cache for "
              + ", ".join(seeded), flush=True)
        if args.n != "0":  # one intra-op thread per worker, as the project's own suite
            env.setdefault("OMP_NUM_THREADS", "1")
        rc = subprocess.run(cmd, cwd=work, env=env).returncode
        if not junit.is_file():
            print("pytest wrote no results", file=sys.stderr)
            return rc or 1
        passed, failed, skipped, errors = summarise(junit)
    if passed + failed + errors == 0:
        print("no test ran for our models: check the -k expression", file=sys.stderr)
        return 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
