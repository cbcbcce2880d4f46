"""Capture throughput against a plain forward pass doing the same work, measured side by side in one run.

    python bench/capture.py [--model DIR] [--corpus PATH] [--tokens N] [--ctx 256] [--batch-size 8]

Prints tokens/s, on the exact batches capture sees, of

- the equal-work baseline: the decoder stack without the LM head (``base_model(model)(input_ids,
  attention_mask)``, no hooks, no writes): exactly the forward capture itself runs
  (:class:`routesae.capture.HFRunner` calls the same base model: every block and the final norm,
  no vocabulary logits);
- the full causal-LM forward ``model(input_ids, attention_mask)`` with the LM head, for reference;
- a full ``routesae capture`` into a fresh store (tokenisation, hooks, router records and shard
  writes included; the model is loaded once for all three),

interleaved over ``--repeats`` rounds. The headline ratio is capture / forward without the head
(goal >= 0.90 on CPU); capture / forward with the head is printed beside it.

Changed in issue 14: the baseline used to be the forward with the LM head, which capture skips
(over a third of data/demo-moe's multiply-adds: 192 x 8192 = 1.6M per token against about 2.5M
in its eight blocks), so the old ratio flattered capture; the two are now printed side by side.

Both wall-clock and process CPU time (all threads) are printed: on a machine shared with other
jobs the CPU-time ratio is the steadier of the two. Without ``--model`` it uses data/demo-moe when
that holds a trained model, else a random OLMoE of the demo preset's shape built from its config
class.
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
from routesae.models.load import ModelConfig, base_model, load_model

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

        def forward(head: bool) -> None:
            net = model if head else base_model(model)  # without the head: what capture's runner calls
            with torch.inference_mode():
                for ids, mask in batches:
                    net(input_ids=ids.to(args.device), attention_mask=mask.to(args.device), use_cache=False)

        def run_capture(i: int) -> None:
            cfg = CaptureConfig(model=model_path, corpus=corpus, out=str(tmp / f"store{i}"), ctx=args.ctx,
                                batch_size=args.batch_size, layers=args.layers, max_tokens=n,
                                device=args.device, progress=False)
            capture(cfg, model=model, tokenizer=tok)

        forward(True)  # warm-up
        forward(False)
        runs: dict[str, list[tuple[float, float]]] = {"base": [], "head": [], "capture": []}
        for i in range(args.repeats):
            runs["base"].append(timed(lambda: forward(False)))
            runs["head"].append(timed(lambda: forward(True)))
            runs["capture"].append(timed(lambda i=i: run_capture(i)))
        print(f"model {model_path if args.model else Path(model_path).name}; {n:,} tokens, ctx {args.ctx}, "
              f"batch {args.batch_size}, layers {args.layers}, device {args.device}, threads {torch.get_num_threads()}")
        names = {"base": "forward without LM head (equal work)", "head": "forward with LM head",
                 "capture": "capture"}
        for j, clock in enumerate(("wall", "CPU")):
            med = {k: statistics.median(r[j] for r in v) for k, v in runs.items()}
            for k, v in runs.items():
                print(f"[{clock:4s} time] {names[k]:38s} {med[k]:10,.0f} tok/s  "
                      f"(runs: {', '.join(f'{r[j]:,.0f}' for r in v)})")
            print(f"[{clock:4s} time] ratio capture / forward without head = {med['capture'] / med['base']:.3f} "
                  f"(goal >= 0.90)   | capture / forward with head = {med['capture'] / med['head']:.3f}")
        print("capture includes tokenising, hooks, router records and shard writes (sha256, fsync), model load not; "
              "it runs the decoder stack without the LM head, as the equal-work baseline does")

if __name__ == "__main__":
    main()
