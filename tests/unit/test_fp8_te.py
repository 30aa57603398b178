"""fp8_backend=te without Transformer Engine: what the TE path hands to Megatron and to nvdlfw-inspect.

- spec.transformer_config passes the precision fields to Megatron's TransformerConfig (te only);
- examples/fp8/attn_bf16.yaml parses with megatron-core's own RecipeConfig loader and keeps exactly the attention
  projections of the built model in BF16;
- te_stats: the nvdlfw-inspect debug config per recipe, its layer pattern against our model's module names, the
  converter from the documented statistics-log format to fp8_stats.jsonl rows, and the training hook's calls
  (against a stand-in for nvdlfw_inspect.api that follows its documented behaviour).
"""

import abc
import json
import math
import re
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from genlip_mcore import config as C
from genlip_mcore.model.fp8 import te_stats

REPO = Path(__file__).resolve().parents[2]
ATTN_BF16 = REPO / "examples" / "fp8" / "attn_bf16.yaml"
SCHEMA = ("iteration", "layer", "gemm", "tensor", "fp8", "recipe", "dtype", "amax", "scale", "scale_min", "scale_max",
          "underflow_pct", "overflow_pct", "mse", "kurtosis", "numel")


def te_cfg(**precision):
    pr = dict(bf16=True, fp8="hybrid", fp8_recipe="tensorwise", fp8_backend="te")
    return C.Config(model=C.model_config("tiny", transformer_impl="transformer_engine"),
                    precision=C.PrecisionConfig(**{**pr, **precision}))


# ------------------------------------------------------------------------------------------------------------------
# Megatron's TransformerConfig and quant_recipe
# ------------------------------------------------------------------------------------------------------------------
def test_transformer_config_carries_the_te_fields():
    from genlip_mcore.model.spec import transformer_config

    tc = transformer_config(te_cfg(fp8="e4m3", fp8_recipe="blockwise", fp8_margin=2, first_last_layers_bf16=True,
                                   num_layers_at_start_in_bf16=1, num_layers_at_end_in_bf16=2, fp8_param=True,
                                   fp8_amax_history_len=16, fp8_amax_compute_algo="most_recent",
                                   quant_recipe_file=str(ATTN_BF16)))
    assert (tc.fp8, tc.fp8_recipe, tc.fp8_margin, tc.fp8_param) == ("e4m3", "blockwise", 2, True)
    assert (tc.first_last_layers_bf16, tc.num_layers_at_start_in_bf16, tc.num_layers_at_end_in_bf16) == (True, 1, 2)
    assert (tc.fp8_amax_history_len, tc.fp8_amax_compute_algo) == (16, "most_recent")
    assert tc.quant_recipe is not None and tc.genlip_fp8_linears is None


@pytest.mark.parametrize("backend", ["emulate", "torchao"])
def test_other_backends_leave_megatron_fp8_off(backend):
    from genlip_mcore.model.spec import transformer_config

    cfg = C.Config(model=C.model_config("tiny"),
                   precision=C.PrecisionConfig(fp8="hybrid", fp8_recipe="tensorwise", fp8_backend=backend))
    tc = transformer_config(cfg)
    assert tc.fp8 is None and tc.quant_recipe is None and tc.genlip_fp8_linears == backend


def test_attn_bf16_recipe_keeps_attention_projections_in_bf16(tp1):
    from megatron.core.extensions.transformer_engine import TEQuantizationParams
    from megatron.core.quantization.quant_config import RecipeConfig
    from megatron.core.quantization.utils import get_quant_config_or_none

    recipe = RecipeConfig.from_yaml_file(str(ATTN_BF16))
    model, _ = tp1()
    picked = {}
    for name, _module in model.named_modules():
        qc = get_quant_config_or_none(name, recipe)
        if qc is not None:
            params = TEQuantizationParams.parse_from_config(qc)
            r = params.training_recipe
            assert r.fp8_quantization_recipe is None and r.fp4_quantization_recipe is None     # high precision
            assert r.override_quantized_autocast and params.evaluation_recipe is None
            picked[name] = qc.config_key
    layers = C.model_config("tiny").num_layers
    assert sorted(picked) == sorted(f"decoder.layers.{i}.self_attention.{g}" for i in range(layers)
                                    for g in ("linear_qkv", "linear_proj"))
    assert set(picked.values()) == {"bf16"}


# ------------------------------------------------------------------------------------------------------------------
# The nvdlfw-inspect debug config
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise", "mxfp8"])
def test_debug_config_asks_what_te_computes_for_the_recipe(tmp_path, recipe):
    path = te_stats.write_debug_config(tmp_path / "te_debug.yaml", recipe, 25)
    section = yaml.safe_load(path.read_text())[te_stats.SECTION]
    assert section["enabled"] is True and set(section["layers"]) == {"layer_name_regex_pattern"}
    te = section["transformer_engine"]
    assert te["LogTensorStats"] == {"enabled": True, "tensors": ["activation", "weight", "gradient"],
                                    "stats": ["cur_amax"], "freq": 25}
    fp8 = te["LogFp8TensorStats"]
    assert fp8["enabled"] is True and fp8["freq"] == 25
    assert [s["tensor"] for s in fp8["tensors_struct"]] == ["activation", "weight", "gradient"]
    for s in fp8["tensors_struct"]:
        expected = {"underflows%", "scale_inv_min", "scale_inv_max", "mse"} | ({"overflows%"} if recipe == "delayed"
                                                                              else set())
        assert set(s["stats"]) == expected and s["freq"] == 25
    assert list(tmp_path.iterdir()) == [path]                  # no temporary file left


def test_debug_config_with_fp8_params_asks_only_weight_scales():
    structs = te_stats.debug_config("tensorwise", 10, fp8_param=True)[te_stats.SECTION]["transformer_engine"][
        "LogFp8TensorStats"]["tensors_struct"]
    stats = {s["tensor"]: set(s["stats"]) for s in structs}
    assert stats["weight"] == {"scale_inv_min", "scale_inv_max"} and "mse" in stats["activation"]


def _nvdlfw_names(model, prefix="model"):
    """Names as nvdlfw-inspect's infer_and_assign_layer_names gives them (its documented rule): the module path
    under `prefix`, with a ModuleList child named by its `layer_number` attribute."""
    names = {}

    def walk(module, name):
        if isinstance(module, torch.nn.ModuleList):
            for child_name, child in module.named_children():
                walk(child, f"{name}.{getattr(child, 'layer_number', child_name)}")
            return
        names[module] = name
        for child_name, child in module.named_children():
            walk(child, f"{name}.{child_name}")

    walk(model, prefix)
    return names


def test_layer_pattern_selects_the_block_linears_with_global_layer_numbers(tp1):
    model, cfg = tp1()
    pattern = re.compile(te_stats.LAYER_PATTERN)
    names = _nvdlfw_names(model)
    chosen = sorted(n for n in names.values() if pattern.search(n))
    L = cfg.model.num_layers
    assert chosen == sorted(f"model.decoder.layers.{i}.{g}" for i in range(1, L + 1)
                            for g in ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1",
                                      "mlp.linear_fc2"))
    for name in chosen:           # the names TE logs statistics under parse back to (layer, gemm)
        layer, gemm, tensor, stat = te_stats.parse_name(f"{name}_gradient_scale_inv_min")
        assert f"layers.{layer}." in name and name.endswith(gemm) and (tensor, stat) == ("gradient", "scale_inv_min")


# ------------------------------------------------------------------------------------------------------------------
# Statistics log -> rows
# ------------------------------------------------------------------------------------------------------------------
def log_line(name, iteration, value, fmt="{:.4f}"):
    """One line as nvdlfw-inspect's FileLogger writes it (logging format "%(asctime)s - %(levelname)s - %(message)s",
    message "{} \\t\\t\\t\\t iteration={:06d} \\t\\t\\t\\t value={:.4f}")."""
    return f"2026-01-02 03:04:05,678 - INFO - {name} \t\t\t\t iteration={iteration:06d} \t\t\t\t value=" \
           + fmt.format(value) + "\n"


QKV3, FC2_1 = "model.module.decoder.layers.3.self_attention.linear_qkv", "model.module.decoder.layers.1.mlp.linear_fc2"


def test_converter_reads_the_file_logger_format(tmp_path):
    rank0 = tmp_path / "nvdlfw_inspect_globalrank-0.log"
    rank0.write_text(
        log_line(f"{QKV3}_activation_cur_amax", 10, 3.25)
        + log_line(f"{QKV3}_activation_underflows%", 10, 0.125)
        + log_line(f"{QKV3}_activation_overflows%", 10, 0.5)
        + log_line(f"{QKV3}_activation_scale_inv_min", 10, 0.0625)         # scale 16
        + log_line(f"{QKV3}_activation_scale_inv_max", 10, 0.0625)
        + log_line(f"{QKV3}_activation_mse", 10, 0.0012)
        + log_line(f"{QKV3}_gradient_scale_inv_min", 10, 0.0)               # rounded away by the 4 decimals
        + log_line(f"{QKV3}_gradient_scale_inv_max", 10, 2.0)
        + log_line(f"{FC2_1}_weight_cur_amax", 10, 0.75)                    # a BF16 layer: amax only
        + log_line("model.module.output_layer_activation_cur_amax", 10, 9.0)   # not a block linear
        + "2026-01-02 03:04:05,678 - INFO - something else entirely\n")
    rank1 = tmp_path / "nvdlfw_inspect_globalrank-1.log"                    # the same reduced value on another rank
    rank1.write_text(log_line(f"{QKV3}_activation_cur_amax", 10, 3.25) + log_line(f"{QKV3}_activation_mse", 20, 1.5))
    rows = te_stats.convert_logs([rank0, rank1], "delayed", "hybrid")
    assert all(tuple(r) == SCHEMA for r in rows)
    assert [(r["iteration"], r["layer"], r["gemm"], r["tensor"]) for r in rows] == [
        (10, 1, "linear_fc2", "weight"), (10, 3, "linear_qkv", "activation"), (10, 3, "linear_qkv", "gradient"),
        (20, 3, "linear_qkv", "activation")]
    bf16, act, grad, later = rows
    assert bf16 == {**{k: None for k in SCHEMA}, "iteration": 10, "layer": 1, "gemm": "linear_fc2",
                    "tensor": "weight", "fp8": False, "amax": 0.75}
    assert act["fp8"] and act["recipe"] == "delayed" and act["dtype"] == "e4m3"
    assert act["scale"] == act["scale_min"] == act["scale_max"] == 16.0
    assert (act["amax"], act["underflow_pct"], act["overflow_pct"], act["mse"]) == (3.25, 0.125, 0.5, 0.0012)
    assert act["kurtosis"] is None and act["numel"] is None                # not among TE's statistics
    assert grad["dtype"] == "e5m2" and grad["scale_min"] == 0.5 and grad["scale_max"] is None and grad["scale"] is None
    assert later["mse"] == 1.5
    json.dumps(rows)


def test_block_recipes_give_a_scale_range_and_mxfp8_scales_are_e8m0_bytes():
    name = "model.decoder.layers.2.mlp.linear_fc1_activation_"
    rows = te_stats.rows_from_scalars([(name + "scale_inv_min", 5, 2.0 ** -9), (name + "scale_inv_max", 5, 2.0 ** -3)],
                                      "blockwise", "e4m3")
    assert (rows[0]["scale_min"], rows[0]["scale_max"], rows[0]["scale"]) == (8.0, 512.0, None)
    rows = te_stats.rows_from_scalars([(name + "scale_inv_min", 5, 118.0), (name + "scale_inv_max", 5, 127.0),
                                       (name + "mxfp8_underflows%", 5, 1.0)], "mxfp8", "e4m3")
    r = rows[0]
    assert (r["scale_min"], r["scale_max"], r["underflow_pct"], r["dtype"]) == (1.0, 512.0, 1.0, "e4m3")


def test_gradient_dtype_follows_the_format():
    rows = te_stats.rows_from_scalars([("model.decoder.layers.1.mlp.linear_fc2_gradient_mse", 1, 0.1)],
                                      "tensorwise", "e4m3")
    assert rows[0]["dtype"] == "e4m3" and rows[0]["fp8"]


# ------------------------------------------------------------------------------------------------------------------
# The training hook, against a stand-in for nvdlfw_inspect
# ------------------------------------------------------------------------------------------------------------------
class FakeInspect:
    """nvdlfw_inspect.api as documented: initialize() once, infer_and_assign_layer_names(), a step counter that
    step() advances, statistics logged (for the iteration they were fed in) to the statistics logger at step()."""

    def __init__(self):
        self.calls, self.iteration, self.logger, self.names = [], None, None, []

    def initialize(self, config_file="", feature_dirs=None, statistics_logger=None, log_dir=".", **kw):
        self.calls.append("initialize")
        self.config = yaml.safe_load(Path(config_file).read_text())
        self.feature_dirs, self.logger, self.log_dir, self.iteration = feature_dirs, statistics_logger, log_dir, 0

    def infer_and_assign_layer_names(self, model):
        self.calls.append("names")
        for m in model:
            self.names += [n for n in _nvdlfw_names(m).values() if re.search(te_stats.LAYER_PATTERN, n)]

    def set_tensor_reduction_group(self, group):
        self.calls.append("group")

    def initialize_training_step(self, step):
        self.calls.append(f"start {step}")
        self.iteration = step

    def step(self):
        freq = self.config[te_stats.SECTION]["transformer_engine"]["LogTensorStats"]["freq"]
        if self.iteration % freq == 0:
            for n in self.names:
                self.logger.log_scalar(f"{n}_activation_cur_amax", torch.tensor(float(self.iteration)),
                                       self.iteration)
                self.logger.log_scalar(f"{n}_activation_scale_inv_min", 0.25, self.iteration)
                self.logger.log_scalar(f"{n}_activation_scale_inv_max", 0.25, self.iteration)
        self.iteration += 1

    def end_debug(self):
        self.calls.append("end")


@pytest.fixture
def fake_inspect(monkeypatch, tmp_path):
    api = FakeInspect()
    pkg, api_mod, logging_mod = (types.ModuleType(n) for n in ("nvdlfw_inspect", "nvdlfw_inspect.api",
                                                               "nvdlfw_inspect.logging"))

    class BaseLogger(abc.ABC):
        @abc.abstractmethod
        def log_scalar(self, name, value, iteration, **kwargs):
            pass

    logging_mod.BaseLogger = BaseLogger
    for attr in ("initialize", "infer_and_assign_layer_names", "set_tensor_reduction_group",
                 "initialize_training_step", "step", "end_debug"):
        setattr(api_mod, attr, getattr(api, attr))
    pkg.api, pkg.logging = api_mod, logging_mod
    for mod in (pkg, api_mod, logging_mod):
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    features = tmp_path / "te_features"
    features.mkdir()
    monkeypatch.setattr(te_stats, "te_feature_dir", lambda: str(features))
    return api


def test_hook_is_off_unless_te_statistics_are_asked_for(tmp_path):
    assert te_stats.init(te_cfg(), tmp_path) is None                                   # interval 0
    emu = C.Config(model=C.model_config("tiny"), precision=C.PrecisionConfig(fp8="hybrid", fp8_backend="emulate"),
                   logging=C.LoggingConfig(fp8_stats_interval=5))
    assert te_stats.init(emu, tmp_path) is None


def test_hook_drives_nvdlfw_inspect_and_writes_rows(tp1, fake_inspect, tmp_path):
    cfg = te_cfg(fp8_recipe="delayed")
    cfg.logging.fp8_stats_interval = 2
    hook = te_stats.init(cfg, tmp_path)
    assert fake_inspect.calls == ["initialize"]                  # before the model exists
    assert fake_inspect.log_dir == str(tmp_path / "nvdlfw_inspect") and len(fake_inspect.feature_dirs) == 1
    te = fake_inspect.config[te_stats.SECTION]["transformer_engine"]
    assert "overflows%" in te["LogFp8TensorStats"]["tensors_struct"][0]["stats"]
    model, _ = tp1()
    start = 4                                                    # a resumed run: the next step is 5
    hook.attach([model], start)
    assert fake_inspect.calls[1] == "names" and fake_inspect.calls[-1] == f"start {start + 1}"
    for it in range(start + 1, 10):
        hook.step(it)
        rows = [json.loads(line) for line in (tmp_path / "fp8_stats.jsonl").read_text().splitlines()] \
            if (tmp_path / "fp8_stats.jsonl").exists() else []
        assert sorted({r["iteration"] for r in rows}) == [i for i in (6, 8) if i <= it]
    hook.close()
    assert fake_inspect.calls[-1] == "end"
    L = C.model_config("tiny").num_layers
    assert len(rows) == 2 * 4 * L
    r = rows[0]
    assert tuple(r) == SCHEMA and (r["iteration"], r["layer"], r["gemm"], r["tensor"]) == (6, 1, "linear_qkv",
                                                                                            "activation")
    assert r["amax"] == 6.0 and r["scale"] == 4.0 and r["fp8"] and r["recipe"] == "delayed"
    assert not any(math.isnan(v) for row in rows for v in row.values() if isinstance(v, float))
