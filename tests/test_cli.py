"""The command line over the Python API (typer's runner, in process)."""

import json

from typer.testing import CliRunner

from routesae.cli import app

runner = CliRunner()


def test_capture_store_info_verify(tiny_ckpt, corpus_jsonl, tmp_path):
    out = tmp_path / "s"
    res = runner.invoke(app, ["capture", str(tiny_ckpt("mixtral")), str(corpus_jsonl), "--out", str(out),
                              "--ctx", "32", "--max-tokens", "80", "--layers", "1:2", "--device", "cpu", "-q"])
    assert res.exit_code == 0, res.output
    assert "80 tokens, layers [1, 2], 4 MoE layers" in res.output
    res = runner.invoke(app, ["store", "info", str(out)])
    assert res.exit_code == 0 and "top-2" in res.output and "8 experts" in res.output
    res = runner.invoke(app, ["store", "verify", str(out)])
    assert res.exit_code == 0 and "all shards match" in res.output


def test_user_errors_are_one_line_exit_2(tiny_ckpt, corpus_jsonl, tmp_path):
    res = runner.invoke(app, ["capture", str(tmp_path / "missing"), str(corpus_jsonl), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert res.output.count("\n") == 1 and "not found" in res.output
    res = runner.invoke(app, ["capture", str(tiny_ckpt("olmoe")), str(corpus_jsonl), "--out", str(tmp_path / "o"),
                              "--layers", "7", "--device", "cpu"])
    assert res.exit_code == 2 and "out of range" in res.output


def test_help_lists_commands():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("capture", "store", "zoo", "data"):
        assert cmd in res.output


def test_train_from_the_command_line(tiny_ckpt, corpus_jsonl, tmp_path):
    store = tmp_path / "s"
    res = runner.invoke(app, ["capture", str(tiny_ckpt("olmoe")), str(corpus_jsonl), "--out", str(store),
                              "--ctx", "32", "--layers", "all", "--device", "cpu", "-q"])
    assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    args = ["train", str(store), "--out", str(run), "--layers", "1:3", "--k", "4", "--latents", "64",
            "--batch-tokens", "64", "--router", "ste", "--device", "cpu", "-q"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["layers"] == [1, 2, 3] and cfg["router"] == "ste" and cfg["n_latents"] == 64
    assert (run / "metrics.jsonl").read_text().strip()
    res = runner.invoke(app, ["evaluate", str(run), "--tokens", "128", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    ev = json.loads((run / "eval.json").read_text())
    assert "NMSE" in res.output and "CE clean" in res.output and 0 <= ev["sae_space"]["nmse"] < 1
    res = runner.invoke(app, ["export", str(run), "--to", "saelens", "--out", str(tmp_path / "sl")])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "sl").iterdir()) == ["README.md", *(f"blocks.{i}.hook_resid_post"
                                                                                for i in (1, 2, 3))]
    assert "mean p_i* of the tokens routed to the layer" in res.output  # measured on the run's store
    res = runner.invoke(app, ["analyze", str(run), "--tokens", "256", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert (run / "analysis" / "latents.parquet").exists() and (run / "analysis" / "expert_domain.parquet").exists()
    res = runner.invoke(app, ["report", str(run), "--format", "html,md"])
    assert res.exit_code == 0, res.output
    html = (run / "report" / "report.html").read_text()
    assert "<script src" not in html and "Plotly.newPlot" in html and (run / "report" / "report.md").exists()
    res = runner.invoke(app, ["report", str(run), "--format", "docx"])
    assert res.exit_code == 2 and "unknown report format docx" in res.output
    res = runner.invoke(app, args)  # the same run again without --resume: refused, nothing touched
    assert res.exit_code == 2 and "--resume" in res.output
    res = runner.invoke(app, ["train", str(store), "--out", str(tmp_path / "r2"), "--k", "99", "--latents", "64"])
    assert res.exit_code == 2 and "larger than the latent count" in res.output
