"""SAE training throughput, side by side in one run: our TopK step against SAELens 6's, our RouteSAE
step against the RouteSAE reference code's, and a phase-by-phase profile of our RouteSAE step.

    python bench/train.py [--store DIR | --model DIR] [--d-latents M | --expansion 16] [--k 32]
                          [--batch-tokens 4096] [--steps 20] [--warmup 3] [--repeats 3]
                          [--threads N] [--device cpu] [--dead-frac 0.0] [--aux-k D/2]
                          [--no-saelens-sparse] [--no-routesae] [--against saelens reference]
                          [--reference-latents 1536] [--no-profile]

One activation set: ``--store`` if given, else a capture of ``--tokens`` tokens of ``data/corpus``
into a temporary store, by ``data/demo-moe`` when it holds trained weights, else by a random OLMoE
of the demo shape (d_model 192, 8 blocks, 32 experts top-4) built with ``routesae.models.tiny``.
Every round (``--repeats``, interleaved) then runs, each on a fresh SAE:

* ``routesae-topk``: ``routesae.train.train(TrainConfig(arch="topk", ...))`` itself on the store
  (default layer). Timed with its ``callback`` from the end of step ``warmup`` to the end of step
  ``warmup + steps``, so the fixed costs (store open, geometric-median init, the final checkpoint)
  are outside the timed window; the store stream, the per-token standardisation, the loss
  bookkeeping and the decoder constraint are inside it.
* ``saelens-topk``: SAELens' own ``SAETrainer.fit()`` with a ``TopKTrainingSAE`` (d_in, d_sae, k,
  Adam lr/betas as ours; its defaults otherwise: ``rescale_acts_by_decoder_norm=True``, grad-norm
  clipping at 1.0, dense activations). Its data provider yields the same stream of rows
  (same store, layer, seed, batch size), standardised per token as ours does, materialised in
  memory before the run (so SAELens pays no store reading and no standardisation: a bias in its
  favour). Timed inside the provider between the same two step boundaries.
  ``--saelens-sparse`` (on by default) adds a second SAELens run per round, ``use_sparse_activations=True``
  (its sparse COO decoder path; needs ``rescale_acts_by_decoder_norm=False``, as its backward
  fails with the rescale on); the ratio is then taken against the faster SAELens variant.
* ``routesae``: ``train(TrainConfig(arch="routesae", ...))`` on every captured layer (ours only).

Dead latents / AuxK: both sides get thresholds that never trigger on their own (ours
``dead_tokens`` 2**62, SAELens ``dead_feature_window`` 2**40 steps), and before every step the same
``--dead-frac`` share of latents (a fixed seeded set) is marked dead in both (ours
``tokens_since_fired``, SAELens ``n_forward_passes_since_fired``), so both compute AuxK on the
same number of dead latents, with ``k_aux = --aux-k`` (default d/2, SAELens' hard-coded value).
``--dead-frac 0`` (default): no latent is dead and AuxK is skipped on both sides.

Other differences, none of which changes the work per step: SAELens keeps its constant lr schedule
and Adam eps 1e-8 (ours: warm-up/decay schedule, eps 6.25e-10, same base lr); ours ends every step
with one host sync for the loss statistics (``.tolist()``), SAELens with none unless AuxK runs.

Prints a config line, tokens/s of each (median over rounds, every round listed) and
``ratio routesae-topk / saelens-topk``. Goal (issue 4 §7): >= 1.5 on CPU.

Against the reference code (``--against reference``, issue 18 §4): RouteSAE over every layer of the
store with ``--reference-latents`` latents (default 1536, the issue's setting: 8x d = 192) and the
same k and batch, ``routesae.train.train`` with the paper's ``faithful`` router (the reference's
routing: the same work) and with our default ``ste`` router, against bench/reference_step.py (the
reference's dense step: dense top-k code scattered into [B, M], dense decoder, dense backward, Adam,
decoder renormalised every 10 steps) on the same batches held in memory, rounds interleaved.
Prints ``ratio routesae-faithful / reference`` (of the medians) and the ratio of each round's two
runs (neighbours in time, so less exposed to other jobs' load drifting over the run); goal >= 3.
Then (``--no-profile`` skips it) the profile of our step by phase (bench/train_profile.py) for
both routers.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # SAETrainer.fit draws a progress bar; tqdm reads this on import

import torch  # noqa: E402  (imports tqdm)

from routesae.store import Store  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # reference_step, train_profile (also when imported)
NEVER_DEAD_TOKENS = 2**62
NEVER_DEAD_STEPS = 2**40  # SAELens counts steps in float32: keep the window and the marks exact


# ---------------------------------------------------------------- the activation set


def build_store(tmp: Path, model: str | None = None, corpus: str | None = None, tokens: int = 32_768,
                ctx: int = 256, layers: str = "auto", device: str = "cpu") -> Path:
    """Capture ``tokens`` tokens into ``tmp/store`` (see the module docstring for the model)."""
    from routesae.capture import CaptureConfig, capture

    if model is None:
        demo = ROOT / "data" / "demo-moe"
        if (demo / "model.safetensors").exists():
            model = str(demo)
        else:
            from routesae.models.tiny import VOCAB, build_tiny, tiny_tokenizer

            m = build_tiny("olmoe", vocab_size=VOCAB, hidden_size=192, intermediate_size=128,
                           num_hidden_layers=8, num_attention_heads=6, num_key_value_heads=6, num_experts=32,
                           num_experts_per_tok=4, max_position_embeddings=max(512, ctx))
            model = str(tmp / "model")
            m.save_pretrained(model)
            tiny_tokenizer().save_pretrained(model)
    if corpus is None:
        corpus = str(ROOT / "data" / "corpus")
    return capture(CaptureConfig(model=model, corpus=corpus, out=str(tmp / "store"), ctx=ctx, layers=layers,
                                 max_tokens=tokens, device=device, progress=False))


# ---------------------------------------------------------------- one timed run of each side


@dataclass
class BenchConfig:
    store: str
    workdir: str
    latents: int | None = None
    expansion: int = 16
    k: int = 32
    batch_tokens: int = 4096
    steps: int = 20
    warmup: int = 3
    repeats: int = 3
    device: str = "cpu"
    dead_frac: float = 0.0
    aux_k: int | None = None
    aux_coef: float = 1 / 32
    saelens_sparse: bool = True
    routesae: bool = True
    seed: int = 0


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _dead_set(n_latents: int, frac: float, seed: int) -> torch.Tensor | None:
    n = int(round(frac * n_latents))
    if n == 0:
        return None
    return torch.randperm(n_latents, generator=torch.Generator().manual_seed(seed + 12345))[:n]


def _resolved(bc: BenchConfig):
    store = Store(bc.store)
    d = store.d_model
    latents = bc.latents or bc.expansion * d
    aux_k = bc.aux_k if bc.aux_k is not None else d // 2
    lr = 2e-4 / math.sqrt(latents / 2**14)  # our default (routesae.train_setup.resolve); given to both sides
    return store, d, latents, aux_k, lr


def time_ours(bc: BenchConfig, arch: str, run: int, latents: int | None = None, router: str = "ste") -> float:
    """Tokens/s of ``routesae.train.train`` for ``arch``, timed between step callbacks."""
    from routesae.train import TrainConfig, train

    _, _, default_latents, aux_k, lr = _resolved(bc)
    latents = latents or default_latents
    dead = _dead_set(latents, bc.dead_frac, bc.seed)
    total = bc.warmup + bc.steps + 1  # the last step (final checkpoint + save) is not timed
    marks: dict[str, float] = {}

    def callback(step: int, sae, record: dict) -> None:
        if dead is not None:
            sae.tokens_since_fired[dead.to(sae.tokens_since_fired.device)] = NEVER_DEAD_TOKENS
        if step == bc.warmup:
            _sync(bc.device)
            marks["t0"] = time.perf_counter()
        elif step == bc.warmup + bc.steps:
            _sync(bc.device)
            marks["t1"] = time.perf_counter()

    cfg = TrainConfig(store=bc.store, out=str(Path(bc.workdir) / f"{arch}-{router}-{latents}-{run}"), arch=arch,
                      k=bc.k, router=router,
                      latents=latents, batch_tokens=bc.batch_tokens, tokens=total * bc.batch_tokens, lr=lr,
                      aux_k=aux_k, aux_coef=bc.aux_coef, dead_tokens=NEVER_DEAD_TOKENS, seed=bc.seed,
                      ckpt_every=10**9, progress=False, device=bc.device, verify="never", init_samples=4096)
    train(cfg, callback)
    return bc.steps * bc.batch_tokens / (marks["t1"] - marks["t0"])


def _our_batches(bc: BenchConfig, arch: str) -> list[torch.Tensor]:
    """The first ``warmup + steps + 1`` raw batches our ``arch`` run reads (same store, layers, seed, batch size)."""
    from routesae.train import TrainConfig
    from routesae.train_setup import batches, resolve

    store = Store(bc.store)
    cfg = TrainConfig(store=bc.store, out="-", arch=arch, k=bc.k, batch_tokens=bc.batch_tokens, seed=bc.seed)
    stream = batches(store, cfg, resolve(cfg, store, 1), 0)
    return [next(stream).to(bc.device) for _ in range(bc.warmup + bc.steps + 1)]


def saelens_batches(bc: BenchConfig) -> list[torch.Tensor]:
    """The rows our TopK run reads (same store, layer, seed, batch size), standardised per token."""
    from routesae.sae.ops import standardize

    return [standardize(b)[0] for b in _our_batches(bc, "topk")]


def time_saelens(bc: BenchConfig, batches: list[torch.Tensor], sparse: bool) -> float:
    """Tokens/s of SAELens' ``SAETrainer.fit`` with a ``TopKTrainingSAE``, timed in its data provider."""
    from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    _, d, latents, _, lr = _resolved(bc)
    dead = _dead_set(latents, bc.dead_frac, bc.seed)
    torch.manual_seed(bc.seed)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=latents, k=bc.k, dtype="float32", device=bc.device,
                                                aux_loss_coefficient=bc.aux_coef, use_sparse_activations=sparse,
                                                # its sparse path fails in backward with the rescale on
                                                rescale_acts_by_decoder_norm=not sparse))
    tcfg = SAETrainerConfig(total_training_samples=len(batches) * bc.batch_tokens,
                            train_batch_size_samples=bc.batch_tokens, lr=lr, lr_end=lr, adam_beta1=0.9,
                            adam_beta2=0.999, device=bc.device, dead_feature_window=NEVER_DEAD_STEPS,
                            feature_sampling_window=10**9, logger=LoggingConfig(log_to_wandb=False))
    marks: dict[str, float] = {}
    trainer: list = []

    def provider():
        for i, b in enumerate(batches):  # next() is called at the start of step i
            if i == bc.warmup:
                _sync(bc.device)
                marks["t0"] = time.perf_counter()
            elif i == bc.warmup + bc.steps:
                _sync(bc.device)
                marks["t1"] = time.perf_counter()
            if dead is not None:
                fired = trainer[0].n_forward_passes_since_fired
                fired[dead.to(fired.device)] = 2 * NEVER_DEAD_STEPS
            yield b

    trainer.append(SAETrainer(cfg=tcfg, sae=sae, data_provider=provider()))
    trainer[0].fit()
    return bc.steps * bc.batch_tokens / (marks["t1"] - marks["t0"])


def bench(bc: BenchConfig, log=print) -> dict:
    """Run ``bc.repeats`` interleaved rounds; returns {"runs": {name: [tok/s, ...]}, "median": {...}, ...}."""
    batches = saelens_batches(bc)
    names = ["routesae-topk", "saelens-topk"] + (["saelens-topk-sparse"] if bc.saelens_sparse else []) \
        + (["routesae"] if bc.routesae else [])
    runs: dict[str, list[float]] = {n: [] for n in names}
    for r in range(bc.repeats):
        for name in names:
            if name == "routesae-topk":
                v = time_ours(bc, "topk", r)
            elif name == "routesae":
                v = time_ours(bc, "routesae", r)
            else:
                v = time_saelens(bc, batches, sparse=name.endswith("sparse"))
            runs[name].append(v)
            log(f"  round {r + 1}/{bc.repeats} {name:20s} {v:12,.0f} tok/s")
    med = {n: statistics.median(v) for n, v in runs.items()}
    saelens = max(v for n, v in med.items() if n.startswith("saelens"))
    return {"runs": runs, "median": med, "ratio": med["routesae-topk"] / saelens}


def reference_batches(bc: BenchConfig) -> list[torch.Tensor]:
    """The raw ``[B, L', d]`` rows our RouteSAE run reads (same store, seed, batch size), in memory."""
    return _our_batches(bc, "routesae")


def time_reference(bc: BenchConfig, batches: list[torch.Tensor], latents: int) -> float:
    """Tokens/s of the reference code's RouteSAE step (bench/reference_step.py) on ``batches``."""
    from reference_step import ReferenceRouteSAE, reference_step

    torch.manual_seed(bc.seed)
    d, n_layers = batches[0].shape[-1], batches[0].shape[1]
    model = ReferenceRouteSAE(d, n_layers, latents, bc.k).to(bc.device)
    opt = torch.optim.Adam(model.parameters(), lr=5e-4, betas=(0.9, 0.999))
    t0 = 0.0
    for i, h in enumerate(batches[: bc.warmup + bc.steps]):
        if i == bc.warmup:
            _sync(bc.device)
            t0 = time.perf_counter()
        reference_step(model, opt, h, i)
    _sync(bc.device)
    return bc.steps * bc.batch_tokens / (time.perf_counter() - t0)


def bench_reference(bc: BenchConfig, latents: int, log=print) -> dict:
    """Interleaved rounds of ours (faithful and ste routers) and the reference's step; medians and the ratio."""
    batches = reference_batches(bc)
    names = ["routesae-faithful", "routesae-ste", "reference"]
    runs: dict[str, list[float]] = {n: [] for n in names}
    for r in range(bc.repeats):
        for name in names:
            if name == "reference":
                v = time_reference(bc, batches, latents)
            else:
                v = time_ours(bc, "routesae", r, latents=latents, router=name.split("-")[1])
            runs[name].append(v)
            log(f"  round {r + 1}/{bc.repeats} {name:20s} {v:12,.0f} tok/s")
    med = {n: statistics.median(v) for n, v in runs.items()}
    paired = [a / b for a, b in zip(runs["routesae-faithful"], runs["reference"])]  # neighbours in time
    return {"runs": runs, "median": med, "ratio": med["routesae-faithful"] / med["reference"],
            "paired_ratios": paired, "paired_median": statistics.median(paired)}


def print_results(res: dict, ratio_name: str) -> None:
    for name, v in res["median"].items():
        runs = ", ".join(f"{x:,.0f}" for x in res["runs"][name])
        print(f"{name:20s} {v:12,.0f} tok/s  (runs: {runs})")
    print(f"ratio {ratio_name} = {res['ratio']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", help="an existing store (default: capture one into a temp folder)")
    ap.add_argument("--model", help="model to capture with (default: data/demo-moe or a random demo-shape OLMoE)")
    ap.add_argument("--corpus")
    ap.add_argument("--tokens", type=int, default=32_768, help="tokens to capture (the stream cycles over them)")
    ap.add_argument("--d-latents", type=int, dest="latents")
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per run before the timed ones")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dead-frac", type=float, default=0.0, help="share of latents held dead on both sides")
    ap.add_argument("--aux-k", type=int, help="AuxK latents for ours (default d/2 = SAELens' fixed value)")
    ap.add_argument("--saelens-sparse", action=argparse.BooleanOptionalAction, default=True,
                    help="also time SAELens with use_sparse_activations=True (default on)")
    ap.add_argument("--no-routesae", action="store_true")
    ap.add_argument("--against", nargs="+", choices=["saelens", "reference"], default=["saelens", "reference"],
                    help="which comparisons to run (default both)")
    ap.add_argument("--reference-latents", type=int, default=1536,
                    help="latents of the RouteSAE-vs-reference comparison and the profile (default 1536)")
    ap.add_argument("--no-profile", action="store_true", help="skip the phase profile of our RouteSAE step")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import sae_lens

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        if args.store:
            store = args.store
        else:
            t0 = time.perf_counter()
            store = str(build_store(tmp, args.model, args.corpus, args.tokens, device=args.device))
            print(f"captured {store} in {time.perf_counter() - t0:.0f} s")
        bc = BenchConfig(store=store, workdir=str(tmp / "runs"), latents=args.latents, expansion=args.expansion,
                         k=args.k, batch_tokens=args.batch_tokens, steps=args.steps, warmup=args.warmup,
                         repeats=args.repeats, device=args.device, dead_frac=args.dead_frac, aux_k=args.aux_k,
                         saelens_sparse=args.saelens_sparse, routesae=not args.no_routesae)
        s, d, latents, aux_k, lr = _resolved(bc)
        print(f"store {Path(store).name if not args.store else store}: {s.n_tokens:,} tokens, layers {s.layers}, "
              f"model {s.manifest.get('model', {}).get('name_or_path')}")
        print(f"config: d {d}, latents {latents}, k {args.k}, batch tokens {args.batch_tokens}, lr {lr:.3g}, "
              f"dead frac {args.dead_frac} (k_aux {aux_k}), threads {torch.get_num_threads()}, device {args.device}, "
              f"steps timed {args.steps} (after {args.warmup} warm-up) x {args.repeats} rounds; "
              f"sae-lens {sae_lens.__version__}, torch {torch.__version__}")
        if "saelens" in args.against:
            res = bench(bc)
            ref = max((n for n in res["median"] if n.startswith("saelens")), key=res["median"].get)
            print_results(res, f"routesae-topk / {ref}")
        if "reference" in args.against:
            print(f"RouteSAE against the reference code's step: layers {s.layers}, latents {args.reference_latents}, "
                  f"k {args.k}, batch tokens {args.batch_tokens}")
            res = bench_reference(bc, args.reference_latents)
            print_results(res, "routesae-faithful / reference")
            print(f"ratio per round (faithful / the reference run next to it): "
                  f"{', '.join(f'{r:.2f}' for r in res['paired_ratios'])}; median {res['paired_median']:.2f}")
        if not args.no_profile:
            print_profiles(bc, args.reference_latents)


def print_profiles(bc: BenchConfig, latents: int) -> None:
    from train_profile import format_profile, profile_step

    from routesae.train import TrainConfig

    for router in ("faithful", "ste"):
        cfg = TrainConfig(store=bc.store, out="-", arch="routesae", k=bc.k, latents=latents,
                          batch_tokens=bc.batch_tokens, router=router, device=bc.device, seed=bc.seed,
                          init_samples=4096)
        print(format_profile(profile_step(cfg, steps=bc.steps, warmup=bc.warmup), f"routesae ({router})"))


if __name__ == "__main__":
    main()
