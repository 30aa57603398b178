"""Checkpoint conversion, end to end with the real CLI and a TP=2 x PP=2 model on 4 CPU ranks.

1. The tiny model trains 3 steps at TP=2 x PP=2; `genlip-convert to-hf` (one process) exports its checkpoint in
   fp32; `AutoModel.from_pretrained(dir, trust_remote_code=True)` gives the logits and the loss of the sharded
   Megatron model (computed through the pipeline schedule), on the packed row and on a padded batch of the same
   samples: 1e-5 (TP splits the matmul sums differently: fp32 rounding only). The same weights saved from a
   PP=2 x VPP=2 layout export to the same tensors.
2. `genlip-convert from-hf` writes a model-only checkpoint, which loads at TP=2 x PP=2 and gives the HF model's
   logits; saved again from that layout and exported, it is bit-identical to the first export.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.distributed.hf_pack import SAMPLES, conversion_pack
from tests.distributed.launch import REPO, torchrun

pytestmark = pytest.mark.distributed
TOL = 1e-5


def convert(*args: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-m", "genlip_mcore.convert", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    w = tmp_path_factory.mktemp("hfconv")
    torchrun("hf_worker.py", 4, "train", str(w))
    convert("to-hf", "--checkpoint", str(w / "run" / "checkpoints"), "--out", str(w / "hf"), "--dtype", "fp32")
    convert("to-hf", "--checkpoint", str(w / "vpp"), "--out", str(w / "hf_vpp"), "--dtype", "fp32")
    convert("from-hf", "--hf", str(w / "hf"), "--out", str(w / "from_hf"),
            "parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2")
    torchrun("hf_worker.py", 4, "reload", str(w / "from_hf"), str(w))
    convert("to-hf", "--checkpoint", str(w / "resaved"), "--out", str(w / "hf2"), "--dtype", "fp32")
    return w


@pytest.fixture(scope="module")
def hf_model(work):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(work / "hf"), trust_remote_code=True).float().eval()
    return model


def _model_cfg():
    from genlip_mcore import config as C
    from tests.distributed.hf_pack import TRAIN

    return C.load(None, TRAIN).model


def test_export_loads_as_remote_code_not_our_package(work, hf_model):
    cj = json.loads((work / "hf" / "config.json").read_text())
    assert cj["model_type"] == "genlip" and cj["architectures"] == ["GenLIPModel"]
    assert cj["auto_map"] == {"AutoConfig": "configuration_genlip.GenLIPConfig",
                              "AutoModel": "modeling_genlip.GenLIPModel"}
    assert not type(hf_model).__module__.startswith("genlip_mcore")      # transformers' dynamic module
    for name in ("configuration_genlip.py", "modeling_genlip.py", "model.safetensors", "preprocessor_config.json"):
        assert (work / "hf" / name).is_file(), name


def test_packed_logits_and_loss_equal_megatron(work, hf_model):
    mg = torch.load(work / "train.pt")
    row, _ = conversion_pack(_model_cfg())
    real = row["sample_ids"] >= 0
    with torch.no_grad():
        out = hf_model(row["input_ids"][None], row["image_mask"][None], row["pixel_patches"],
                       image_grid_thw=[[1, gh, gw] for gh, gw, _ in SAMPLES], sample_ids=row["sample_ids"][None],
                       labels=row["labels"][None])
    n = int(real.sum())
    assert mg["logits"].shape[0] == row["input_ids"].numel()
    assert (out.logits[0][real] - mg["logits"][:n]).abs().max() < TOL
    assert abs(out.loss.item() - mg["losses"].mean().item()) < TOL


def test_batched_logits_and_loss_equal_megatron(work, hf_model):
    mg = torch.load(work / "train.pt")
    _, singles = conversion_pack(_model_cfg())
    S = max(s["input_ids"].numel() for s in singles)
    pad = lambda t, v: torch.nn.functional.pad(t, (0, S - t.shape[-1]), value=v)   # noqa: E731
    with torch.no_grad():
        out = hf_model(torch.stack([pad(s["input_ids"], 0) for s in singles]),
                       torch.stack([pad(s["image_mask"], False) for s in singles]),
                       torch.cat([s["pixel_patches"] for s in singles]),
                       attention_mask=torch.stack([pad(torch.ones_like(s["input_ids"]), 0) for s in singles]),
                       image_grid_thw=[[1, gh, gw] for gh, gw, _ in SAMPLES],
                       labels=torch.stack([pad(s["labels"], -100) for s in singles]))
    for b, s in enumerate(singles):
        n = s["input_ids"].numel()
        assert (out.logits[b, :n] - mg["logits"][s["positions"]]).abs().max() < TOL
    assert abs(out.loss.item() - mg["losses"].mean().item()) < TOL


def test_hf_to_dist_tp2pp2_gives_the_hf_logits(work):
    a, b = torch.load(work / "train.pt"), torch.load(work / "reload.pt")
    assert (a["logits"] - b["logits"]).abs().max() < TOL
    assert (a["losses"] - b["losses"]).abs().max() < TOL
    meta = json.loads((work / "from_hf" / "iter_0000000" / "genlip.json").read_text())
    assert meta["weights_only"] and meta["config"]["parallel"]["tensor_model_parallel_size"] == 2


def test_hf_to_dist_to_hf_is_bit_identical(work):
    from safetensors.torch import load_file

    one, two = load_file(str(work / "hf" / "model.safetensors")), load_file(str(work / "hf2" / "model.safetensors"))
    assert one.keys() == two.keys()
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert (work / "hf" / "model.safetensors").read_bytes() == (work / "hf2" / "model.safetensors").read_bytes()
    assert json.loads((work / "hf" / "config.json").read_text()) == json.loads((work / "hf2" / "config.json").read_text())


def test_export_of_a_vpp_checkpoint_is_the_same(work):
    from safetensors.torch import load_file

    one, vpp = load_file(str(work / "hf" / "model.safetensors")), load_file(str(work / "hf_vpp" / "model.safetensors"))
    assert one.keys() == vpp.keys() and all(torch.equal(one[k], vpp[k]) for k in one)


def test_weights_only_checkpoint_refuses_resume(work):
    """A converted checkpoint has no optimizer state: training.load_dir must say so (before touching anything)
    and point at training.init_from."""
    from genlip_mcore.train.checkpoint import load_checkpoint

    with pytest.raises(RuntimeError, match="training.init_from"):
        load_checkpoint(str(work / "from_hf"), chunks=None, optimizer=None, scheduler=None, cfg=None)
