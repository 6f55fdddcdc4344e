"""Reading, loading and atomically writing weights (safe by default)."""
from __future__ import annotations

import logging
import os
import pickle
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

__all__ = [
    "CheckpointError",
    "atomic_save",
    "load_checkpoint",
    "load_weights",
    "read_checkpoint",
    "save_state_dict",
    "select_weights",
    "unwrap_features_only",
    "unwrap_state_dict",
]

_logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read or does not fit the model."""


# The authors' training checkpoints pickle their configuration as a ``yacs.config.CfgNode`` (a
# dict subclass). While reading, that one name is bound to a stand-in that builds a plain
# OrderedDict of the values, so the file's own classes never run and yacs need not be installed.
_AUTHORS_CONFIG_CLASS = "yacs.config.CfgNode"
# Where a checkpoint keeps its weights: the raw (trained) weights, and their moving average.
_RAW_KEYS = ("model", "state_dict")
_EMA_KEYS = ("model_ema", "state_dict_ema")


class _InertConfig:
    """Stand-in for the authors' config class while unpickling: an OrderedDict of its values."""

    def __new__(cls, *args: Any, **kwargs: Any) -> OrderedDict:
        return OrderedDict()


def read_checkpoint(path: str | os.PathLike, *, trust_pickle: bool = False) -> dict[str, Any]:
    """Read a ``.safetensors`` or ``.pth``/``.pt`` file into a dict on the CPU.

    ``.pth`` files are read with ``torch.load(weights_only=True)``: tensors and plain Python
    values only, no code from the file runs. The authors' config object (``yacs.config.CfgNode``)
    is read as a plain ``OrderedDict`` of its values. Any other pickled object is refused; set
    ``trust_pickle=True`` only for a file from a source you trust (or convert it once with
    ``mlla convert IN OUT.safetensors --trust-pickle``).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file is corrupt, truncated, or holds other Python objects.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        if trust_pickle:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals([(_InertConfig, _AUTHORS_CONFIG_CLASS)]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} holds Python objects besides tensors ({_unsafe_globals(path) or str(e).splitlines()[0]}), "
            f"which are not loaded because unpickling them could run code from the file. If you trust its "
            f"source, convert it once with `mlla convert {path} OUT.safetensors --trust-pickle` and load OUT."
        ) from e
    except Exception as e:  # torch.load and safetensors raise many types for a damaged file
        raise CheckpointError(f"could not read checkpoint {path}: it is corrupt or truncated ({type(e).__name__}: {e})") from e


def _unsafe_globals(path: Path) -> str:
    try:
        with torch.serialization.safe_globals([(_InertConfig, _AUTHORS_CONFIG_CLASS)]):
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # the message then falls back to torch's own
        return ""
    return ", ".join(names)


def select_weights(checkpoint: dict[str, Any], *, use_ema: bool = False, source: str = "checkpoint") -> dict[str, Any]:
    """The weights every loader takes from a checkpoint (one rule for all routes).

    A bare state dict is its own weights. A training checkpoint (ours, the authors', timm's,
    mmdet's) gives its raw weights, ``model`` or ``state_dict``, the weights its own evaluation
    uses; with ``use_ema`` its EMA weights, ``model_ema`` or ``state_dict_ema``. A checkpoint that
    holds only EMA weights gives those (logged).

    Raises:
        CheckpointError: ``use_ema`` and the checkpoint has no EMA weights.
    """
    raw = next((checkpoint[k] for k in _RAW_KEYS if isinstance(checkpoint.get(k), dict)), None)
    ema = next((checkpoint[k] for k in _EMA_KEYS if isinstance(checkpoint.get(k), dict)), None)
    if use_ema:
        if ema is None:
            raise CheckpointError(
                f"{source} holds no EMA weights (none of {list(_EMA_KEYS)}); load its raw weights (drop use_ema / --use-ema)"
            )
        return ema
    if raw is None and ema is not None:
        _logger.info("%s holds only EMA weights: loading those", source)
        return ema
    return checkpoint if raw is None else raw


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
    use_ema: bool = False,
) -> nn.Module:
    """Load weights from ``path`` into ``model`` (ours or the authors' layout, any container).

    Args:
        model: a model from this package, or timm's ``features_only`` wrapper around one.
        path: ``.safetensors`` or ``.pth`` file.
        strict: fail on missing or unexpected keys.
        allow_head_mismatch: keep the model's classifier when the checkpoint's has another
            number of classes (fine-tuning) instead of failing.
        trust_pickle: see :func:`read_checkpoint`.
        use_ema: take a training checkpoint's EMA weights (see :func:`select_weights`).

    Raises:
        CheckpointError: unreadable file, other model size, other class count, missing keys.
    """
    checkpoint = read_checkpoint(path, trust_pickle=trust_pickle)
    return load_weights(model, checkpoint, source=str(path), strict=strict,
                        allow_head_mismatch=allow_head_mismatch, use_ema=use_ema)


def load_weights(
    model: nn.Module,
    checkpoint: dict[str, Any],
    *,
    source: str = "checkpoint",
    strict: bool = True,
    allow_head_mismatch: bool = False,
    use_ema: bool = False,
) -> nn.Module:
    """:func:`load_checkpoint` for a checkpoint already read (``source`` names it in errors)."""
    target = unwrap_features_only(model)
    state_dict = select_weights(checkpoint, use_ema=use_ema, source=source)
    filter_fn = _filter_fn_for(target)
    try:
        state_dict = filter_fn(state_dict, target) if filter_fn else unwrap_state_dict(state_dict)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from e
    own = target.state_dict()
    head = [k for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
    if head:
        message = (
            f"{source}: classifier has shape {tuple(state_dict[head[0]].shape)} but the model's is "
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
            f"{source} does not match the model: {len(missing)} missing keys {missing[:8]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:8]}"
        )
    return model


def unwrap_state_dict(state_dict: dict[str, Any], *, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint, chosen by :func:`select_weights`, with
    ``module.``/``model.``/``_orig_mod.``/``backbone.`` prefixes stripped and, in an mmdet/mmseg
    checkpoint, everything outside ``backbone.`` dropped (counted and logged)."""
    state_dict = select_weights(state_dict, use_ema=use_ema)
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
