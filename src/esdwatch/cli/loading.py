"""Turn a command-line TARGET into something :func:`esdwatch.analyze` accepts.

A TARGET is one of: a Lightning ``.ckpt``; a torch state-dict file (``.pt``, ``.pth``,
``.bin``); a ``.safetensors`` file; a Hugging Face model directory (``config.json`` plus
weights, built with transformers when installed, offline; read as a plain state dict
otherwise); or ``package.module:attribute`` naming a model or a zero-argument factory.
Torch files are always read with ``weights_only=True``: a checkpoint is data, and
unpickling arbitrary objects from it would run code.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["TargetError", "load_target"]


class TargetError(ValueError):
    """TARGET cannot be turned into a model or a state dict (message is user-facing)."""


def _tensor_mapping(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """The flat name -> tensor mapping inside a loaded torch object."""
    if isinstance(obj, Mapping):
        # Lightning checkpoints and many training scripts nest the weights
        for key in ("state_dict", "model_state_dict", "model", "module"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise TargetError(f"{source} holds no tensors: not a model checkpoint or state dict")


def _load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, truncated files ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TargetError(f"cannot read {path} as a torch weights file ({first[:200]})") from None
    return _tensor_mapping(obj, str(path))


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise TargetError("reading .safetensors needs the safetensors package: pip install 'esdwatch[hf]'") from None
    try:
        return dict(load_file(str(path), device="cpu"))
    except Exception as exc:
        raise TargetError(f"cannot read {path} as safetensors ({str(exc)[:200]})") from None


def _load_hf_directory(path: Path) -> torch.nn.Module | dict[str, torch.Tensor]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers  # noqa: F401

        have_transformers = True
    except ImportError:
        have_transformers = False
    if have_transformers:
        try:
            from transformers import AutoModel

            return AutoModel.from_pretrained(str(path))
        except Exception as exc:
            raise TargetError(f"transformers cannot load the model directory {path} ({str(exc)[:200]})") from None
    # without transformers: the weight files alone are a state dict
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        weights.update(_load_safetensors(file))
    if not weights:
        for file in sorted(path.glob("*.bin")):
            weights.update(_load_torch_file(file))
    if not weights:
        raise TargetError(f"{path} has a config.json but no *.safetensors or *.bin weights")
    return weights


def _load_attribute(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise TargetError(f"cannot import {module_name!r} ({type(exc).__name__}: {exc})") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise TargetError(f"{module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, (torch.nn.Module, Mapping)) and callable(obj):
        try:
            obj = obj()
        except Exception as exc:
            raise TargetError(f"calling {spec} failed ({type(exc).__name__}: {exc})") from None
    if isinstance(obj, (torch.nn.Module, Mapping)):
        return obj
    raise TargetError(f"{spec} is a {type(obj).__name__}, not an nn.Module, a state dict or a factory of one")


def load_target(target: str) -> torch.nn.Module | dict[str, torch.Tensor]:
    """Load TARGET (see module docstring); raises :class:`TargetError` with a one-line reason."""
    path = Path(target)
    if path.is_dir():
        if (path / "config.json").exists():
            return _load_hf_directory(path)
        raise TargetError(f"{path} is a directory without config.json: not a Hugging Face model directory")
    if path.is_file():
        if path.suffix == ".safetensors":
            return _load_safetensors(path)
        return _load_torch_file(path)
    if ":" in target and not path.exists():
        return _load_attribute(target)
    raise TargetError(f"{target}: no such file or directory, and not a 'package.module:attribute' reference")
