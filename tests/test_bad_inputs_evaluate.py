"""Bad inputs of `routesae evaluate` / `routesae analyze`: one line, exit 2, nothing written or overwritten.

The model check (routesae.model_match): a same-shape model with other weights, other widths, block
counts and vocabularies are refused; the right model passes in float32, float16 and under routing
overrides (the store's own for the check); a copy with another config hash passes with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from routesae.cli import app
from routesae.model_match import TOLERANCE, ModelMismatchError, check_reproduces
from routesae.models.load import ModelConfig, load_model
from routesae.models.tiny import build_tiny, save_tiny, tiny_tokenizer
from routesae.sae import SAEConfig, build_sae

torch.set_num_threads(1)
runner = CliRunner()


@pytest.fixture(scope="module")
def store(tiny_store, tmp_path_factory):
    return tiny_store(tmp_path_factory.mktemp("bad-eval") / "store", batch_size=4, layers="0:2", shard_mb=0.01,
                      max_tokens=200)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Same shape other weights (seed 1), other width, fewer blocks, smaller vocabulary."""
    root = tmp_path_factory.mktemp("other-models")
    out = {"wrong": save_tiny("olmoe", root / "wrong", seed=1)}
    for name, over in (("wide", {"hidden_size": 48}), ("shallow", {"num_hidden_layers": 3}),
                       ("small_vocab", {"vocab_size": 200})):
        build_tiny("olmoe", **over).save_pretrained(root / name)
        out[name] = root / name
    tiny_tokenizer().save_pretrained(root / "wide")
    return out


def _run(tmp_path, store, name="run", layers=(1,), d_in=32, record_store=True) -> Path:
    torch.manual_seed(0)
    run = tmp_path / name
    build_sae(SAEConfig(arch="topk" if len(layers) == 1 else "routesae", d_in=d_in, n_latents=64, k=4,
                        layers=list(layers), aux_k=0, bf16=False)).save_pretrained(run)
    if record_store:
        (run / "train_config.json").write_text(json.dumps({"store": str(store.root)}))
    return run


def _snapshot(*folders: Path) -> dict[str, tuple[str, int]]:
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for f in folders if f.exists() for p in sorted(f.rglob("*")) if p.is_file()}


def _refused(args: list[str], *folders: Path, words: tuple[str, ...]) -> str:
    """Invoke the CLI, expect exit 2 and one line holding ``words``, and that ``folders`` did not change."""
    before = _snapshot(*folders)
    res = runner.invoke(app, args)
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert _snapshot(*folders) == before
    return lines[0]


def _with_old_eval(run: Path) -> None:
    (run / "eval.json").write_text('{"old": true}\n')
    (run / "analysis").mkdir(exist_ok=True)
    (run / "analysis" / "summary.json").write_text('{"old": true}\n')


# ---------------------------------------------------------------- the model is not the store's


@pytest.mark.parametrize("command", ["evaluate", "analyze"])
def test_same_shape_other_weights_is_refused(command, store, models, tiny_ckpt, tmp_path):
    run = _run(tmp_path, store)
    _with_old_eval(run)
    line = _refused([command, str(run), "--model", str(models["wrong"]), "--device", "cpu"], run, store.root,
                    words=(str(models["wrong"]), str(tiny_ckpt("olmoe")), "median relative row difference",
                           "tolerance 0.01", "--model", "capture a store with this model"))
    assert float(line.split("difference ")[1].split(" ")[0]) > 1.0  # measured: ~1.5 for this pair


@pytest.mark.parametrize("command", ["evaluate", "analyze"])
@pytest.mark.parametrize("model,words", [("wide", ("hidden size 48", "d_model=32")),
                                         ("shallow", ("3 decoder blocks", "with 4")),
                                         ("small_vocab", ("vocabulary of 200", "vocabulary of 320"))])
def test_other_shape_is_refused(command, model, words, store, models, tmp_path):
    run = _run(tmp_path, store)
    _with_old_eval(run)
    _refused([command, str(run), "--model", str(models[model]), "--device", "cpu"], run, store.root,
             words=(str(models[model]), *words, "--model"))


def test_right_model_passes_and_is_recorded(store, tiny_ckpt, tmp_path):
    run = _run(tmp_path, store, layers=(0, 1, 2))
    res = runner.invoke(app, ["evaluate", str(run), "--model", str(tiny_ckpt("olmoe")), "--device", "cpu",
                              "--batch-tokens", "64"])
    assert res.exit_code == 0, res.output
    assert "reproduces the store" in res.output
    check = json.loads((run / "eval.json").read_text())["splice"]["model_check"]
    assert check["value"] < 1e-5 and check["tolerance"] == TOLERANCE["float32"] == 0.01
    assert check["config_hash_model"] == check["config_hash_store"] == store.manifest["model"]["config_hash"]
    assert check["routing_override"] is None and check["tokens"] > 0


def test_float16_store_with_its_model_passes(tiny_store, tiny_ckpt, tmp_path):
    half = tiny_store(tmp_path / "half", batch_size=3, layers="1:2", max_tokens=120, dtype="float16")
    run = _run(tmp_path, half)
    res = runner.invoke(app, ["evaluate", str(run), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    sp = json.loads((run / "eval.json").read_text())["splice"]
    assert sp["model_check"]["store_dtype"] == "float16" and sp["model_check"]["value"] <= 1e-3
    assert "ce_recovered" in sp
    # analyze's float32 model against the float16 rows: small, well inside the half tolerance
    model, _ = load_model(ModelConfig(str(tiny_ckpt("olmoe")), "float32", "cpu"))
    got = check_reproduces(model, "fp32", half, [1, 2], contexts=1)
    assert 0 < got["value"] < TOLERANCE["float16"] / 10


def test_routing_override_compares_like_with_like(tiny_store, store, tiny_ckpt, tmp_path):
    run = _run(tmp_path, store)
    res = runner.invoke(app, ["evaluate", str(run), "--routing-override", "ablate:0,1,2,3", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    sp = json.loads((run / "eval.json").read_text())["splice"]
    check = sp["model_check"]  # under the store's routing (none), not the evaluation's
    assert sp["clean_vs_store_max_abs_diff"] > 1e-3 > 100 * check["max_abs_diff"]
    assert check["routing_override"] is None and check["value"] < 1e-5
    over = tiny_store(tmp_path / "over", batch_size=4, layers="1", max_tokens=96, routing_override="ablate:0,1,2,3")
    run = _run(tmp_path, over, name="over-run")
    res = runner.invoke(app, ["evaluate", str(run), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    check = json.loads((run / "eval.json").read_text())["splice"]["model_check"]
    assert check["routing_override"] == "ablate:0,1,2,3" and check["max_abs_diff"] < 1e-5
    over.manifest["routing_override"] = None  # the same check without the store's override: refused
    model, _ = load_model(ModelConfig(str(tiny_ckpt("olmoe")), "float32", "cpu"))
    with pytest.raises(ModelMismatchError, match="median relative row difference"):
        check_reproduces(model, "olmoe", over, [1])


def test_config_hash_differs_but_rows_reproduce(store, tiny_ckpt, tmp_path, caplog):
    copy = shutil.copytree(tiny_ckpt("olmoe"), tmp_path / "copy")
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, "note": "a copy with a harmless edit"}))
    run = _run(tmp_path, store)
    with caplog.at_level(logging.WARNING, logger="routesae.model_match"):
        res = runner.invoke(app, ["evaluate", str(run), "--model", str(copy), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    check = json.loads((run / "eval.json").read_text())["splice"]["model_check"]
    assert check["config_hash_model"] != check["config_hash_store"] and check["value"] < 1e-5
    warned = [r.getMessage() for r in caplog.records if r.name == "routesae.model_match"]
    assert len(warned) == 1 and "config hash" in warned[0] and "\n" not in warned[0]


# ---------------------------------------------------------------- runs and stores


@pytest.mark.parametrize("command", ["evaluate", "analyze"])
def test_not_a_run(command, store, tmp_path):
    folder = tmp_path / "not-a-run"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    _refused([command, str(folder), "--store", str(store.root), "--device", "cpu"], folder, store.root,
             words=("config.json", "not found", "run folder"))
    _refused([command, str(store.root), "--device", "cpu"], store.root, words=("config.json", "run folder"))


@pytest.mark.parametrize("command", ["evaluate", "analyze"])
def test_run_whose_store_is_missing(command, store, tmp_path):
    run = _run(tmp_path, store, record_store=False)
    (run / "train_config.json").write_text(json.dumps({"store": str(tmp_path / "gone")}))
    _with_old_eval(run)
    _refused([command, str(run), "--device", "cpu"], run, words=(str(tmp_path / "gone"), "missing", "--store"))


@pytest.mark.parametrize("command", ["evaluate", "analyze"])
def test_store_of_another_width(command, store, tiny_store, models, corpus_jsonl, tmp_path):
    from routesae.capture import CaptureConfig, capture

    other = capture(CaptureConfig(model=str(models["wide"]), corpus=str(corpus_jsonl), out=str(tmp_path / "wide"),
                                  ctx=24, device="cpu", progress=False, max_tokens=48, layers="1"))
    run = _run(tmp_path, store)
    _with_old_eval(run)
    _refused([command, str(run), "--store", str(other), "--device", "cpu"], run, other,
             words=("d_model=48", "d_in=32", "--store"))


def _broken_copy(store, tmp_path, name: str) -> tuple[Path, Path]:
    copy = shutil.copytree(store.root, tmp_path / "broken")
    assert len(store.shards) >= 2
    (copy / name).unlink()
    return copy, copy / name


@pytest.mark.parametrize("command", ["evaluate", "analyze"])
def test_missing_token_part(command, store, tmp_path):
    copy, gone = _broken_copy(store, tmp_path, "tokens.parquet/part-00000.parquet")
    run = _run(tmp_path, store, record_store=False)
    _with_old_eval(run)
    _refused([command, str(run), "--store", str(copy), "--device", "cpu"], run, copy,
             words=(str(gone), "missing", "capture"))


@pytest.mark.parametrize("command", ["evaluate", "analyze"])
def test_missing_activation_shard(command, store, tmp_path):
    copy, gone = _broken_copy(store, tmp_path, "acts-00001.safetensors")
    run = _run(tmp_path, store, record_store=False)
    _with_old_eval(run)
    _refused([command, str(run), "--store", str(copy), "--device", "cpu", "--no-splice" if command == "evaluate"
              else "--no-model"], run, copy, words=(gone.name, "capture the store again"))
