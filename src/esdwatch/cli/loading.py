"""Turn a command-line TARGET into something :func:`esdwatch.analyze` accepts.

A TARGET is one of: a Lightning ``.ckpt``; a torch state-dict file (``.pt``, ``.pth``,
``.bin``); a ``.safetensors`` file; a Hugging Face model directory (``config.json`` plus
weights, built with transformers when installed, offline; read as a plain state dict
otherwise); or ``package.module:attribute`` naming a model or a zero-argument factory.

Nothing in a checkpoint or a model directory is ever run: torch files are read with
``weights_only=True`` (unpickling arbitrary objects would run code), and a model
directory whose ``config.json`` asks for its own Python code (``auto_map``) is refused
before transformers sees it (which is also called with ``trust_remote_code=False``, so
it never prompts). Only a ``package.module:attribute`` TARGET runs code: the code the
user named. Every :class:`TargetError` message is one plain sentence (no terminal
escape codes, even when it relays a library's message).
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["TargetError", "load_target", "plain_text"]

#: What a TARGET may be, for the messages that refuse one.
EXPECTED = (
    "expected a Lightning .ckpt, a torch.save() state dict (.pt, .pth, .bin), a .safetensors file, "
    "a Hugging Face model directory or package.module:factory"
)

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


class TargetError(ValueError):
    """TARGET cannot be turned into a model or a state dict (message is user-facing)."""


def plain_text(message: object, limit: int = 200) -> str:
    """A library's message as plain text for one of our sentences: terminal escape codes
    removed, whitespace collapsed, its first sentence only, without the final period;
    longer than ``limit`` characters, cut at a word and marked with "..."."""
    text = " ".join(_ANSI.sub("", str(message)).split())
    text = _SENTENCE_END.split(text, maxsplit=1)[0].rstrip(".")
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " ..."
    return text


def _informative(text: str) -> bool:
    """Whether a relayed message says something (KeyError('101') from a text file does not)."""
    return len(text.split()) >= 3


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
    raise TargetError(f"{source} holds no tensors, so it is not a model checkpoint or a state dict.")


# ------------------------------------------------------------------ files


def _head(path: Path, size: int = 4096) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(size)


def _is_text(head: bytes) -> bool:
    """Whether the first bytes of a file are UTF-8 text (no NUL; a character cut by the
    end of ``head`` is allowed)."""
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start >= len(head) - 3 and exc.reason == "unexpected end of data"
    return True


def _is_safetensors(path: Path, head: bytes) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON header."""
    if len(head) < 10:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= path.stat().st_size - 8 and head[8:9] == b"{"


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    """A weights file of any supported kind, recognised by its content rather than its suffix."""
    try:
        head = _head(path)
    except OSError as exc:
        raise TargetError(f"{path} cannot be read ({plain_text(exc.strerror or exc)}).") from None
    if not head:
        raise TargetError(f"{path} is empty, not a model: {EXPECTED}.")
    if path.suffix == ".safetensors" or _is_safetensors(path, head):
        return _load_safetensors(path)
    if not head.startswith((b"PK\x03\x04", b"\x80")) and _is_text(head):
        # torch.save writes a zip archive (or, legacy, a binary pickle): never text
        raise TargetError(f"{path} is a text file, not a model: {EXPECTED}.")
    return _load_torch_file(path)


def _pickle_refusal(path: Path, exc: Exception) -> TargetError:
    """The message for a file that ``weights_only=True`` refuses: it pickles Python objects."""
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    what = f"a pickled {found.group(1)} object" if found else "pickled Python objects"
    return TargetError(
        f"{path} holds {what}, not just tensors, and esdwatch never unpickles such objects because that could "
        "run code from the file: save the weights alone with torch.save(model.state_dict(), PATH) or as "
        ".safetensors and analyze that file, or pass the code that builds the model as package.module:factory."
    )


def _load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" in str(exc).lower() or "weightsunpickler" in str(exc).lower():
            raise _pickle_refusal(path, exc) from None
        raise TargetError(f"{path} is not a torch weights file ({plain_text(exc)}): {EXPECTED}.") from None
    except Exception as exc:  # zip errors, truncated files, foreign binary data ...
        reason = plain_text(exc)
        why = f" ({reason})" if _informative(reason) else ""
        raise TargetError(f"{path} is not a torch weights file{why}: {EXPECTED}.") from None
    return _tensor_mapping(obj, str(path))


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise TargetError("Reading .safetensors needs the safetensors package: pip install 'esdwatch[hf]'.") from None
    try:
        return dict(load_file(str(path), device="cpu"))
    except Exception as exc:
        raise TargetError(f"{path} cannot be read as a safetensors file ({plain_text(exc)}).") from None


# ------------------------------------------------------- model directories


def _weight_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise TargetError(
            f"{path / 'config.json'} is not valid JSON ({plain_text(exc)}), "
            "so this is not a Hugging Face model directory esdwatch can read."
        ) from None
    if not isinstance(config, dict):
        raise TargetError(
            f"{path / 'config.json'} is not a JSON object, so this is not a Hugging Face model directory."
        )
    return config


def _refuse_remote_code(path: Path, config: Mapping[str, Any]) -> None:
    """A directory whose config asks for its own Python code (``auto_map``) is never loaded."""
    auto_map = config.get("auto_map")
    if not auto_map:
        return
    values = list(auto_map.values()) if isinstance(auto_map, Mapping) else [auto_map]
    # a value is "module.Class", or a list of them (tokenizers: [slow, fast], null for none)
    names = sorted({str(n) for v in values for n in (v if isinstance(v, list) else [v]) if n})
    shown = ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")
    files = _weight_files(path)
    instead = (
        f"to analyze its weights alone, run 'esdwatch analyze {files[0]}'"
        if len(files) == 1
        else "to analyze its weights alone, run 'esdwatch analyze' on one of its weight files"
        if files
        else "it has no weight file to analyze instead"
    )
    raise TargetError(
        f"{path} asks to run its own Python code (auto_map in config.json: {shown}), and esdwatch never runs "
        f"code from a model directory; {instead}."
    )


def _load_hf_directory(path: Path) -> torch.nn.Module | dict[str, torch.Tensor]:
    _refuse_remote_code(path, _read_config(path))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers  # noqa: F401

        have_transformers = True
    except ImportError:
        have_transformers = False
    if have_transformers:
        try:
            from transformers import AutoModel

            # trust_remote_code=False: never run the directory's code, and never ask
            # (None would prompt on a terminal); local_files_only: never reach the Hub
            return AutoModel.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
        except Exception as exc:
            raise TargetError(f"transformers cannot load the model directory {path} ({plain_text(exc)}).") from None
    # without transformers: the weight files alone are a state dict
    weights: dict[str, torch.Tensor] = {}
    for file in _weight_files(path):
        weights.update(_load_file(file))
    if not weights:
        raise TargetError(f"{path} has a config.json but no *.safetensors or *.bin weights.")
    return weights


# ------------------------------------------------------ package.module:attr


def _exit_code(exc: SystemExit) -> str:
    return f"SystemExit({exc.code!r})" if exc.code is not None else "SystemExit()"


def _load_attribute(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except SystemExit as exc:
        raise TargetError(
            f"Importing {module_name!r} raised {_exit_code(exc)}, so it cannot provide a model: "
            "name a module that defines the model without exiting."
        ) from None
    except Exception as exc:
        raise TargetError(f"Cannot import {module_name!r} ({type(exc).__name__}: {plain_text(exc)}).") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise TargetError(f"{module_name!r} has no attribute {attr!r}.")
        obj = getattr(obj, part)
    if not isinstance(obj, (torch.nn.Module, Mapping)) and callable(obj):
        try:
            obj = obj()
        except SystemExit as exc:
            raise TargetError(
                f"Calling {spec} raised {_exit_code(exc)} instead of returning a model: "
                "pass a zero-argument function that returns an nn.Module or a state dict."
            ) from None
        except Exception as exc:
            raise TargetError(f"Calling {spec} failed ({type(exc).__name__}: {plain_text(exc)}).") from None
    if isinstance(obj, (torch.nn.Module, Mapping)):
        return obj
    raise TargetError(f"{spec} is a {type(obj).__name__}, not an nn.Module, a state dict or a factory of one.")


def load_target(target: str) -> torch.nn.Module | dict[str, torch.Tensor]:
    """Load TARGET (see module docstring); raises :class:`TargetError` with a one-sentence reason."""
    path = Path(target)
    if path.is_dir():
        if (path / "config.json").exists():
            return _load_hf_directory(path)
        raise TargetError(f"{path} is a directory without config.json, so it is not a Hugging Face model directory.")
    if path.is_file():
        return _load_file(path)
    if ":" in target and not path.exists():
        return _load_attribute(target)
    raise TargetError(f"{target} is not an existing file or directory, nor a 'package.module:attribute' reference.")
