"""Float64 parity with the authors, and float32 accuracy of train-mode outputs and gradients.

Fixtures ``cls_small_96_f64_eval`` / ``cls_small_96_f64_train`` in ../shared/reference (README
there): the authors' model run in float64, train mode with gradients of the input and of every
parameter. ``authors_fp32_error`` in the manifest is the authors' own float32 error against them.
"""
from __future__ import annotations

import json

import pytest
import torch

import mlla
from conftest import REFERENCE_DIR
from mlla.models.mlla import checkpoint_filter_fn

F64_TOL = 1e-12
# Conv biases followed by a train-mode BatchNorm: exactly zero gradient; the stored values are rounding noise.
ZERO_GRAD_ABS_TOL = 1e-14


def _load(name: str) -> tuple[dict[str, torch.Tensor], dict]:
    if not (REFERENCE_DIR / "manifest.json").is_file():
        pytest.skip(f"reference fixtures not found in {REFERENCE_DIR}")
    from safetensors.torch import load_file

    return load_file(str(REFERENCE_DIR / f"{name}.safetensors")), json.loads((REFERENCE_DIR / "manifest.json").read_text())["cases"][name]


@pytest.fixture(scope="module")
def f64_case() -> dict:
    """Weights (our layout), config, the eval case and the train case."""
    eval_t, eval_info = _load("cls_small_96_f64_eval")
    train_t, train_info = _load("cls_small_96_f64_train")
    assert train_info["weights_file"] == "cls_small_96_f64_eval.safetensors"
    config = {k: v for k, v in eval_info["config"].items() if k != "img_size"}
    authors_sd = {k.removeprefix("state_dict."): v for k, v in eval_t.items() if k.startswith("state_dict.")}
    model = mlla.MLLA(**config, dtype=torch.float64)
    state_dict = checkpoint_filter_fn(authors_sd, model)
    # The gradients under the authors' keys, mapped like weights (in_proj and act_proj fuse into in_proj).
    grads = checkpoint_filter_fn({k.removeprefix("grad."): v for k, v in train_t.items()
                                  if k.startswith("grad.") and k != "grad.input"})
    return dict(config=config, state_dict=state_dict, eval=eval_t, train=train_t, grads=grads,
                authors_fp32=train_info["authors_fp32_error"], authors_fp32_eval=eval_info["authors_fp32_error"])


def _model(case: dict, dtype: torch.dtype) -> mlla.MLLA:
    model = mlla.MLLA(**case["config"], dtype=dtype)
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in case["state_dict"].items()})
    return model


def _train_step(case: dict, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Train-mode forward and backward of the reference loss: output, loss, input grad, parameter grads (float64)."""
    model = _model(case, dtype).train()
    x = case["train"]["input"].to(dtype).detach().requires_grad_(True)
    out = model(x)
    loss = (out * case["train"]["loss_weight"].to(dtype)).sum()
    loss.backward()
    grads = {n: p.grad.double() for n, p in model.named_parameters()}
    return out.double(), loss.double(), x.grad.double(), grads


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_float64_eval_matches_authors(f64_case):
    model = _model(f64_case, torch.float64).eval()
    with torch.no_grad():
        out = model(f64_case["eval"]["input"])
    assert out.dtype == torch.float64
    assert _max_err(out, f64_case["eval"]["output"]) < F64_TOL


def test_float64_train_output_and_gradients_match_authors(f64_case):
    out, loss, grad_input, grads = _train_step(f64_case, torch.float64)
    ref = f64_case["train"]
    assert _max_err(out, ref["output"]) < F64_TOL
    assert _max_err(loss, ref["loss"]) < F64_TOL
    assert _max_err(grad_input, ref["grad.input"]) < F64_TOL
    assert set(grads) == set(f64_case["grads"])
    for name, g in grads.items():
        expected = f64_case["grads"][name]
        tol = ZERO_GRAD_ABS_TOL if expected.abs().max() < ZERO_GRAD_ABS_TOL else F64_TOL * max(1.0, expected.abs().max().item())
        assert _max_err(g, expected) < tol, name


def test_float32_train_gradients_as_accurate_as_authors(f64_case):
    """Our float32 train-mode output and gradients are within 2x of the authors' own float32 error."""
    out, _, grad_input, grads = _train_step(f64_case, torch.float32)
    ref, authors = f64_case["train"], f64_case["authors_fp32"]
    assert _max_err(out, ref["output"]) <= 2 * authors["output"]
    assert _max_err(grad_input, ref["grad.input"]) <= 2 * authors["grad.input"]
    # Every gradient together (the manifest's grad.params_max), then per parameter against the authors' error
    # for the same parameter (our in_proj holds their in_proj and act_proj). Per parameter, both are maxima
    # over a tensor of rounding noise: ours is within 2x of theirs for the typical parameter (median ratio
    # about 1.0) and within 3x for every one of the 187 (the largest, 2.6x, is a depthwise conv bias).
    errors = {name: _max_err(g, f64_case["grads"][name]) for name, g in grads.items()}
    assert max(errors.values()) <= 2 * authors["grad.params_max"]
    authors_per_param = checkpoint_filter_fn({k: torch.tensor([v]) for k, v in authors["grad.params"].items()})
    ratios = {name: err / authors_per_param[name].max().item() for name, err in errors.items()}
    assert sorted(ratios.values())[len(ratios) // 2] <= 2.0
    assert not {n: r for n, r in ratios.items() if r > 3.0}


def test_float32_eval_matches_float64_reference(f64_case):
    model = _model(f64_case, torch.float32).eval()
    with torch.no_grad():
        out = model(f64_case["eval"]["input"].float())
    assert _max_err(out.double(), f64_case["eval"]["output"]) <= 2 * f64_case["authors_fp32_eval"]["output"]
