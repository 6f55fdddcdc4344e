"""Shared fixtures: the authors' reference outputs in ../shared/reference (skipped if absent)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# Triton kernels run in Triton's CPU interpreter where there is no CUDA device; it must be chosen
# before Triton is first imported (importing torch does not import it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REFERENCE_DIR = Path(os.environ.get("MLLA_REFERENCE_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "reference"))


def reference_case(name: str) -> dict:
    """Tensors of one reference case: ``state_dict`` (authors' keys), ``input``, outputs, config."""
    if not (REFERENCE_DIR / "manifest.json").is_file():
        pytest.skip(f"reference fixtures not found in {REFERENCE_DIR}")
    from safetensors.torch import load_file

    tensors = load_file(str(REFERENCE_DIR / f"{name}.safetensors"))
    info = json.loads((REFERENCE_DIR / "manifest.json").read_text())["cases"][name]
    state_dict = {k.removeprefix("state_dict."): v for k, v in tensors.items() if k.startswith("state_dict.")}
    outputs = {k: v for k, v in tensors.items() if k.startswith("output")}
    config = {k: v for k, v in info["config"].items() if k not in ("img_size", "out_indices")}
    return dict(state_dict=state_dict, input=tensors["input"], outputs=outputs, config=config, kind=info["kind"])


# One intra-op thread per test process: `make test` runs two pytest workers on two cores, and
# oversubscribed threads make the small test models many times slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
