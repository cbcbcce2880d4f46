"""GPU throughput of routesae (issue 18 §5): SAE training, online RouteSAE training, peak GPU memory.

    python bench/gpu.py [--out FILE] [--parts sae,online] [--peak-tflops X] [--steps 200] [--warmup 10]
                        [--online-steps 32] [--online-warmup 8] [--corpus DIR] [--workdir DIR]
    python bench/gpu.py --smoke        # every part at tiny sizes on CPU (a check that the script works)

One command, one GPU; the step counts are chosen to finish in under 10 minutes on one H100 (an
estimate: the script has not run on a GPU yet). Without CUDA (and without ``--smoke``) it stops
with a one-line message. A run that fails is reported in one line (progress, JSON, table) and the
other runs go ahead; the exit status is then 1.

(a) SAE training, d = 2,048, 16,384 latents, k = 64, batches of 4,096 tokens, bf16 encoder matmul
    (the SAE's default autocast on CUDA), for a TopK SAE and a RouteSAE over 9 routed layers (the
    paper's range for L = 16). The step is the package's own: the run is checked and built by
    ``routesae.train.check_run`` / ``start_run`` (default recipe, geometric-median init) and
    trained by ``routesae.train.run_loop`` (forward, loss, backward, decoder constraint, Adam,
    schedule, the per-step loss statistics), fed from a pool of 4 synthetic Gaussian batches
    generated on the GPU (no store). ``--warmup`` steps, then ``--steps`` timed steps between
    ``torch.cuda.synchronize()`` calls. No latent reaches the dead threshold (10M tokens) within the
    run, so AuxK is idle, as in the first 10M tokens of a real run.
    Reported: tokens/s and achieved TFLOP/s = 6 * d * M * tokens/s / 1e12, the cost of a dense
    encoder (forward 2dM + backward 4dM FLOP per token), against the GPU's dense bf16 peak
    (``PEAK_TFLOPS``; goal >= 25%). The executed count is lower: the decoder (``embedding_bag``)
    and the encoder backward (a COO product) touch only the k active latents, so the one dense
    product is the encoder forward, 2dM per token (``matmul_tflops``); the 6dM figure is thus a
    dense-equivalent rate, directly comparable with a dense SAE's.
(b) Online RouteSAE training (``routesae.online.train_online``, what ``routesae train --model M
    --corpus C`` runs) on a randomly initialised model of OLMoE-1B-7B's shape (``OLMOE_1B_7B``,
    built from ``transformers.OlmoeConfig``, bf16, saved once to ``--workdir`` with a small
    byte-level BPE tokenizer, then loaded by the package's loader), on the demo corpus (any text
    serves: the weights are random), same SAE as (a), ``--dtype bfloat16``, default mixing buffer
    (16 x 4,096 rows), ctx 256, 8 contexts per forward pass. Run twice: without a device map
    (``model.to(cuda)``) and with ``--device-map auto`` (with one GPU, Hugging Face places every
    module on it: the same placement, through accelerate's loading path). Timed like (a) over a
    whole number of buffer refills; the model forward passes are timed on their own (synchronised
    around each call), so the share of the loop spent in the forward is reported; the rest is the
    SAE step, the buffer shuffle and copies.
(c) ``torch.cuda.max_memory_allocated`` of each run: over the whole run (initialisation, and for
    (b) the model's 13.8 GB of weights, included) and over the timed window only.

Results: JSON at ``--out`` (default ``$OUT/gpu.json`` when ``OUT`` is set, else
``runs/bench-gpu.json``) and a Markdown table on stdout; progress lines carry the elapsed time.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # measure this checkout's package

# Dense (no 2:4 sparsity) BF16 Tensor Core peak, TFLOP/s, from NVIDIA's datasheets (H100, H200, A100,
# L4, L40, L40S, A10): the datasheets' headline figures are with sparsity, twice these.
# Matched in order against torch.cuda.get_device_name(); --peak-tflops overrides.
PEAK_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("GH200", 989.0), ("H100", 989.0),
    ("H200", 989.0), ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10", 125.0),
]
PEAK_SOURCE = "NVIDIA datasheets, dense BF16 Tensor Core (half the with-sparsity figure)"

# allenai/OLMoE-1B-7B-0924 config.json (the same values as analyses/sizing.py); the other
# OlmoeConfig defaults (rope_theta 10000, rms_norm_eps 1e-5, 4096 positions, norm_topk_prob False,
# clip_qkv None, silu) are that file's values too. 6.9B parameters, 1.3B active per token.
OLMOE_1B_7B: dict[str, Any] = {
    "hidden_size": 2048, "num_hidden_layers": 16, "intermediate_size": 1024, "num_experts": 64,
    "num_experts_per_tok": 8, "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 50304,
    "max_position_embeddings": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "norm_topk_prob": False,
    "tie_word_embeddings": False, "pad_token_id": 1, "eos_token_id": 50279,
}
ROUTED_LAYERS = 9  # the paper's range for 16 blocks, blocks 3..11 (routesae.layers.routesae_layers)
NEVER_DEAD = 10_000_000  # tokens; no latent can reach it within a run of this script

FULL = {"d": 2048, "latents": 16384, "k": 64, "batch_tokens": 4096, "init_samples": 32768,
        "model": OLMOE_1B_7B, "ctx": 256, "batch_size": 8, "dtype": "bfloat16", "mix_tokens": None}
SMOKE = {"d": 64, "latents": 512, "k": 8, "batch_tokens": 256, "init_samples": 512,
         "model": {**OLMOE_1B_7B, "hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 32,
                   "num_experts": 8, "num_experts_per_tok": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
                   "vocab_size": 320, "max_position_embeddings": 512, "pad_token_id": 0, "eos_token_id": 2},
         "ctx": 32, "batch_size": 4, "dtype": "float32", "mix_tokens": 1024}


class _Stop(Exception):
    """Raised by the timing callback after the last timed step (skips the final checkpoint write)."""


class Clock:
    """Progress lines with the seconds since the start."""

    def __init__(self, quiet: bool = False):
        self.t0, self.quiet = time.perf_counter(), quiet

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.t0:7.1f} s] {msg}", flush=True)


def gpu_peak(name: str) -> float | None:
    """Dense bf16 peak TFLOP/s of the GPU called ``name`` (None when not in PEAK_TFLOPS)."""
    return next((tf for key, tf in PEAK_TFLOPS if key.lower() in name.lower()), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Window:
    """``run_loop`` callback: marks the end of step ``warmup`` and of step ``warmup + steps`` (then stops)."""

    def __init__(self, device: torch.device, warmup: int, steps: int, probe=None):
        self.device, self.warmup, self.steps, self.probe = device, warmup, steps, probe or (lambda: {})
        self.t0 = self.t1 = 0.0
        self.at0: dict[str, Any] = {}
        self.at1: dict[str, Any] = {}
        self.peak_gib: float | None = None  # over the timed window
        self.peak_before: float | None = None  # over the run up to the window

    def __call__(self, step: int, sae, record: dict) -> None:
        if step == self.warmup:
            _sync(self.device)
            self.peak_before = _peak_gib(self.device)
            _reset_peak(self.device)
            self.at0, self.t0 = self.probe(), time.perf_counter()
        elif step == self.warmup + self.steps:
            _sync(self.device)
            self.t1, self.at1 = time.perf_counter(), self.probe()
            self.peak_gib = _peak_gib(self.device)
            raise _Stop

    def run_peak(self) -> float | None:
        """Peak memory of the whole run up to the end of the window."""
        peaks = [p for p in (self.peak_before, self.peak_gib) if p is not None]
        return max(peaks) if peaks else None

    @property
    def seconds(self) -> float:
        if not self.t1:
            raise RuntimeError(f"the run ended before step {self.warmup + self.steps}; nothing was timed")
        return self.t1 - self.t0


# ---------------------------------------------------------------- (a) SAE training on synthetic activations


class SyntheticView:
    """A store's description (what ``check_run`` / ``start_run`` read) for synthetic activations."""

    def __init__(self, d: int, layers: list[int], n_layers: int, tokens: int):
        self.root, self.layers, self.d_model, self.n_tokens = Path("synthetic"), layers, d, tokens
        self.manifest = {"model": {"name_or_path": "synthetic"}, "n_layers": n_layers, "layers": layers,
                         "d_model": d, "tokens": tokens}

    def identity(self) -> str:
        return f"synthetic:{self.d_model}x{len(self.layers)}"


def bench_sae(arch: str, size: dict, steps: int, warmup: int, device: torch.device, workdir: Path, log) -> dict:
    """Tokens/s of ``run_loop`` for a TopK SAE (``arch="topk"``) or a RouteSAE over 9 layers."""
    from routesae.train import TrainConfig, check_run, run_loop, start_run
    from routesae.train_setup import Dist

    d, m, k, b = size["d"], size["latents"], size["k"], size["batch_tokens"]
    layers = [11] if arch == "topk" else list(range(3, 3 + ROUTED_LAYERS))
    total = warmup + steps + 1
    view = SyntheticView(d, layers, 16, max(total * b, size["init_samples"]))
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (b, d) if arch == "topk" else (b, len(layers), d)

    def rows(n: int) -> torch.Tensor:
        return torch.randn((n, *shape[1:]), generator=gen, device=device)

    _free(device)
    _reset_peak(device)
    t_start = time.perf_counter()
    out = tempfile.mkdtemp(prefix=f"sae-{arch}-", dir=workdir)  # a new run folder, also in a reused --workdir
    cfg = TrainConfig(store="", out=out, arch=arch, k=k, latents=m, batch_tokens=b, tokens=total * b,
                      dead_tokens=NEVER_DEAD, init_samples=size["init_samples"], ckpt_every=10**9,
                      progress=False, verify="never", device=str(device))
    plan = check_run(cfg, view, 1, meta={"model": "synthetic", "store": None})
    t = start_run(plan, view, Dist(), device, extra=dict, summary={"path": None, "identity": view.identity()},
                  sample=rows)
    pool = [rows(b) for _ in range(4)]  # generated on the device: no host copies, no store

    def stream():
        while True:
            yield from pool

    win = Window(device, warmup, steps)
    log(f"(a) {arch}: d {d}, latents {m}, k {k}, batch {b}: init {time.perf_counter() - t_start:.1f} s; "
        f"{warmup} warm-up + {steps} timed steps")
    with contextlib.suppress(_Stop):
        run_loop([t], stream(), Dist(), device, win)
    tok_s = steps * b / win.seconds
    res = {"part": "a", "arch": arch, "d": d, "latents": m, "k": k, "batch_tokens": b, "layers": len(layers),
           "steps": steps, "seconds": win.seconds, "tokens_per_s": tok_s, "step_ms": 1000 * win.seconds / steps,
           "tflops_6dM": 6 * d * m * tok_s / 1e12, "matmul_tflops": 2 * d * m * tok_s / 1e12,
           "peak_mem_gib": win.run_peak(), "peak_mem_window_gib": win.peak_gib, "wall_s": time.perf_counter() - t_start}
    pool.clear()
    del t, plan
    _free(device)
    log(f"(a) {arch}: {tok_s:,.0f} tokens/s, {res['step_ms']:.2f} ms/step, {res['tflops_6dM']:.1f} TFLOP/s (6dM)")
    return res


# ---------------------------------------------------------------- (b) online training on an OLMoE-shaped model


def build_olmoe(folder: Path, model_cfg: dict, device: torch.device, dtype: str) -> dict:
    """A randomly initialised OLMoE of ``model_cfg`` saved (with a small tokenizer) to ``folder``."""
    from transformers import AutoModelForCausalLM, OlmoeConfig

    from routesae.models.load import resolve_dtype
    from routesae.models.tiny import tiny_tokenizer

    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: no 6.9B-parameter init on the CPU
        model = AutoModelForCausalLM.from_config(OlmoeConfig(**model_cfg), dtype=resolve_dtype(dtype))
    n_params = sum(p.numel() for p in model.parameters())
    router_std = float(model.model.layers[0].mlp.gate.weight.detach().float().std())
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    del model
    _free(device)
    return {"parameters": n_params, "router_weight_std": router_std}


@contextlib.contextmanager
def timed_forwards(device: torch.device, record: dict):
    """Time every model forward pass of ``train_online`` (synchronised) and note the model's placement."""
    import routesae.online as online

    real = online._open

    def opened(ccfg, *args, **kwargs):
        model, tok, runner_cls, n_layers, d_model, conf = real(ccfg, *args, **kwargs)
        placement = getattr(model, "hf_device_map", None)
        record["placement"] = (sorted({f"cuda:{v}" if isinstance(v, int) else str(v) for v in placement.values()})
                               if placement else sorted({str(p.device) for p in model.parameters()}))
        record["experts_implementation"] = getattr(conf, "_experts_implementation", None)

        class Timed(runner_cls):
            def __call__(self, input_ids, attention_mask):
                _sync(device)
                t0 = time.perf_counter()
                out = super().__call__(input_ids, attention_mask)
                _sync(device)
                record["forward_s"] += time.perf_counter() - t0
                record["forwards"] += 1
                return out

        return model, tok, Timed, n_layers, d_model, conf

    online._open = opened
    try:
        yield
    finally:
        online._open = real


def bench_online(model_dir: Path, corpus: str, device_map: str | None, size: dict, steps: int, warmup: int,
                 device: torch.device, workdir: Path, log) -> dict:
    """Tokens/s of ``train_online`` (RouteSAE, default layers) with or without a device map."""
    from routesae.online import OnlineConfig, mix_rows, train_online
    from routesae.train import TrainConfig

    b = size["batch_tokens"]
    ocfg = OnlineConfig(model=str(model_dir), corpus=corpus, ctx=size["ctx"], batch_size=size["batch_size"],
                        dtype=size["dtype"], device_map=device_map, mix_tokens=size["mix_tokens"])
    period = max(mix_rows(ocfg, b, 1) // 2 // b, 1)  # steps per buffer refill: time whole refills
    warmup, steps = -(-warmup // period) * period, -(-steps // period) * period
    total = warmup + steps + 1
    name = f"online-{'device-map-' + device_map if device_map else 'no-device-map'}"
    out = tempfile.mkdtemp(prefix=f"{name}-", dir=workdir)
    cfg = TrainConfig(store="", out=out, arch="routesae", k=size["k"], latents=size["latents"],
                      batch_tokens=b, tokens=total * b, dead_tokens=NEVER_DEAD, init_samples=size["init_samples"],
                      ckpt_every=10**9, progress=False, device=str(device))
    record: dict[str, Any] = {"forward_s": 0.0, "forwards": 0}
    win = Window(device, warmup, steps, probe=lambda: dict(record))
    _free(device)
    _reset_peak(device)
    log(f"(b) {name}: load, fill the buffer, {warmup} warm-up + {steps} timed steps "
        f"(a buffer refill every {period} steps)")
    t_start = time.perf_counter()
    with timed_forwards(device, record), contextlib.suppress(_Stop):
        train_online([cfg], ocfg, callback=win)
    wall = time.perf_counter() - t_start
    fwd_s = win.at1["forward_s"] - win.at0["forward_s"]
    fwd_n = win.at1["forwards"] - win.at0["forwards"]
    tok_s = steps * b / win.seconds
    res = {"part": "b", "run": name, "device_map": device_map, "placement": record.get("placement"),
           "experts_implementation": record.get("experts_implementation"), "latents": size["latents"],
           "k": size["k"], "batch_tokens": b, "ctx": size["ctx"], "batch_size": size["batch_size"],
           "dtype": size["dtype"], "steps": steps, "seconds": win.seconds, "tokens_per_s": tok_s,
           "step_ms": 1000 * win.seconds / steps, "forwards": fwd_n, "forward_s": fwd_s,
           "forward_share": fwd_s / win.seconds,
           "forward_tokens_per_s": fwd_n * size["ctx"] * size["batch_size"] / fwd_s if fwd_s > 0 else None,
           "peak_mem_gib": win.run_peak(), "peak_mem_window_gib": win.peak_gib, "wall_s": wall}
    _free(device)
    log(f"(b) {name}: {tok_s:,.0f} tokens/s, forward {100 * res['forward_share']:.0f}% of the loop, "
        f"{wall:.0f} s in all")
    return res


# ---------------------------------------------------------------- report


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def markdown(res: dict) -> str:
    """The results as two Markdown tables."""
    peak = res["peak_tflops"]
    lines = [f"GPU: {res['gpu']}; peak {_f(peak, '.0f')} TFLOP/s dense bf16 ({res['peak_source']}); "
             f"torch {res['torch']}, transformers {res['transformers']}", ""]
    if res["sae"]:
        lines += ["| (a) SAE | tokens/s | ms/step | TFLOP/s (6dM) | % of peak | TFLOP/s executed (2dM) "
                  "| peak memory GiB (run / window) |", "|---|---|---|---|---|---|---|"]
        for r in res["sae"]:
            if "error" in r:
                lines.append(f"| {r['what']} | failed: {r['error']} | | | | | |")
                continue
            kind = "TopK" if r["arch"] == "topk" else f"RouteSAE {r['layers']} layers"
            what = f"{kind}, d {r['d']:,}, M {r['latents']:,}, k {r['k']}, batch {r['batch_tokens']:,}"
            frac = None if peak is None else 100 * r["tflops_6dM"] / peak
            lines.append(f"| {what} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.2f} | {r['tflops_6dM']:.1f} | "
                         f"{_f(frac, '.1f')} | {r['matmul_tflops']:.1f} | {_f(r['peak_mem_gib'], '.2f')} / "
                         f"{_f(r['peak_mem_window_gib'], '.2f')} |")
        lines.append("")
    if res["online"]:
        lines += ["| (b) online RouteSAE | tokens/s | ms/step | forward share | forward tokens/s | placement "
                  "| peak memory GiB (run / window) |", "|---|---|---|---|---|---|---|"]
        for r in res["online"]:
            if "error" in r:
                lines.append(f"| {r['what']} | failed: {r['error']} | | | | | |")
                continue
            how = f"--device-map {r['device_map']}" if r["device_map"] else "no device map"
            lines.append(f"| {res['model_name']}, {how} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | "
                         f"{100 * r['forward_share']:.0f}% | {_f(r['forward_tokens_per_s'], ',.0f')} | "
                         f"{', '.join(r['placement'] or [])} | {_f(r['peak_mem_gib'], '.2f')} / "
                         f"{_f(r['peak_mem_window_gib'], '.2f')} |")
    return "\n".join(lines)


def default_out() -> Path:
    return Path(os.environ["OUT"]) / "gpu.json" if os.environ.get("OUT") else ROOT / "runs" / "bench-gpu.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (checks that the script runs)")
    ap.add_argument("--out", type=Path, help="JSON results (default $OUT/gpu.json, else runs/bench-gpu.json)")
    ap.add_argument("--parts", default="sae,online", help="comma-separated: sae (a), online (b) (default both)")
    ap.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: from the GPU's name)")
    ap.add_argument("--steps", type=int, help="(a) timed steps per SAE (default 200; smoke 4)")
    ap.add_argument("--warmup", type=int, help="(a) untimed steps first (default 10; smoke 2)")
    ap.add_argument("--online-steps", type=int, help="(b) timed steps, rounded up to whole buffer refills "
                                                     "(default 32; smoke 4)")
    ap.add_argument("--online-warmup", type=int, help="(b) untimed steps first, rounded the same way (default 8; "
                                                      "smoke 2)")
    ap.add_argument("--corpus", default=str(ROOT / "data" / "corpus"), help="(b) text corpus (default data/corpus)")
    ap.add_argument("--workdir", type=Path, help="where the model and runs go (default: a temporary folder, removed)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not parts or any(p not in ("sae", "online") for p in parts):
        ap.error(f"--parts {args.parts!r}: use sae, online or sae,online")
    args.parts = parts
    for name in ("steps", "warmup", "online_steps", "online_warmup"):
        v = getattr(args, name)
        if v is not None and v < 1:
            ap.error(f"--{name.replace('_', '-')} {v} must be at least 1")
    if "online" in parts and not (args.corpus.startswith("hf:") or Path(args.corpus).exists()):
        ap.error(f"--corpus {args.corpus} does not exist; pass a corpus folder or file (or --parts sae)")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        ap.error(f"--peak-tflops {args.peak_tflops} must be positive")
    return args


def _attempt(fn, what: str, log) -> dict:
    """``fn()``, or ``{"what": ..., "error": one line}`` when it fails (the other runs still go ahead)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a failed run is reported, and the GPU time of the others kept
        text = str(e).strip().splitlines()
        err = f"{type(e).__name__}: {text[0] if text else ''}"
        log(f"{what} FAILED: {err}")
        return {"what": what, "error": err}


def run(args: argparse.Namespace) -> dict:
    """Run the chosen parts; returns the results dict (written as JSON to ``args.out`` after every run)."""
    import transformers

    from routesae.atomic import atomic_write_json

    transformers.utils.logging.disable_progress_bar()  # the loading bars would drown the progress lines
    size = SMOKE if args.smoke else FULL
    defaults = {"steps": (4, 200), "warmup": (2, 10), "online_steps": (4, 32), "online_warmup": (2, 8)}
    n = {k: getattr(args, k) or v[0 if args.smoke else 1] for k, v in defaults.items()}
    device = torch.device("cpu") if args.smoke else torch.device("cuda", torch.cuda.current_device())
    name = "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(device)
    peak = args.peak_tflops if args.peak_tflops is not None else (None if args.smoke else gpu_peak(name))
    log = Clock(args.quiet)
    log(f"{name}: peak {_f(peak, '.0f')} TFLOP/s dense bf16" + ("" if peak or args.smoke else
                                                                  " unknown: pass --peak-tflops for the % of peak"))
    res: dict[str, Any] = {
        "gpu": name, "smoke": args.smoke, "peak_tflops": peak,
        "peak_source": "--peak-tflops" if args.peak_tflops is not None else PEAK_SOURCE,
        "flop_formula": "6 * d * M FLOP per token (dense encoder forward 2dM + backward 4dM); executed: 2dM dense "
                        "+ O(k d) sparse", "torch": torch.__version__, "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "model_name": "tiny OLMoE (smoke)" if args.smoke else "OLMoE-1B-7B shape (random weights)",
        "model_config": size["model"], "sae": [], "online": []}
    out = args.out or default_out()
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def save() -> None:
        for r in res["sae"]:
            if "error" not in r:
                r["fraction_of_peak"] = None if peak is None else r["tflops_6dM"] / peak
        res["wall_s"] = time.perf_counter() - t0
        atomic_write_json(out, res)

    with (contextlib.nullcontext(str(args.workdir)) if args.workdir else tempfile.TemporaryDirectory()) as wd:
        work = Path(wd)
        work.mkdir(parents=True, exist_ok=True)
        if "sae" in args.parts:
            for arch in ("topk", "routesae"):
                res["sae"].append(_attempt(lambda a=arch: bench_sae(a, size, n["steps"], n["warmup"], device, work,
                                                                    log), f"(a) {arch}", log))
                save()
        if "online" in args.parts:
            model_dir = work / "olmoe-random"
            if not (model_dir / "config.json").exists():
                log("(b) building the random OLMoE and saving it")
                res["model_built"] = _attempt(lambda: build_olmoe(model_dir, size["model"], device, size["dtype"]),
                                              "(b) model", log)
                if "error" in res["model_built"]:
                    res["online"].append(res["model_built"])
                else:
                    log(f"(b) {res['model_built']['parameters']:,} parameters saved to {model_dir}")
            for device_map in (None, "auto") if (model_dir / "config.json").exists() else ():
                res["online"].append(_attempt(lambda m=device_map: bench_online(
                    model_dir, args.corpus, m, size, n["online_steps"], n["online_warmup"], device, work, log),
                    f"(b) {'--device-map ' + device_map if device_map else 'no device map'}", log))
                save()
    save()
    log(f"done in {res['wall_s']:.0f} s; results in {out}")
    return res


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py: no CUDA GPU here (torch.cuda.is_available() is False); "
                         "run it on a GPU machine, or pass --smoke for the CPU check")
    res = run(args)
    print(markdown(res))
    failed = [r["what"] for r in res["sae"] + res["online"] if "error" in r]
    if failed:
        raise SystemExit(f"bench/gpu.py: {', '.join(failed)} failed (errors in the JSON and above)")
    return res


if __name__ == "__main__":
    main()
