"""Look inside a trained model: what the gates learn, what normalisation does, how far it sees.

Each analysis reads activations with forward hooks on the model's own modules (nothing is
re-implemented) and returns plain numbers; :func:`write_analysis` draws them and saves them.

* :func:`forget_gate_means` (paper Fig. 4b): mean forget-gate value ``exp(Delta A)`` per layer.
* :func:`input_gate_maps` (Fig. 4a): the input gate ``Delta`` over an image, averaged over channels.
* :func:`token_norm_spread` (Fig. 5): per layer, the spread over tokens of the attention
  output's token norms, absolute (std) and relative to their mean (coefficient of variation).
* :func:`effective_receptive_field`: ``|d centre feature / d input|``, averaged over images.

:func:`analyze` reads every analysis of a trained model beside the same architecture untrained
(same seed: what the initialisation alone gives) and, for a run of an ``mlla ablate`` study,
beside the trained baseline of the same seed: a trained value means something only against both.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ...checkpoint import atomic_save
from ...layers.attention import MllaLinearAttention
from ...layers.gated_attention import GatedLinearAttention

__all__ = [
    "ANALYSES",
    "AnalysisNotApplicable",
    "effective_receptive_field",
    "erf_area_ratio",
    "forget_gate_means",
    "input_gate_maps",
    "token_norm_spread",
    "write_analysis",
]

_logger = logging.getLogger(__name__)

ANALYSES = ("forget-gate", "input-gate", "token-norms", "erf")


class AnalysisNotApplicable(ValueError):
    """The model lacks what an analysis looks at (e.g. a forget gate)."""


@contextlib.contextmanager
def _capture(modules: dict[str, nn.Module]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record each module's outputs (detached) while the context is open."""
    out: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    handles = [
        m.register_forward_hook(lambda mod, args, y, name=name: out[name].append(y.detach().float()))
        for name, m in modules.items()
    ]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def _attention_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (GatedLinearAttention, MllaLinearAttention))}


def _gated(model: nn.Module, what: str) -> dict[str, GatedLinearAttention]:
    """The :class:`GatedLinearAttention` layers that have gate ``what`` ('forget_delta' or
    'input_gate'); AnalysisNotApplicable if there are none."""
    layers = {
        n: m for n, m in model.named_modules()
        if isinstance(m, GatedLinearAttention) and getattr(m, what) is not None
    }
    if not layers:
        gate, switch, example = {
            "forget_delta": ("forget", "forget_gate", "ablation_forget_gate"),
            "input_gate": ("input", "input_gate", "ablation_input_gate"),
        }[what]
        raise AnalysisNotApplicable(
            f"{type(model).__name__} has no {gate} gate (no GatedLinearAttention with {switch}=True); "
            f"this analysis applies to models such as {example}"
        )
    return layers


def forget_gate_means(model: nn.Module, images: torch.Tensor) -> dict[str, float]:
    """Mean forget-gate value per layer, ``(layer name -> mean of exp(Delta_i A))`` over tokens,
    heads, key channels and images; ``images (B, 3, H, W)``, already normalised.

    ``Delta`` is read from each layer's ``forget_delta`` module with a hook; ``A = -exp(A_log)``.
    A bidirectional layer's backward scan is listed as ``'<layer> (backward)'``.

    Raises:
        AnalysisNotApplicable: the model has no forget gate.
    """
    gates = {}
    for name, layer in _gated(model, "forget_delta").items():
        gates[name] = (layer.forget_delta, layer.A_log)
        if layer.backward_delta is not None:
            gates[f"{name} (backward)"] = (layer.backward_delta, layer.A_log_backward)
    with _capture({n: delta for n, (delta, _) in gates.items()}) as deltas, torch.no_grad():
        model.eval()(images)
    means = {}
    for name, (_, A_log) in gates.items():
        A = -A_log.detach().float().exp()  # (qk_dim,)
        values = [torch.exp(d * A) for d in deltas[name]]  # (B, H, W, qk_dim) each
        means[name] = float(torch.cat([g.flatten() for g in values]).mean())
    return means


def input_gate_maps(model: nn.Module, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input gate ``Delta`` of every layer that has one over ``image (3, H, W)``, averaged
    over channels: ``layer name -> (h, w)`` on that layer's token grid (H/4 x W/4 in stage 1).

    Raises:
        AnalysisNotApplicable: the model has no input gate.
    """
    layers = _gated(model, "input_gate")
    with _capture({n: m.input_gate for n, m in layers.items()}) as gates, torch.no_grad():
        model.eval()(image[None])
    return {name: gates[name][0][0].mean(dim=-1) for name in layers}


def token_norm_spread(model: nn.Module, images: torch.Tensor) -> dict[str, dict[str, float]]:
    """Per attention layer: ``std`` (over tokens, averaged over images), ``mean`` of the token
    norms ``||y_i||`` of the attention output ``y (B, H, W, C)``, and ``cv``, the coefficient of
    variation: per image the std over tokens divided by the mean over tokens, averaged over images
    (comparable between models whose output scales differ by orders of magnitude).

    The forward runs with autograd on (no backward) so every model takes its plain module path.

    Raises:
        AnalysisNotApplicable: the model has no linear-attention layer this package knows.
    """
    layers = _attention_layers(model)
    if not layers:
        raise AnalysisNotApplicable(
            f"{type(model).__name__} has no linear attention layer (GatedLinearAttention or MllaLinearAttention)"
        )
    with _capture(layers) as outs, torch.enable_grad():
        model.eval()(images.detach().requires_grad_(True))
    stats = {}
    for name in layers:
        norms = torch.cat([y.flatten(1, -2).norm(dim=-1) for y in outs[name]])  # (B, N)
        std = norms.std(dim=1, correction=0)
        stats[name] = dict(std=float(std.mean()), mean=float(norms.mean()),
                           cv=float((std / norms.mean(dim=1).clamp_min(1e-30)).mean()))
    return stats


@contextlib.contextmanager
def attention_normalization(model: nn.Module, enabled: bool) -> Iterator[int]:
    """Temporarily switch the attention normalisation of every :class:`GatedLinearAttention`
    (the same weights with and without it); yields the number of layers switched."""
    layers = [m for m in model.modules() if isinstance(m, GatedLinearAttention)]
    saved = [m.normalize for m in layers]
    for m in layers:
        m.normalize = enabled
    try:
        yield len(layers)
    finally:
        for m, s in zip(layers, saved):
            m.normalize = s


def effective_receptive_field(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``(H, W)``: ``|d f / d x|`` summed over input channels and averaged over ``images``,
    where ``f`` is the sum over channels of the centre position of ``model.forward_features``
    (layout from ``model.output_fmt``, 'NCHW' if it has none).
    """
    model.eval()
    fmt = getattr(model, "output_fmt", "NCHW")
    total = torch.zeros(images.shape[-2:], dtype=torch.float64)
    for image in images:
        x = image[None].clone().requires_grad_(True)
        feats = model.forward_features(x)
        if fmt == "NHWC":
            feats = feats.permute(0, 3, 1, 2)
        h, w = feats.shape[-2:]
        (grad,) = torch.autograd.grad(feats[0, :, h // 2, w // 2].sum(), x)
        total += grad[0].abs().sum(dim=0).double()
    return (total / len(images)).float()


def erf_area_ratio(erf: torch.Tensor, fraction: float) -> float:
    """The smallest fraction of the image's pixels that holds ``fraction`` of the ERF's mass."""
    flat = erf.flatten().double().sort(descending=True).values
    cum = flat.cumsum(0) / flat.sum().clamp_min(1e-30)
    return float((torch.searchsorted(cum, torch.tensor(fraction, dtype=cum.dtype)) + 1).clamp(max=flat.numel())) / flat.numel()


# ------------------------------------------------------------------------------------ writing
def _save_text(text: str, path: Path) -> Path:
    return atomic_save(lambda tmp: Path(tmp).write_text(text), path)


def _save_figure(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_save(lambda tmp: Path(tmp).write_bytes(buf.getvalue()), path)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_analysis(kind: str, result: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """Draw ``result`` of analysis ``kind`` (one of :data:`ANALYSES`) to ``OUT/<kind>.png`` and save
    its numbers as ``.json`` (and ``.csv``), atomically. Returns the written paths."""
    out = Path(out_dir)
    writer: Callable[[dict[str, Any], Path], list[Path]] = {
        "forget-gate": _write_forget, "input-gate": _write_input, "token-norms": _write_norms, "erf": _write_erf,
    }[kind]
    return writer(result, out)


def _csv(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _write_forget(result: dict[str, Any], out: Path) -> list[Path]:
    plt = _plt()
    subjects = result["means"]
    layers = list(next(iter(subjects.values())))
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(layers) + 2), 3.8))
    width = 0.8 / len(subjects)
    for i, (label, means) in enumerate(subjects.items()):
        ax.bar([j + (i - (len(subjects) - 1) / 2) * width for j in range(len(layers))],
               [means.get(layer, 0.0) for layer in layers], width=width, color=f"C{i}", label=label)
    ax.set_xticks(range(len(layers)), layers, rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("mean forget gate exp(ΔA)")
    ax.legend(fontsize=7)
    ax.set_title(f"{result['model']}: forget gate per layer, trained and untrained", fontsize=9)
    fig.tight_layout()
    rows = [dict(model=label, layer=k, mean_forget_gate=v) for label, means in subjects.items() for k, v in means.items()]
    return [
        _save_figure(fig, out / "forget_gate.png"),
        _save_text(json.dumps(result, indent=1), out / "forget_gate.json"),
        _save_text(_csv(rows), out / "forget_gate.csv"),
    ]


def _write_input(result: dict[str, Any], out: Path) -> list[Path]:
    plt = _plt()
    subjects = result["maps"]
    n = max(len(m) for m in subjects.values()) + 1
    fig, axes = plt.subplots(len(subjects), n, figsize=(2.6 * n, 2.9 * len(subjects)), squeeze=False)
    for row, (label, maps) in zip(axes, subjects.items()):
        row[0].imshow(result["image"])
        row[0].set_title(label, fontsize=7)
        for ax, (name, m) in zip(row[1:], maps.items()):
            im = ax.imshow(m, cmap="viridis")
            ax.set_title(name, fontsize=7)
            fig.colorbar(im, ax=ax, fraction=0.046)
        for ax in row:
            ax.axis("off")
    fig.suptitle(f"{result['model']}: input gate Δ (mean over channels)", fontsize=9)
    fig.tight_layout()
    data = {k: v for k, v in result.items() if k != "image"}
    return [_save_figure(fig, out / "input_gate.png"), _save_text(json.dumps(data), out / "input_gate.json")]


def _write_norms(result: dict[str, Any], out: Path) -> list[Path]:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    rows = []
    for label, stats in result["runs"].items():
        ax.plot(range(len(stats)), [s["cv"] for s in stats.values()], marker="o", label=label)
        rows += [dict(run=label, layer=k, **s) for k, s in stats.items()]
    first = next(iter(result["runs"].values()))
    ax.set_xticks(range(len(first)), list(first), rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("token-norm std / mean (per image)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    ax.set_title(f"{result['model']}: relative spread of token norms per layer", fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return [
        _save_figure(fig, out / "token_norms.png"),
        _save_text(json.dumps(result, indent=1), out / "token_norms.json"),
        _save_text(_csv(rows), out / "token_norms.csv"),
    ]


def _write_erf(result: dict[str, Any], out: Path) -> list[Path]:
    plt = _plt()
    maps = result["maps"]
    fig, axes = plt.subplots(1, len(maps), figsize=(3.4 * len(maps), 3.6), squeeze=False)
    for ax, (name, m) in zip(axes[0], maps.items()):
        t = torch.tensor(m)
        ax.imshow(torch.log10(t / t.max().clamp_min(1e-30) + 1e-6).numpy(), cmap="magma", vmin=-4, vmax=0)
        ax.set_title(f"{name}\n50% of mass in {100 * result['area_ratio'][name]['0.5']:.1f}% of pixels", fontsize=7)
        ax.axis("off")
    fig.suptitle(f"effective receptive field at {result['erf_size']} px, log10 |grad| (normalised)", fontsize=9)
    fig.tight_layout()
    rows = [dict(model=k, **{f"area_{f}": v for f, v in r.items()}) for k, r in result["area_ratio"].items()]
    paths = [_save_figure(fig, out / "erf.png"), _save_text(json.dumps(result), out / "erf.json"),
             _save_text(_csv(rows), out / "erf.csv")]
    return paths


# --------------------------------------------------------------------------- model and images
def load_model(source: str, *, model: str | None = None, model_kwargs: dict[str, Any] | None = None,
               img_size: int | None = None, weights: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """A model in eval mode from a training checkpoint (its ``config`` names the model and size),
    a weights file with ``model`` given, or a registered model name (random initialisation).
    ``weights=False``: the checkpoint's model untrained, initialised after seeding with its
    training seed (the untrained twin).

    Returns ``(model, info)``; ``info`` has ``name``, ``source``, ``img_size``, ``crop_pct``,
    ``interpolation`` and ``data_dir`` (from the training config, where known).
    """
    from ...benchmark import build_model
    from ...checkpoint import CheckpointError
    from ...engine.checkpointing import load_model_weights
    from ...models import create_model
    from ..classification.task import ClassificationTask

    path = Path(source)
    if path.is_file() and model is None and not model_kwargs:
        try:
            net, task = ClassificationTask.from_checkpoint(path, weights=weights)
        except CheckpointError as e:
            raise ValueError(f"{e}; for a file of weights alone, pass --model NAME and --model-kwargs for its size") from e
        cfg = task.cfg
        info = dict(name=cfg.model, source=str(path) if weights else f"untrained, seed {cfg.seed}",
                    img_size=img_size or cfg.img_size, crop_pct=cfg.crop_pct, interpolation=cfg.interpolation,
                    data_dir=cfg.data_dir, val_split=cfg.val_split)
    elif path.is_file():  # a weights file, or a checkpoint read as another model or size
        if model is None:
            raise ValueError(f"--model-kwargs with {path}: give --model NAME too")
        net = create_model(model, **(model_kwargs or {}))
        if weights:
            load_model_weights(net, path)
        info = dict(name=model, source=str(path) if weights else "untrained", img_size=img_size, crop_pct=None,
                    interpolation=None, data_dir=None, val_split="val")
    else:
        import timm

        if not timm.is_model(source):
            raise FileNotFoundError(f"{source} is neither a checkpoint file nor a registered model name (see `mlla models`)")
        size = img_size or 224
        net = build_model(source, (size, size), fuse=False) if not model_kwargs else create_model(source, **model_kwargs)
        info = dict(name=source, source="random initialisation", img_size=size, crop_pct=None, interpolation=None,
                    data_dir=None, val_split="val")
    pcfg = getattr(net, "pretrained_cfg", {}) or {}
    info["img_size"] = info["img_size"] or pcfg.get("input_size", (3, 224, 224))[-1]
    info["crop_pct"] = info["crop_pct"] or pcfg.get("crop_pct", 0.875)
    info["interpolation"] = info["interpolation"] or pcfg.get("interpolation", "bicubic")
    return net.eval(), info


def find_images(folder: str | os.PathLike, count: int) -> list[Path]:
    """``count`` image files spread evenly over the sorted files under ``folder`` (all classes)."""
    from ...data import IMG_EXTENSIONS

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMG_EXTENSIONS)}) under {folder}")
    step = max(1, len(files) // count)
    return files[::step][:count]


def load_images(model: nn.Module, info: dict[str, Any], files: Sequence[Path]) -> torch.Tensor:
    """``(B, 3, S, S)``: ``files`` through the model's evaluation transform."""
    from PIL import Image

    from ...data import build_transform

    tf = build_transform(model, is_training=False, img_size=info["img_size"], crop_pct=info["crop_pct"],
                         interpolation=info["interpolation"])
    return torch.stack([tf(Image.open(f).convert("RGB")) for f in files])


def study_baseline(source: str | os.PathLike) -> Path | None:
    """For ``OUT/<variant>/seed<k>/<file>`` of an ``mlla ablate`` study, the baseline's
    ``OUT/ablation_baseline/seed<k>/<file>`` if it exists (None for the baseline itself)."""
    path = Path(source)
    if not path.is_file() or not path.parent.name.startswith("seed") or path.parent.parent.name == "ablation_baseline":
        return None
    candidate = path.parent.parent.parent / "ablation_baseline" / path.parent.name / path.name
    return candidate if candidate.is_file() else None


def _erf_size(model: nn.Module, img_size: int) -> int:
    """At least 8x8 tokens in the last stage (else the centre token's field is the whole image by construction)."""
    info = getattr(model, "feature_info", None)
    reduction = info[-1]["reduction"] if isinstance(info, list) and info and "reduction" in info[-1] else 32
    return max(img_size, 8 * reduction)


def analyze(
    source: str,
    analyses: Sequence[str] | None,
    out_dir: str | os.PathLike,
    *,
    model: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    img_size: int | None = None,
    images: str | os.PathLike | None = None,
    image: str | os.PathLike | None = None,
    num_images: int = 16,
    compare: Sequence[str] = (),
    baseline: str | os.PathLike | None = None,
    erf_size: int | None = None,
    seed: int = 0,
) -> dict[str, list[Path]]:
    """Run ``analyses`` (default: every one of :data:`ANALYSES` that applies) on the model of
    ``source`` and write each one's PNG and numbers to ``out_dir``.

    Every analysis of a checkpoint is also run on its untrained twin (same model, size and seed,
    no training) and on ``baseline`` (a checkpoint; default: the same seed's baseline when
    ``source`` is a run of an ``mlla ablate`` study) where it applies. Images come from
    ``images`` (a folder), else the validation split of the data the checkpoint was trained on,
    else Gaussian noise (logged). ``compare``: more models (``NAME`` for a random initialisation or
    ``NAME=CHECKPOINT``). The ERF is measured at ``erf_size`` (default: the size that gives the
    last stage 8x8 tokens, at least the training size).

    Raises:
        AnalysisNotApplicable: an analysis asked for by name does not apply to the model.
    """
    log = _logger
    unknown = [a for a in analyses or () if a not in ANALYSES]
    if unknown:
        raise ValueError(f"unknown analysis {', '.join(unknown)}; choose from {', '.join(ANALYSES)}")
    net, info = load_model(source, model=model, model_kwargs=model_kwargs, img_size=img_size)
    folder = images
    if folder is None and info.get("data_dir") and (Path(info["data_dir"]) / info["val_split"]).is_dir():
        folder = Path(info["data_dir"]) / info["val_split"]
    files = find_images(folder, num_images) if folder is not None else []
    label = f"{info['name']} ({'random init' if info['source'] == 'random initialisation' else 'trained'})"
    subjects: list[tuple[str, nn.Module]] = [(label, net)]
    if Path(source).is_file():
        twin, twin_info = load_model(source, model=model, model_kwargs=model_kwargs, img_size=img_size, weights=False)
        subjects.append((f"{info['name']} ({twin_info['source']})", twin))
        baseline = baseline if baseline is not None else study_baseline(source)
        if baseline is not None:
            base_net, base_info = load_model(str(baseline), img_size=info["img_size"])
            subjects.append((f"{base_info['name']} (trained, {Path(baseline).parent.name})", base_net))
    for spec in compare:
        name, _, ckpt = spec.partition("=")
        other, _ = load_model(ckpt or name, model=name if ckpt else None, img_size=info["img_size"])
        subjects.append((f"{name} ({'trained' if ckpt else 'random init'})", other))
    log.info("analysing %s beside %s", label, ", ".join(s for s, _ in subjects[1:]) or "nothing")

    def batch_at(size: int) -> torch.Tensor:
        if files:
            return load_images(net, dict(info, img_size=size), files)
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(num_images, 3, size, size, generator=gen)

    if not files:
        log.warning("no --images and no training data known: using %d Gaussian-noise images", num_images)
    batch = batch_at(info["img_size"])
    erf_size = erf_size or _erf_size(net, info["img_size"])
    written: dict[str, list[Path]] = {}
    skipped = []
    for kind in analyses or ANALYSES:
        try:
            result = _run_one(kind, subjects, info, batch if kind != "erf" else batch_at(erf_size), files, image)
        except AnalysisNotApplicable as e:
            if analyses:
                raise
            skipped.append(f"{kind} ({e})")
            continue
        if kind == "erf":
            result["erf_size"] = erf_size
        written[kind] = write_analysis(kind, result, out_dir)
        log.info("%s: %s", kind, ", ".join(str(p) for p in written[kind]))
    if skipped:
        log.info("%d analyses do not apply to %s: %s", len(skipped), info["name"], "; ".join(skipped))
    return written


def _each(subjects: Sequence[tuple[str, nn.Module]], what: Callable[[nn.Module], Any], kind: str) -> dict[str, Any]:
    """``what`` of the first subject (errors propagate), then of each other one where it applies."""
    (label, net), *others = subjects
    out = {label: what(net)}
    for name, other in others:
        try:
            out[name] = what(other)
        except AnalysisNotApplicable as e:
            _logger.info("%s: %s left out of the comparison: %s", kind, name, e)
    return out


def _run_one(kind: str, subjects: Sequence[tuple[str, nn.Module]], info: dict[str, Any], batch: torch.Tensor,
             files: Sequence[Path], image: str | os.PathLike | None) -> dict[str, Any]:
    net = subjects[0][1]
    base = dict(model=info["name"], source=info["source"], img_size=info["img_size"], num_images=len(batch))
    if kind == "forget-gate":
        return dict(base, means=_each(subjects, lambda m: forget_gate_means(m, batch), kind))
    if kind == "input-gate":
        from PIL import Image

        _gated(net, "input_gate")  # not applicable: say so before asking for an image
        path = Path(image) if image is not None else (files[0] if files else None)
        if path is None:
            raise ValueError("the input-gate map needs an image: pass --image PATH or --images DIR")
        x = load_images(net, info, [path])[0]
        maps = _each(subjects, lambda m: {k: v.tolist() for k, v in input_gate_maps(m, x).items()}, kind)
        shown = Image.open(path).convert("RGB").resize((info["img_size"], info["img_size"]))
        return dict(base, image_file=str(path), image=shown, maps=maps)
    if kind == "token-norms":
        runs = _each(subjects, lambda m: token_norm_spread(m, batch), kind)
        gated = [m for m in net.modules() if isinstance(m, GatedLinearAttention)]
        if gated:
            on = gated[0].normalize
            with attention_normalization(net, not on):
                runs[f"{subjects[0][0]}, normalisation switched {'off' if on else 'on'}"] = token_norm_spread(net, batch)
        return dict(base, runs=runs)
    if kind == "erf":
        maps = _each(subjects, lambda m: effective_receptive_field(m, batch), kind)
        ratios = {name: {str(f): erf_area_ratio(erf, f) for f in (0.2, 0.5, 0.99)} for name, erf in maps.items()}
        return dict(base, maps={k: v.tolist() for k, v in maps.items()}, area_ratio=ratios)
    raise ValueError(f"unknown analysis {kind!r}; choose from {', '.join(ANALYSES)}")
