"""Store sizes, forward FLOPs and the recommended path for four large MoE models (docs/guide.md, "Sizing").

    python analyses/sizing.py                          # print the tables
    python analyses/sizing.py --write docs/guide.md    # and put them between the sizing markers

Everything here is arithmetic; nothing is downloaded and no model is run. Each model's configuration
is built from its transformers config class with the published hyper-parameters written below (the
``config.json`` of the checkpoint named in ``source``); from it come

- the layers ``--layers auto`` captures (:func:`routesae.layers.routesae_layers`: blocks
  ``L//4 - 1 .. 3L//4 - 1``) and the MoE layers whose routing every capture records;
- bytes per token by :func:`routesae.store_size.bytes_per_token`, the function capture itself uses
  (activations of the captured layers, plus per MoE layer int16 indices and float16 weights of the
  top-k slots, a uint8 count and, by default, float16 router logits for every expert);
- parameter counts by the formulas of :func:`param_counts`, term by term as transformers builds each
  family (tests/test_sizing.py checks them against a model instantiated on the meta device, and the
  bytes per token against a real capture of a tiny model); active parameters count k of the E routed
  experts, forward FLOPs per token are 2 x the active parameters without the input embedding (a
  lookup), attention over the context not included.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from experiment_steps import markdown_table  # noqa: E402

from routesae.atomic import atomic_write_text  # noqa: E402
from routesae.layers import routesae_layers  # noqa: E402
from routesae.store_size import bytes_per_token, gb  # noqa: E402

# name -> (config class, published hyper-parameters, source, published total / active parameters)
MODELS: dict[str, tuple[str, dict, str, str]] = {
    "OLMoE-1B-7B": ("OlmoeConfig", {
        "hidden_size": 2048, "num_hidden_layers": 16, "intermediate_size": 1024, "num_experts": 64,
        "num_experts_per_tok": 8, "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 50304,
        "tie_word_embeddings": False},
        "allenai/OLMoE-1B-7B-0924 config.json", "6.9B total / 1.3B active (OLMoE paper, model card)"),
    "Mixtral-8x7B": ("MixtralConfig", {
        "hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336, "num_local_experts": 8,
        "num_experts_per_tok": 2, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
        "tie_word_embeddings": False},
        "mistralai/Mixtral-8x7B-v0.1 config.json", "46.7B total / 12.9B active (Mistral AI announcement)"),
    "Qwen3-30B-A3B": ("Qwen3MoeConfig", {
        "hidden_size": 2048, "num_hidden_layers": 48, "intermediate_size": 6144, "moe_intermediate_size": 768,
        "num_experts": 128, "num_experts_per_tok": 8, "num_attention_heads": 32, "num_key_value_heads": 4,
        "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": False, "mlp_only_layers": [],
        "decoder_sparse_step": 1},
        "Qwen/Qwen3-30B-A3B config.json", "30.5B total / 3.3B active (model card)"),
    "DeepSeek-V3": ("DeepseekV3Config", {
        "hidden_size": 7168, "num_hidden_layers": 61, "intermediate_size": 18432, "moe_intermediate_size": 2048,
        "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 3,
        "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_group": 8, "topk_group": 4,
        "vocab_size": 129280, "tie_word_embeddings": False},
        "deepseek-ai/DeepSeek-V3 config.json", "671B total / 37B active, plus a 14B MTP module transformers does "
                                               "not build (technical report)"),
}

H100_BYTES = 80e9  # one H100's memory (the H200 has 141 GB)
H100_BF16_FLOPS = 989e12  # dense bf16 peak, no sparsity


def build_config(name: str):
    cls, hyper, _, _ = MODELS[name]
    return getattr(transformers, cls)(**hyper)


def n_experts(conf) -> int:
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if getattr(conf, key, None):
            return int(getattr(conf, key))
    raise ValueError(f"{type(conf).__name__} names no number of experts")


def moe_layers(conf) -> list[int]:
    """Blocks with a routed MoE layer, as transformers builds the family."""
    n = conf.num_hidden_layers
    if conf.model_type == "deepseek_v3":
        return list(range(conf.first_k_dense_replace, n))
    if conf.model_type in ("qwen3_moe", "qwen2_moe"):
        dense = set(conf.mlp_only_layers or [])
        return [i for i in range(n) if i not in dense and (i + 1) % conf.decoder_sparse_step == 0]
    if conf.model_type in ("olmoe", "mixtral"):
        return list(range(n))
    raise ValueError(f"no MoE layer rule for model type {conf.model_type}")


def _attention(conf) -> int:
    d, h = conf.hidden_size, conf.num_attention_heads
    if conf.model_type == "deepseek_v3":  # multi-head latent attention with low-rank q and kv
        qk = conf.qk_nope_head_dim + conf.qk_rope_head_dim
        q = d * conf.q_lora_rank + conf.q_lora_rank + conf.q_lora_rank * h * qk  # q_a, q_a_layernorm, q_b
        kv = d * (conf.kv_lora_rank + conf.qk_rope_head_dim) + conf.kv_lora_rank  # kv_a_with_mqa, its norm
        kv += conf.kv_lora_rank * h * (conf.qk_nope_head_dim + conf.v_head_dim)  # kv_b
        return q + kv + h * conf.v_head_dim * d  # o_proj
    hd = getattr(conf, "head_dim", None) or d // h
    kv = conf.num_key_value_heads * hd
    proj = d * h * hd + 2 * d * kv + h * hd * d  # q, k, v, o (no biases in these families)
    if conf.model_type == "olmoe":
        return proj + h * hd + kv  # q_norm and k_norm over all heads
    if conf.model_type == "qwen3_moe":
        return proj + 2 * hd  # q_norm and k_norm per head
    return proj


def param_counts(conf) -> dict[str, int]:
    """``total``, ``active`` (k of E routed experts) and ``embedding`` parameters, by formula."""
    d, v, n = conf.hidden_size, conf.vocab_size, conf.num_hidden_layers
    moe = set(moe_layers(conf))
    e, k = n_experts(conf), int(conf.num_experts_per_tok)
    expert = 3 * d * int(getattr(conf, "moe_intermediate_size", None) or conf.intermediate_size)  # gate, up, down
    shared = 3 * d * conf.moe_intermediate_size * conf.n_shared_experts if conf.model_type == "deepseek_v3" else 0
    embedding = v * d
    total = embedding + (0 if conf.tie_word_embeddings else v * d) + d  # + lm_head, final norm
    active = total
    for i in range(n):
        layer = 2 * d + _attention(conf)  # two norms, attention
        if i in moe:
            total += layer + d * e + e * expert + shared  # router, experts, shared experts
            active += layer + d * e + k * expert + shared
        else:
            total += layer + 3 * d * conf.intermediate_size
            active += layer + 3 * d * conf.intermediate_size
    return {"total": total, "active": active, "embedding": embedding}


def store_header(conf, router_logits: bool = True) -> dict:
    """The part of a store manifest that sets its bytes per token, for ``--layers auto``."""
    return {"layers": routesae_layers(conf.num_hidden_layers), "d_model": conf.hidden_size,
            "moe_layers": moe_layers(conf), "k_max": int(conf.num_experts_per_tok), "n_experts": n_experts(conf),
            "router_logits": router_logits, "router_extras": []}


def sizing(name: str) -> dict:
    conf = build_config(name)
    header = store_header(conf)
    p = param_counts(conf)
    per = {dt: bytes_per_token(header, b) for dt, b in (("bf16", 2), ("fp32", 4))}
    router = per["bf16"] - len(header["layers"]) * conf.hidden_size * 2
    topk_only = bytes_per_token(store_header(conf, router_logits=False), 2) - (per["bf16"] - router)
    flops = 2 * (p["active"] - p["embedding"])
    return {"name": name, "conf": conf, "header": header, "params": p, "per_token": per, "router": router,
            "router_topk": topk_only, "flops": flops, "weights_bf16": 2 * p["total"]}


def _b(n: float) -> str:
    return f"{n / 1e9:.1f}B"


def _kb(n: int) -> str:
    return f"{n / 1000:,.1f} KB" if n >= 1000 else f"{n} B"


def _layers(layers: list[int]) -> str:
    return f"{layers[0]}..{layers[-1]} ({len(layers)})"


RECOMMENDED = {
    "OLMoE-1B-7B": "1 GPU per process (weights 14 GB); a store up to ~10M tokens, capture on N GPUs with "
                   "`torchrun --nproc_per_node N`; online training beyond",
    "Mixtral-8x7B": "2 H100 by `--device-map auto` in one process, or 1 H200 per process under torchrun; a store "
                    "of a few M tokens, online training for 10M+",
    "Qwen3-30B-A3B": "1 H100 (61 of 80 GB: small `--batch-size`) or 1 H200 per process; a store of a few M tokens, "
                     "online training for 10M+",
    "DeepSeek-V3": "does not fit one 8-GPU node in bf16: 8 H200 with the FP8 checkpoint (671 GB, untested here), "
                   "one process with `--device-map auto`; online training, or a store of under 1M tokens / "
                   "fewer `--layers`",
}


def tables() -> str:
    rows = [sizing(n) for n in MODELS]
    size = markdown_table(
        ["model", "blocks", "`--layers auto`", "d_model", "MoE layers x experts, top-k",
         "bytes/token bf16 (router records)", "bytes/token fp32", "10M tokens bf16 / fp32",
         "100M tokens bf16 / fp32"],
        [[r["name"], r["conf"].num_hidden_layers, _layers(r["header"]["layers"]), f"{r['conf'].hidden_size:,}",
          f"{len(r['header']['moe_layers'])} x {r['header']['n_experts']}, top-{r['header']['k_max']}",
          f"{_kb(r['per_token']['bf16'])} ({_kb(r['router'])}; top-k only {_kb(r['router_topk'])})",
          _kb(r["per_token"]["fp32"]),
          f"{gb(1e7 * r['per_token']['bf16'])} / {gb(1e7 * r['per_token']['fp32'])}",
          f"{gb(1e8 * r['per_token']['bf16'])} / {gb(1e8 * r['per_token']['fp32'])}"] for r in rows])
    compute = markdown_table(
        ["model", "parameters total / active (arithmetic)", "published", "forward GFLOPs/token",
         "weights bf16 (H100s by memory)", "100M tokens at an H100's bf16 peak", "recommended path"],
        [[r["name"], f"{_b(r['params']['total'])} / {_b(r['params']['active'])}", MODELS[r["name"]][3],
          f"{r['flops'] / 1e9:.1f}", f"{gb(r['weights_bf16'])} ({math.ceil(r['weights_bf16'] / H100_BYTES)})",
          f"{1e8 * r['flops'] / H100_BF16_FLOPS / 3600:.2f} GPU-h", RECOMMENDED[r["name"]]] for r in rows])
    sources = "; ".join(f"{n}: `{cls}` with the values of {src}" for n, (cls, _, src, _) in MODELS.items())
    return (f"{size}\n\n{compute}\n\nBasis: arithmetic (`python analyses/sizing.py`), not measured: no run of these "
            f"models by this project. Configurations: {sources}. GFLOPs per token = 2 x (active parameters - input "
            f"embedding); the GPU-hours at peak (989 TFLOP/s bf16 dense) are a lower bound, real forward passes "
            f"reach a fraction of it. Store sizes: activations of the `--layers auto` range plus the router records "
            f"of every MoE layer with `--router-logits` (the default; the top-k-only figure is "
            f"`--no-router-logits`), token table (a few tens of bytes per token) not included.")


def write(path: Path, text: str) -> None:
    """Replace the text between ``<!-- sizing:begin -->`` and ``<!-- sizing:end -->`` in ``path`` (atomically)."""
    begin, end = "<!-- sizing:begin -->", "<!-- sizing:end -->"
    old = path.read_text()
    pat = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pat.search(old):
        raise SystemExit(f"{path} has no {begin} ... {end} markers; add them where the tables go")
    atomic_write_text(path, pat.sub(lambda _: f"{begin}\n{text.strip()}\n{end}", old))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", type=Path, help="Markdown file with sizing markers to update (docs/guide.md).")
    args = ap.parse_args(argv)
    text = tables()
    print(text)
    if args.write:
        write(args.write, text)
        print(f"wrote {args.write}")


if __name__ == "__main__":
    main()
