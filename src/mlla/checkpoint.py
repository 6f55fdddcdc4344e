"""Reading, loading and atomically writing weights (safe by default)."""
from __future__ import annotations

import logging
import os
import pickle
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

__all__ = [
    "CheckpointError",
    "atomic_save",
    "load_checkpoint",
    "read_checkpoint",
    "save_state_dict",
    "unwrap_features_only",
    "unwrap_state_dict",
]

_logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read or does not fit the model."""


def read_checkpoint(path: str | os.PathLike, *, trust_pickle: bool = False) -> dict[str, Any]:
    """Read a ``.safetensors`` or ``.pth``/``.pt`` file into a dict on the CPU.

    ``.pth`` files are read with ``torch.load(weights_only=True)``: no code from the file runs.
    Set ``trust_pickle=True`` only for files from a source you trust that also hold other
    Python objects (for example the authors' training checkpoints with their config object).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file is corrupt, truncated, or holds non-tensor objects.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} holds Python objects besides tensors, which are not loaded by default for safety "
            f"({str(e).splitlines()[0]}). If you trust its source, convert it once with "
            f"`mlla convert {path} OUT.safetensors --trust-pickle`."
        ) from e
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile, Exception) as e:
        raise CheckpointError(f"could not read checkpoint {path}: it is corrupt or truncated ({type(e).__name__}: {e})") from e


def _filter_fn_for(model: nn.Module) -> Callable[..., dict[str, torch.Tensor]] | None:
    module = sys.modules.get(type(model).__module__)
    return getattr(module, "checkpoint_filter_fn", None)


def unwrap_features_only(model: nn.Module) -> nn.Module:
    """The network inside timm's ``features_only`` wrapper (``FeatureGetterNet.model``).

    Any other model, one with its own ``stem`` included, is returned as it is.
    """
    return model if hasattr(model, "stem") else getattr(model, "model", model)


def load_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    strict: bool = True,
    allow_head_mismatch: bool = False,
    trust_pickle: bool = False,
) -> nn.Module:
    """Load weights from ``path`` into ``model`` (ours or the authors' layout, any container).

    Args:
        model: a model from this package, or timm's ``features_only`` wrapper around one.
        path: ``.safetensors`` or ``.pth`` file.
        strict: fail on missing or unexpected keys.
        allow_head_mismatch: keep the model's classifier when the checkpoint's has another
            number of classes (fine-tuning) instead of failing.
        trust_pickle: see :func:`read_checkpoint`.

    Raises:
        CheckpointError: unreadable file, other model size, other class count, missing keys.
    """
    target = unwrap_features_only(model)
    state_dict = read_checkpoint(path, trust_pickle=trust_pickle)
    filter_fn = _filter_fn_for(target)
    try:
        state_dict = filter_fn(state_dict, target) if filter_fn else unwrap_state_dict(state_dict)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    own = target.state_dict()
    head = [k for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
    if head:
        message = (
            f"{path}: classifier has shape {tuple(state_dict[head[0]].shape)} but the model's is "
            f"{tuple(own[head[0]].shape)} (different number of classes)"
        )
        if not allow_head_mismatch:
            raise CheckpointError(message + "; create the model with the checkpoint's num_classes")
        _logger.warning("%s: keeping the model's classifier", message)
        for k in head:
            state_dict[k] = own[k]
    missing, unexpected = target.load_state_dict(state_dict, strict=False)
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{path} does not match the model: {len(missing)} missing keys {missing[:8]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:8]}"
        )
    return model


def unwrap_state_dict(state_dict: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: under its ``model``/``state_dict``/EMA key if it has one, with
    ``module.``/``model.``/``_orig_mod.``/``backbone.`` prefixes stripped and, in an mmdet/mmseg
    checkpoint, everything outside ``backbone.`` dropped (counted and logged)."""
    for key in ("model", "state_dict", "model_ema", "state_dict_ema"):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
            break
    prefixes = ("module.", "model.", "_orig_mod.", "backbone.")
    out = {}
    dropped = 0
    has_backbone = any(k.startswith("backbone.") for k in state_dict)
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            dropped += 1
            continue
        if has_backbone and not k.startswith("backbone."):
            dropped += 1  # neck / detection heads of an mmdet/mmseg checkpoint
            continue
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    if dropped:
        _logger.info("checkpoint: ignored %d entries that are not backbone weights", dropped)
    return out


def atomic_save(write: Callable[[str], None], path: str | os.PathLike) -> Path:
    """Call ``write(tmp_path)``, fsync it and rename it to ``path``: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_state_dict(state_dict: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Atomically write tensors as ``.safetensors`` (or ``.pth`` for another suffix)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        return atomic_save(lambda tmp: save_file(tensors, tmp, metadata=metadata), path)
    return atomic_save(lambda tmp: torch.save(tensors, tmp), path)
