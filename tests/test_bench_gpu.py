"""bench/gpu.py: the CPU smoke mode runs every part end to end; the peak table and the OLMoE shape."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "OUT": ""}


def test_smoke_mode_runs_every_part(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, env=_env(), timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["smoke"] and res["gpu"] == "cpu (smoke)" and res["peak_tflops"] is None
    assert [r["arch"] for r in res["sae"]] == ["topk", "routesae"]
    assert [r["device_map"] for r in res["online"]] == [None, "auto"]
    for r in res["sae"] + res["online"]:
        assert r["tokens_per_s"] > 0 and math.isfinite(r["tokens_per_s"]) and r["peak_mem_gib"] is None
    for r in res["sae"]:
        assert r["tflops_6dM"] == pytest.approx(6 * r["d"] * r["latents"] * r["tokens_per_s"] / 1e12)
    for r in res["online"]:
        assert r["placement"] == ["cpu"] and r["forwards"] > 0 and 0 < r["forward_share"] < 1
    assert res["model_built"]["router_weight_std"] > 0  # routing is not degenerate
    assert "| (a) SAE |" in proc.stdout and "| (b) online RouteSAE |" in proc.stdout
    assert "--device-map auto" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed where there is no GPU")
def test_without_a_gpu_it_stops_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--out", str(tmp_path / "x.json")],
                          capture_output=True, text=True, env=_env(), timeout=120, cwd=ROOT)
    assert proc.returncode == 1 and not (tmp_path / "x.json").exists()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0] and "--smoke" in lines[0]


def test_peak_table_matches_device_names():
    gpu = _load("bench_gpu", ROOT / "bench" / "gpu.py")
    assert gpu.gpu_peak("NVIDIA H100 80GB HBM3") == 989.0  # SXM
    assert gpu.gpu_peak("NVIDIA H100 PCIe") == 756.0
    assert gpu.gpu_peak("NVIDIA H100 NVL") == 835.0
    assert gpu.gpu_peak("NVIDIA H200") == 989.0
    assert gpu.gpu_peak("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu.gpu_peak("NVIDIA A10") == 125.0
    assert gpu.gpu_peak("NVIDIA L40S") == 362.0
    assert gpu.gpu_peak("NVIDIA L4") == 121.0
    assert gpu.gpu_peak("Some Future GPU") is None


def test_olmoe_shape_is_the_published_one():
    from transformers import AutoModelForCausalLM, OlmoeConfig

    gpu = _load("bench_gpu", ROOT / "bench" / "gpu.py")
    sizing = _load("analyses_sizing", ROOT / "analyses" / "sizing.py")
    published = sizing.MODELS["OLMoE-1B-7B"][1]
    assert {k: gpu.OLMOE_1B_7B[k] for k in published} == published
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(OlmoeConfig(**gpu.OLMOE_1B_7B), dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    assert 6.85e9 < n < 7.0e9  # 6.9B total (OLMoE paper)
    assert len(model.model.layers) == 16 and gpu.ROUTED_LAYERS == 9


def test_bad_options_are_one_line_errors(capsys):
    gpu = _load("bench_gpu", ROOT / "bench" / "gpu.py")
    for argv, needle in ((["--parts", "capture"], "--parts"), (["--steps", "0"], "--steps 0"),
                         (["--peak-tflops", "-1"], "--peak-tflops")):
        with pytest.raises(SystemExit):
            gpu.parse_args(argv)
        assert needle in capsys.readouterr().err


def test_a_failed_run_is_reported_in_one_line_and_the_others_go_on():
    gpu = _load("bench_gpu", ROOT / "bench" / "gpu.py")
    logged: list[str] = []
    r = gpu._attempt(lambda: {}["missing"], "(a) topk", logged.append)
    assert r == {"what": "(a) topk", "error": "KeyError: 'missing'"} and "FAILED" in logged[0]
    table = gpu.markdown({"gpu": "X", "peak_tflops": None, "peak_source": "-", "torch": "-", "transformers": "-",
                          "model_name": "m", "sae": [r], "online": [dict(r, what="(b) no device map")]})
    assert "| (a) topk | failed: KeyError: 'missing' |" in table and "| (b) no device map | failed:" in table
