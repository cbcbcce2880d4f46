"""Capture throughput against a plain forward pass, measured side by side in one run.

    python bench/capture.py [--model DIR] [--corpus PATH] [--tokens N] [--ctx 256] [--batch-size 8]

Prints tokens/s of ``model(input_ids, attention_mask)`` alone (no hooks, no writes) on the exact
batches capture sees, and of a full ``routesae capture`` into a fresh store (tokenisation, hooks,
router records and shard writes included; the model is loaded once for both), interleaved over
``--repeats`` rounds; the ratio is capture / forward (goal >= 0.90 on CPU). Both wall-clock and
process CPU time (all threads) are printed: on a machine shared with other jobs the CPU-time
ratio is the steadier of the two. Without ``--model``
it uses data/demo-moe when that holds a trained model, else a random OLMoE of the demo preset's
shape built from its config class.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from routesae.capture import CaptureConfig, capture
from routesae.corpus import ContextBuilder, CorpusConfig, iter_documents
from routesae.models.load import ModelConfig, load_model

ROOT = Path(__file__).resolve().parents[1]


def _default_model(tmp: Path) -> str:
    demo = ROOT / "data" / "demo-moe"
    if (demo / "model.safetensors").exists():
        return str(demo)
    from transformers import OlmoeConfig, OlmoeForCausalLM

    from routesae.models.tiny import tiny_tokenizer

    cfg = OlmoeConfig(vocab_size=8192, hidden_size=192, intermediate_size=128, num_hidden_layers=8,
                      num_attention_heads=6, num_key_value_heads=6, num_experts=32, num_experts_per_tok=4,
                      max_position_embeddings=512, architectures=["OlmoeForCausalLM"],
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    OlmoeForCausalLM(cfg).save_pretrained(tmp / "model")
    tiny_tokenizer().save_pretrained(tmp / "model")
    return str(tmp / "model")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--corpus")
    ap.add_argument("--tokens", type=int, default=32_768)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--layers", default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        model_path = args.model or _default_model(tmp)
        corpus = args.corpus or str(ROOT / "data" / "corpus")
        model, tok = load_model(ModelConfig(model_path, device=args.device))
        docs = iter_documents(CorpusConfig(corpus))
        batches, n = [], 0
        for b in ContextBuilder(tok, args.ctx).batches(docs, args.batch_size):
            batches.append((torch.from_numpy(b.input_ids), torch.from_numpy(b.attention_mask)))
            n += b.n_real
            if n >= args.tokens:
                break

        def timed(fn) -> tuple[float, float]:
            """(tokens per wall second, tokens per CPU second) of one call."""
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            return n / (time.perf_counter() - w0), n / (time.process_time() - c0)

        def forward() -> None:
            with torch.inference_mode():
                for ids, mask in batches:
                    model(input_ids=ids.to(args.device), attention_mask=mask.to(args.device), use_cache=False)

        def run_capture(i: int) -> None:
            cfg = CaptureConfig(model=model_path, corpus=corpus, out=str(tmp / f"store{i}"), ctx=args.ctx,
                                batch_size=args.batch_size, layers=args.layers, max_tokens=n,
                                device=args.device, progress=False)
            capture(cfg, model=model, tokenizer=tok)

        forward()  # warm-up
        fwd, cap = [], []
        for i in range(args.repeats):
            fwd.append(timed(forward))
            cap.append(timed(lambda i=i: run_capture(i)))
        print(f"model {model_path if args.model else Path(model_path).name}; {n:,} tokens, ctx {args.ctx}, "
              f"batch {args.batch_size}, layers {args.layers}, device {args.device}, threads {torch.get_num_threads()}")
        for j, clock in enumerate(("wall", "CPU")):
            f, c = statistics.median(r[j] for r in fwd), statistics.median(r[j] for r in cap)
            print(f"[{clock} time] plain forward {f:10,.0f} tok/s  (runs: {', '.join(f'{r[j]:,.0f}' for r in fwd)})")
            print(f"[{clock} time] capture       {c:10,.0f} tok/s  (runs: {', '.join(f'{r[j]:,.0f}' for r in cap)})")
            print(f"[{clock} time] ratio capture/forward = {c / f:.3f}")
        print("capture includes tokenising, hooks, router records and shard writes (sha256, fsync); "
              "model load not; the forward runs the LM head, capture does not need it")


if __name__ == "__main__":
    main()
