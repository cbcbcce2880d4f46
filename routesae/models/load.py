"""Open a checkpoint: a local Hugging Face folder or a hub name, with dtype, device and device_map.

The real ``from_pretrained(name_or_path)`` path is kept for hub checkpoints; on machines without
a hub, pass a local folder. ``trust_remote_code`` is only ever set when the user asks for it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(ValueError):
    """A checkpoint that cannot be opened; the message says what to change."""


@dataclass
class ModelConfig:
    """How to open a model."""

    name_or_path: str
    dtype: str = "float32"
    device: str = "auto"  # cpu | cuda | auto
    device_map: str | None = None  # e.g. "auto": let Hugging Face spread a large model over GPUs
    trust_remote_code: bool = False


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device} asked for, but no CUDA GPU is visible; use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ModelLoadError(f"--dtype {dtype} unknown; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).suffix != "" or name.count("/") != 1


def load_model(cfg: ModelConfig):
    """Return ``(model, tokenizer)`` in eval mode. The tokenizer may be None if the folder has none."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(cfg.name_or_path).expanduser()
    if not path.exists() and _looks_local(cfg.name_or_path):
        raise ModelLoadError(
            f"model folder '{cfg.name_or_path}' not found; pass an existing checkpoint folder "
            f"(with config.json) or a hub name like org/model"
        )
    if path.is_dir() and not (path / "config.json").exists():
        raise ModelLoadError(f"'{path}' has no config.json; point to a Hugging Face checkpoint folder")
    source = str(path) if path.exists() else cfg.name_or_path
    kwargs: dict = {"dtype": resolve_dtype(cfg.dtype)}
    if cfg.trust_remote_code:
        kwargs["trust_remote_code"] = True
    if cfg.device_map:
        kwargs["device_map"] = cfg.device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise ModelLoadError(
            f"cannot load model '{cfg.name_or_path}': {str(exc).splitlines()[0]}; "
            f"offline, pass a local checkpoint folder"
        ) from exc
    if not cfg.device_map:
        model.to(resolve_device(cfg.device))
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a causal LM (``model.model.layers`` for HF families)."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "blocks", "layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ModelLoadError(f"cannot find the decoder blocks of {type(model).__name__}; expected model.model.layers")


def base_model(model: nn.Module) -> nn.Module:
    """The decoder stack without the LM head (so capture does not compute vocabulary logits)."""
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, nn.Module) and hasattr(inner, "layers") else model


def config_hash(model: nn.Module) -> str:
    """A stable hash of the model's configuration (to recognise the same checkpoint)."""
    cfg = model.config.to_dict()
    for k in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash"):
        cfg.pop(k, None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def first_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
