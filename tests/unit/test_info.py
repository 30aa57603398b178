"""genlip-model-info: exact parameter counts (spec §1.3), FLOPs per token (spec §10) and the TP/PP per-rank split.

The three variants run through the CLI wrapper in one subprocess (its own one-rank world, the way users run it);
the TP/PP split runs `main()` in this process's world; bad input must fail before any world is needed.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from genlip_mcore import config as C
from genlip_mcore.info import flops_per_token, main

ROOT = Path(__file__).resolve().parents[2]
TOTALS = {"l16": 702_392_832, "so16": 817_301_376, "g16": 1_543_396_352}
VISION = {"l16": 388_866_432, "so16": 467_240_832, "g16": 1_229_083_136}      # spec §1.3 subtotals


def test_cli_counts_all_variants():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}   # counting never needs a GPU (and must not allocate one)
    env.pop("MASTER_PORT", None)
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "model_info.py"), "--variant", "l16,so16,g16"],
                         capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    infos = {d["variant"]: d for d in map(json.loads, res.stdout.strip().splitlines())}
    assert sorted(infos) == sorted(TOTALS)
    for name, d in infos.items():
        assert d["total_params"] == TOTALS[name]
        assert d["vision_params"] == VISION[name]
        assert d["vision_params"] + d["text_params"] == d["total_params"]
        assert d["params_per_rank"]["first"] == d["params_per_rank"]["max"] == d["total_params"]   # TP=PP=1
        assert d["sample"] == {"image_tokens": 196, "text_tokens": 74, "attention_pairs": 55_695}
        assert d["flops_per_token"] == pytest.approx(d["dense_flops_per_token"] + d["attention_flops_per_token"])
    g = infos["g16"]
    assert g["n_eff"] == 1_385_562_112                                          # spec §10: ~1.386B
    assert g["dense_flops_per_token"] == pytest.approx(8.3e9, rel=0.01)
    assert g["attention_flops_per_token"] == pytest.approx(12 * 96 * 16 * 40 * 55_695 / 270)


def test_flops_formula_by_hand():
    m = C.model_config("so16")                                                 # E == D: no in_proj/proj term
    L, D, F, V = 27, 1152, 3072, 151936
    f = flops_per_token(m, n_img=10, n_txt=3)
    assert f["n_eff"] == L * (5 * D * D + 3 * D * F) + V * D
    assert f["sample"]["attention_pairs"] == 100 + 30 + 6
    assert f["attention_flops_per_token"] == pytest.approx(12 * 72 * 16 * L * 136 / 13)


def test_per_rank_split_g16_tp2_pp4(mcore_world, capsys):
    assert main(["--variant", "g16", "--tp", "2", "--pp", "4", "--seq-img", "256", "--seq-txt", "32"]) == 0
    d = json.loads(capsys.readouterr().out.strip())
    D, F, E, V, tp = 1536, 4096, 1024, 151936, 2
    layer_rep = 8 * D                                      # proj/fc2 biases (row-parallel), 2 LayerNorms, 2 scales
    layer_tp = 5 * D * D + 3 * D * F + 4 * D + 2 * F       # qkv (w, b), proj w, fc1 (w, b), fc2 w
    first_rep = (768 * D + D) + (E * D + D) + 10 * layer_rep
    last_rep = 2 * D + (D * E + E) + 10 * layer_rep
    st, per = d["stages"], d["params_per_rank"]
    assert st["first"] == {"layers": 10, "replicated": first_rep, "tensor_parallel": V * E + 10 * layer_tp,
                           "per_rank": first_rep + (V * E + 10 * layer_tp) // tp,
                           "per_tp_group": tp * first_rep + V * E + 10 * layer_tp}
    assert st["middle"]["per_rank"] == 10 * layer_rep + 10 * layer_tp // tp
    assert st["last"]["per_rank"] == last_rep + (V * E + 10 * layer_tp) // tp
    # Every parameter lives on exactly one stage: unique counts over the stages add up to the model.
    unique = sum(s["replicated"] + s["tensor_parallel"] for s in (st["first"], st["middle"], st["middle"], st["last"]))
    assert unique == d["total_params"] == TOTALS["g16"]
    assert per["max"] == max(per["first"], per["middle"], per["last"]) == per["first"]
    assert d["parallel"] == {"tp": 2, "pp": 4, "vpp": None, "layers_per_stage": 10, "layers_per_virtual_chunk": 10}
    assert d["sample"]["attention_pairs"] == 256 * 256 + 32 * 256 + 32 * 33 // 2


@pytest.mark.parametrize("argv, field", [
    (["--variant", "nope"], "model.variant"),
    (["--variant", "g16", "--tp", "3"], "parallel.tensor_model_parallel_size"),
    (["--variant", "so16", "--pp", "4"], "model.num_layers"),
    (["--variant", "g16", "--pp", "4", "--vpp", "3"], "model.num_layers"),
    (["--variant", "g16", "--vpp", "2"], "parallel.virtual_pipeline_model_parallel_size"),
    (["--variant", "g16", "--seq-txt", "0"], "--seq-txt"),
])
def test_bad_arguments_exit_2_naming_the_field(argv, field, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert field in captured.err and captured.out == ""
