"""Byte-level BPE tokenizer of the demo MoE, trained on the train split of the demo corpus.

Special tokens (ids 0, 1, 2, in this order):

- ``<|bos|>``: beginning of a document (``tokenizer.bos_token``);
- ``<|eos|>``: ``tokenizer.eos_token`` (and the demo MoE's ``eos_token_id``), but never written
  into training or capture text, so the demo MoE has not learned to predict it;
- ``<|pad|>``: padding (``tokenizer.pad_token``); never trained on, mask it out of losses.

Encoding adds no special tokens by itself (like GPT-2): the LM trainer and capture
(:class:`routesae.corpus.ContextBuilder`) write ``<|bos|> text`` per document, so the next
document's ``<|bos|>`` is the only boundary inside a packed context; no ``<|eos|>`` is appended.
The tokenizer is byte-level, so every string round-trips exactly (``decode(encode(s)) == s``) and
there is no unknown token.

Saved in Hugging Face format (``tokenizer.json``, ``tokenizer_config.json``,
``special_tokens_map.json``) so ``transformers.AutoTokenizer.from_pretrained(out_dir)`` loads it
as a ``PreTrainedTokenizerFast`` with bos/eos/pad set.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, PAD]
DEFAULT_TOKENIZER_DIR = Path("data/demo-moe")


def _train_texts(corpus_dir: Path) -> Iterator[str]:
    shards = sorted(corpus_dir.glob("train-*.jsonl.gz"))
    if not shards:
        raise FileNotFoundError(f"no train-*.jsonl.gz shards in {corpus_dir}; build the corpus first")
    for shard in shards:
        with gzip.open(shard, "rt", encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]


def train_tokenizer(corpus_dir: Path | str = "data/corpus", out_dir: Path | str = DEFAULT_TOKENIZER_DIR,
                    vocab_size: int = 8192, min_frequency: int = 2, model_max_length: int | None = None):
    """Train a byte-level BPE on ``corpus_dir``'s train split and save it to ``out_dir``.

    Returns the ``PreTrainedTokenizerFast``. Other files in ``out_dir`` (the model) are left alone.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus_dir, out_dir = Path(corpus_dir), Path(out_dir)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_train_texts(corpus_dir), trainer=trainer)

    kwargs = {"model_max_length": model_max_length} if model_max_length else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   clean_up_tokenization_spaces=False, **kwargs)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # v5 writes "TokenizersBackend"; v4 knows only this
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    specials = out_dir / "special_tokens_map.json"
    if not specials.exists():  # recent transformers keep these only in tokenizer_config.json
        specials.write_text(json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}, indent=2) + "\n")
    return fast


def load_tokenizer(path: Path | str = DEFAULT_TOKENIZER_DIR):
    """Load the saved tokenizer with ``AutoTokenizer``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Train the demo byte-level BPE tokenizer")
    p.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    p.add_argument("--out", type=Path, default=DEFAULT_TOKENIZER_DIR)
    p.add_argument("--vocab-size", type=int, default=8192)
    a = p.parse_args()
    train_tokenizer(a.corpus, a.out, a.vocab_size)
    print(f"saved tokenizer to {a.out}")
