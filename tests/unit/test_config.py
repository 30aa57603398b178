"""genlip_mcore.config: variants carry the spec's numbers, YAML + overrides load with types, validate() names fields.

Every rejection test asserts on the start of the message: the dotted path of the field a user has to change.
"""

from pathlib import Path

import pytest
import yaml

from genlip_mcore import config as C
from genlip_mcore import preflight
from genlip_mcore.data.sources import expand_shards

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples" / "configs").glob("*.yaml"))
TE_EXAMPLES = [p for p in EXAMPLES if "_stage" in p.name]      # the reference recipes (GPU, Transformer Engine)


@pytest.fixture
def no_te(monkeypatch):
    """Validation as on a machine without Transformer Engine, whatever this machine has."""
    monkeypatch.setattr(C, "te_available", lambda: False)


@pytest.fixture
def with_te(monkeypatch):
    """Validation as on a GPU machine with the GPU stack installed (Transformer Engine and DALI), whatever this
    machine has: the TE recipes also decode with DALI."""
    has_module = C._has_module
    monkeypatch.setattr(C, "te_available", lambda: True)
    monkeypatch.setattr(C, "_has_module", lambda name: name == "nvidia.dali" or has_module(name))


def rejects(cfg, field, *, world_size=None, match=None):
    with pytest.raises(C.ConfigError) as err:
        C.validate(cfg, world_size=world_size)
    msg = str(err.value)
    assert msg.startswith(field + ":"), msg
    if match is not None:
        assert match in msg, msg
    return msg


def tiny(**sections):
    """A tiny config with per-section overrides, e.g. tiny(parallel={"tensor_model_parallel_size": 2})."""
    return C.from_dict({"model": {"variant": "tiny"}, **sections})


# ------------------------------------------------------------------------------------------------------------------
# Variants (spec §1.2)
# ------------------------------------------------------------------------------------------------------------------
SPEC_VARIANTS = {
    #        L,  D,    F,    H,  E,    mrope_section, drop_path
    "l16": (24, 1152, 2752, 16, 1024, [8, 12, 12], 0.1),
    "so16": (27, 1152, 3072, 16, 1152, [12, 12, 12], 0.1),
    "g16": (40, 1536, 4096, 16, 1024, [16, 16, 16], 0.2),
}
SPEC_PARAMS = {"l16": 702_392_832, "so16": 817_301_376, "g16": 1_543_396_352}   # spec §1.3
SPEC_HEAD_DIM = {"l16": 72, "so16": 72, "g16": 96}


@pytest.mark.parametrize("name", sorted(SPEC_VARIANTS))
def test_variant_rows_match_spec(name):
    L, D, F, H, E, mrope, dp = SPEC_VARIANTS[name]
    m = C.model_config(name)
    assert (m.variant, m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads) == (name, L, D, F, H)
    assert m.text_embed_dim == E
    assert m.vocab_size == 151936
    assert m.mrope_section == mrope
    assert m.drop_path_rate == dp
    assert m.head_dim == SPEC_HEAD_DIM[name]
    # shared by all three (spec §1.1)
    assert (m.patch_size, m.num_channels, m.rope_theta, m.layer_scale_init, m.layernorm_epsilon, m.init_std) == (
        16, 3, 1e4, 0.1, 1e-6, 0.02)
    C.validate(C.Config(model=m))


@pytest.mark.parametrize("name", sorted(SPEC_VARIANTS))
def test_variant_parameter_count_matches_spec(name):
    """Spec §1.3's closed form over the variant row gives the released checkpoints' parameter counts."""
    m = C.model_config(name)
    L, D, F, E, V = m.num_layers, m.hidden_size, m.ffn_hidden_size, m.text_embed_dim, m.vocab_size
    per_layer = 5 * D * D + 3 * D * F + 12 * D + 2 * F
    patch = m.patch_dim * D + D
    text = 2 * V * E + ((E * D + D) + (D * E + E) if E != D else 0)
    assert L * per_layer + patch + 2 * D + text == SPEC_PARAMS[name]


def test_variants_table_has_tiny_and_the_three_sizes():
    assert set(C.VARIANTS) == {"tiny", "l16", "so16", "g16"}
    assert set(C.VARIANTS["tiny"]) == set(C.VARIANTS["g16"])       # every row sets the same fields
    C.validate(C.Config(model=C.model_config("tiny")))


def test_variant_row_then_explicit_fields():
    cfg = C.from_dict({"model": {"variant": "g16", "drop_path_rate": 0.0}})
    assert cfg.model.num_layers == 40 and cfg.model.drop_path_rate == 0.0
    assert C.model_config("l16", num_layers=2).num_layers == 2


# ------------------------------------------------------------------------------------------------------------------
# load(): YAML + key=value overrides
# ------------------------------------------------------------------------------------------------------------------
def write_yaml(tmp_path, tree):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_load_defaults_without_file():
    cfg = C.load()
    assert cfg == C.validate(C.Config(model=C.model_config("tiny")))


def test_load_yaml_then_overrides(tmp_path):
    path = write_yaml(tmp_path, {"model": {"variant": "l16"}, "training": {"train_iters": 7},
                                 "optimizer": {"lr": 0.5}})
    cfg = C.load(path, ["training.train_iters=12", "optimizer.min_lr=0.001"])
    assert cfg.model.num_layers == 24                  # the variant row
    assert cfg.training.train_iters == 12              # override beats the file
    assert cfg.optimizer.lr == 0.5                     # file beats the default
    assert cfg.optimizer.min_lr == 0.001


def test_override_types_are_coerced():
    cfg = C.load(overrides=[
        "training.train_iters=5",                      # int
        "optimizer.lr=2",                              # int -> float
        "model.drop_path_rate=0",                      # int -> float
        "precision.bf16=true",                         # bool
        "model.mrope_section=[2,3,3]",                 # list[int]
        "model.attention_backend=local",               # str
        "parallel.virtual_pipeline_model_parallel_size=null",   # Optional
        "model.recompute_num_layers=2",                # Optional[int]
    ])
    assert cfg.training.train_iters == 5 and type(cfg.training.train_iters) is int
    assert cfg.optimizer.lr == 2.0 and type(cfg.optimizer.lr) is float
    assert type(cfg.model.drop_path_rate) is float
    assert cfg.precision.bf16 is True
    assert cfg.model.mrope_section == [2, 3, 3]
    assert cfg.model.attention_backend == "local"
    assert cfg.parallel.virtual_pipeline_model_parallel_size is None
    assert cfg.model.recompute_num_layers == 2


def test_override_decimal_float():
    assert C.load(overrides=["optimizer.lr=1.0e-4"]).optimizer.lr == pytest.approx(1e-4)
    assert C.load(overrides=["optimizer.lr=0.0001"]).optimizer.lr == pytest.approx(1e-4)


def test_exponent_float_without_dot(tmp_path):
    """YAML 1.1 reads `1e-4` (no dot) as a string; float fields must still take it, in files and overrides."""
    assert C.load(overrides=["optimizer.lr=1e-4"]).optimizer.lr == pytest.approx(1e-4)
    path = tmp_path / "lr.yaml"
    path.write_text("optimizer:\n  lr: 1e-3\n  min_lr: 1e-6\n")
    cfg = C.load(path)
    assert (cfg.optimizer.lr, cfg.optimizer.min_lr) == (pytest.approx(1e-3), pytest.approx(1e-6))


def test_override_variant_pulls_row():
    cfg = C.load(overrides=["model.variant=so16"])
    assert (cfg.model.num_layers, cfg.model.text_embed_dim) == (27, 1152)


def test_override_nested_creates_section(tmp_path):
    path = write_yaml(tmp_path, {"model": {"variant": "tiny"}})       # no parallel section in the file
    cfg = C.load(path, ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"], world_size=2)
    assert cfg.parallel.tensor_model_parallel_size == 2 and cfg.parallel.sequence_parallel is True


@pytest.mark.parametrize("override, field", [
    ("training.train_iters=abc", "training.train_iters"),
    ("training.train_iters=1.5", "training.train_iters"),
    ("precision.bf16=1", "precision.bf16"),
    ("optimizer.lr=fast", "optimizer.lr"),
    ("model.mrope_section=4", "model.mrope_section"),
    ("model.transformer_impl=3", "model.transformer_impl"),
])
def test_override_wrong_type_names_field(override, field):
    with pytest.raises(C.ConfigError) as err:
        C.load(overrides=[override])
    assert str(err.value).startswith(field + ":"), str(err.value)


def test_unknown_field_names_it(tmp_path):
    with pytest.raises(C.ConfigError) as err:
        C.load(overrides=["training.train_itters=3"])
    assert str(err.value).startswith("training.train_itters:"), str(err.value)
    assert "unknown field" in str(err.value)
    with pytest.raises(C.ConfigError) as err:
        C.load(write_yaml(tmp_path, {"model": {"hiden_size": 64}}))
    assert str(err.value).startswith("model.hiden_size:"), str(err.value)


def test_unknown_section_names_it(tmp_path):
    with pytest.raises(C.ConfigError) as err:
        C.load(overrides=["trainer.train_iters=3"])
    assert str(err.value).startswith("trainer:"), str(err.value)
    assert "unknown section" in str(err.value)
    with pytest.raises(C.ConfigError) as err:
        C.load(write_yaml(tmp_path, {"optimiser": {"lr": 0.1}}))
    assert str(err.value).startswith("optimiser:"), str(err.value)


@pytest.mark.parametrize("item", ["training.train_iters", "=3", "training.train_iters 3"])
def test_malformed_override(item):
    with pytest.raises(C.ConfigError):
        C.load(overrides=[item])


def test_override_into_a_scalar_is_rejected():
    with pytest.raises(C.ConfigError) as err:
        C.load(overrides=["training.seed=1", "training.seed.x=2"])
    assert str(err.value).startswith("training.seed.x:"), str(err.value)


def test_yaml_top_level_must_be_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(C.ConfigError, match=f"^{path}: top level must be a mapping"):
        C.load(path)


@pytest.mark.parametrize("name, content, match", [
    ("missing.yaml", None, "no such config file"),
    ("syntax.yaml", "model:\n  variant: tiny\n bad: [1\n", "YAML syntax error at line"),
    ("binary.yaml", b"\xff\xfe\x00model", "not a text file"),
    ("section.yaml", "model: [1, 2]\n", None),
])
def test_unreadable_config_file_is_one_line_naming_it(tmp_path, name, content, match):
    """A missing file, bad YAML or a section that is not a mapping: one ConfigError line, naming the file or
    section, never the parser's own exception."""
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(C.ConfigError) as err:
        C.load(path)
    msg = str(err.value)
    assert "\n" not in msg, msg
    if match is None:
        assert msg.startswith("model: expected a mapping"), msg
    else:
        assert msg.startswith(f"{path}: {match}"), msg


def test_load_validates(tmp_path):
    with pytest.raises(C.ConfigError) as err:
        C.load(overrides=["parallel.sequence_parallel=true"])
    assert str(err.value).startswith("parallel.sequence_parallel:")


def test_to_dict_round_trips():
    cfg = C.load(overrides=["model.variant=g16", "training.train_iters=3"])
    assert C.from_dict(C.to_dict(cfg)) == cfg


# ------------------------------------------------------------------------------------------------------------------
# validate(): each rejection names the field to change
# ------------------------------------------------------------------------------------------------------------------
def test_heads_not_divisible_by_tp():
    cfg = tiny(parallel={"tensor_model_parallel_size": 3})            # 4 heads
    rejects(cfg, "parallel.tensor_model_parallel_size", match="num_attention_heads")


def test_ffn_not_divisible_by_tp():
    cfg = tiny(model={"variant": "tiny", "ffn_hidden_size": 258}, parallel={"tensor_model_parallel_size": 4})
    rejects(cfg, "parallel.tensor_model_parallel_size", match="ffn_hidden_size")
    cfg.model.ffn_hidden_size = 260
    C.validate(cfg)


def test_vocab_not_divisible_by_tp():
    cfg = tiny(model={"variant": "tiny", "vocab_size": 510}, parallel={"tensor_model_parallel_size": 4})
    rejects(cfg, "parallel.tensor_model_parallel_size", match="vocab_size")


def test_max_seq_len_not_divisible_under_sequence_parallel():
    par = {"tensor_model_parallel_size": 4}
    data = {"max_seq_len": 510, "pad_to_multiple_of": 1}
    C.validate(tiny(parallel=par, data=data))                           # fine without SP
    rejects(tiny(parallel={**par, "sequence_parallel": True}, data=data), "data.max_seq_len")
    C.validate(tiny(parallel={**par, "sequence_parallel": True}, data={**data, "max_seq_len": 512}))


def test_max_seq_len_alignment_without_sp():
    rejects(tiny(data={"max_seq_len": 500}), "data.max_seq_len")      # default pad_to_multiple_of 8
    assert C.seq_len_multiple(tiny(parallel={"tensor_model_parallel_size": 4, "sequence_parallel": True},
                                   data={"pad_to_multiple_of": 6})) == 12


def test_fp8_alignment(with_te):
    cfg = tiny(model={"variant": "tiny", "transformer_impl": "transformer_engine"},
               precision={"bf16": True, "fp8": "hybrid"},
               parallel={"tensor_model_parallel_size": 2, "sequence_parallel": True})
    assert C.seq_len_multiple(cfg) == 32
    cfg.precision.fp8_recipe = "mxfp8"
    assert C.seq_len_multiple(cfg) == 256
    cfg.model.hidden_size, cfg.model.ffn_hidden_size = 128, 256
    cfg.data.max_seq_len = 1024 + 128
    rejects(cfg, "data.max_seq_len")


@pytest.mark.parametrize("recipe, tp, hidden, ffn, bad", [
    ("blockwise", 1, 128, 256, None), ("blockwise", 2, 128, 256, "model.hidden_size"),
    ("blockwise", 2, 256, 384, "model.ffn_hidden_size"), ("blockwise", 2, 256, 512, None),
    ("mxfp8", 2, 128, 192, None), ("mxfp8", 2, 96, 128, "model.hidden_size"),
    ("tensorwise", 2, 96, 160, None), ("delayed", 4, 104, 100, None)])
def test_fp8_gemm_dims_hold_whole_blocks_per_tp_shard(recipe, tp, hidden, ffn, bad):
    """Emulated recipes need whole scaling blocks in every GEMM dimension of a TP shard (TE refuses the rest; a block
    that straddles shards would make results depend on the layout)."""
    cfg = tiny(model={"hidden_size": hidden, "ffn_hidden_size": ffn, "num_attention_heads": 4},
               precision={"fp8": "e4m3", "fp8_recipe": recipe, "fp8_backend": "emulate"},
               parallel={"tensor_model_parallel_size": tp}, data={"max_seq_len": 1024})
    if bad:
        rejects(cfg, bad, match="whole blocks")
    else:
        C.validate(cfg)


def test_fp8_backend_auto_follows_the_layer_spec(with_te):
    cfg = tiny(precision={"fp8": "hybrid"})
    assert C.fp8_backend(cfg.precision, cfg.model) == "emulate"
    C.validate(cfg)                                               # emulated delayed scaling in fp32: fine
    cfg.model.transformer_impl = "transformer_engine"
    assert C.fp8_backend(cfg.precision, cfg.model) == "te"


@pytest.mark.parametrize("precision, field, match", [
    ({"fp8_backend": "cuda"}, "precision.fp8_backend", "choose one of"),
    ({"fp8": "hybrid", "fp8_recipe": "rowwise", "fp8_backend": "te"}, "precision.fp8_recipe", "does not run on"),
    ({"fp8": "hybrid", "fp8_recipe": "delayed", "fp8_backend": "torchao"}, "precision.fp8_recipe", "tensorwise, rowwise"),
    ({"fp8": "hybrid", "fp8_recipe": "tensorwise", "fp8_backend": "torchao", "fp8_wgrad": False},
     "precision.fp8_wgrad", "rowwise_with_gw_hp"),
    ({"fp8": "hybrid", "fp8_recipe": "delayed", "fp8_power_2_scales": True}, "precision.fp8_power_2_scales",
     "tensorwise"),
    ({"fp8": "hybrid", "fp8_margin": -1}, "precision.fp8_margin", "must be in"),
    ({"fp8": "hybrid", "fp8_recipe": "tensorwise", "first_last_layers_bf16": True, "num_layers_at_start_in_bf16": 2,
      "num_layers_at_end_in_bf16": 2}, "precision.first_last_layers_bf16", "no FP8 layer"),
    ({"fp8": "hybrid", "quant_recipe_file": "q.yaml"}, "precision.quant_recipe_file", "fp8_backend=te"),
    ({"fp8": "hybrid", "fp8_backend": "te"}, "precision.fp8_backend", "transformer_engine"),
    ({"fp8_tp_invariant": True}, "precision.fp8_tp_invariant", "needs precision.fp8"),
    ({"fp8": "hybrid", "fp8_recipe": "tensorwise", "fp8_backend": "torchao", "fp8_tp_invariant": True},
     "precision.fp8_tp_invariant", "emulate option"),
])
def test_fp8_settings_that_cannot_run_fail_at_start(precision, field, match):
    rejects(tiny(precision=precision), field, match=match)


def test_fp8_stats_need_fp8():
    rejects(tiny(logging={"fp8_stats_interval": 10}), "logging.fp8_stats_interval", match="needs precision.fp8")
    rejects(tiny(precision={"fp8": "hybrid"}, logging={"fp8_stats_interval": -1}), "logging.fp8_stats_interval")
    C.validate(tiny(precision={"fp8": "hybrid"}, logging={"fp8_stats_interval": 10}))


def test_fp8_emulated_recipes_that_use_torchao_say_how_to_install_it(monkeypatch):
    has_module = C._has_module
    monkeypatch.setattr(C, "_has_module", lambda name: name != "torchao" and has_module(name))
    rejects(tiny(precision={"fp8": "hybrid", "fp8_recipe": "tensorwise"}), "precision.fp8_backend", match=".[fp8]")
    C.validate(tiny(precision={"fp8": "hybrid", "fp8_recipe": "delayed"}))     # our own code: no torchao needed


def test_fp8_on_te(with_te):
    te = {"variant": "tiny", "transformer_impl": "transformer_engine"}
    cfg = tiny(model=te, precision={"bf16": True, "fp8": "hybrid", "fp8_recipe": "tensorwise"})
    C.validate(cfg)
    cfg.precision.fp8_wgrad = False
    rejects(cfg, "precision.fp8_wgrad", match="silently")
    cfg.precision.fp8_wgrad = True
    cfg.precision.bf16 = False
    rejects(cfg, "precision.bf16")
    cfg.precision.bf16 = True
    cfg.precision.first_last_layers_bf16 = True
    C.validate(cfg)
    cfg.precision.fp8_recipe = "delayed"
    rejects(cfg, "precision.first_last_layers_bf16", match="one autocast")
    cfg = tiny(model=te, precision={"bf16": True, "fp8": "hybrid", "fp8_recipe": "tensorwise",
                                    "first_last_layers_bf16": True, "num_layers_at_end_in_bf16": 2},
               parallel={"pipeline_model_parallel_size": 4})
    rejects(cfg, "precision.num_layers_at_end_in_bf16", match="pipeline stage")


@pytest.mark.parametrize("pp, vpp", [(3, None), (2, 4)])
def test_layers_not_divisible_by_pp_times_vpp(pp, vpp):
    cfg = tiny(parallel={"pipeline_model_parallel_size": pp, "virtual_pipeline_model_parallel_size": vpp})
    rejects(cfg, "model.num_layers")                                     # tiny has 4 layers


def test_layers_divisible_by_pp_times_vpp():
    C.validate(tiny(parallel={"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2}))
    C.validate(C.from_dict({"model": {"variant": "g16"}, "parallel": {"pipeline_model_parallel_size": 4,
                                                                       "virtual_pipeline_model_parallel_size": 5}}))


def test_fp8_without_te(no_te):
    cfg = tiny(precision={"bf16": True, "fp8": "e4m3", "fp8_backend": "te"})   # local spec
    rejects(cfg, "precision.fp8_backend", match="transformer_impl")
    cfg.model.transformer_impl = "transformer_engine"
    msg = str(pytest.raises(C.ConfigError, C.validate, cfg).value)
    assert msg.startswith(("precision.fp8:", "model.transformer_impl:")), msg


def test_fp8_with_te_needs_te_spec_and_bf16(with_te):
    cfg = tiny(precision={"bf16": True, "fp8": "e4m3", "fp8_backend": "te"})
    rejects(cfg, "precision.fp8_backend", match="transformer_engine")
    cfg.model.transformer_impl = "transformer_engine"
    C.validate(cfg)
    cfg.precision.bf16 = False
    rejects(cfg, "precision.bf16")
    rejects(tiny(precision={"fp8_param": True}), "precision.fp8_param")


@pytest.mark.parametrize("model", [{"transformer_impl": "transformer_engine"}, {"attention_backend": "te"}])
def test_te_requested_without_te(no_te, model):
    rejects(tiny(model={"variant": "tiny", **model}), "model.transformer_impl")


def test_sequence_parallel_needs_tp():
    rejects(tiny(parallel={"sequence_parallel": True}), "parallel.sequence_parallel")


def test_global_batch_not_divisible_by_micro_times_dp():
    cfg = tiny(training={"global_batch_size": 6, "micro_batch_size": 1})
    C.validate(cfg)                                                      # no world size: not checked
    C.validate(cfg, world_size=2)
    rejects(cfg, "training.global_batch_size", world_size=4)
    cfg.training.micro_batch_size = 2
    rejects(cfg, "training.global_batch_size", world_size=2)             # 6 % (2 x 2)
    cfg.parallel.tensor_model_parallel_size = 2
    C.validate(cfg, world_size=2)                                        # DP = 1


def test_world_size_not_divisible_by_model_parallel():
    cfg = tiny(parallel={"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2},
               training={"global_batch_size": 2})
    rejects(cfg, "parallel.tensor_model_parallel_size", world_size=6)
    C.validate(cfg, world_size=8)


def test_interleaved_pipeline_needs_microbatches_multiple_of_pp():
    cfg = tiny(parallel={"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2},
               training={"global_batch_size": 3})
    rejects(cfg, "training.global_batch_size", world_size=2, match="interleaved")
    cfg.training.global_batch_size = 4
    C.validate(cfg, world_size=2)


def test_vpp_without_pp():
    rejects(tiny(parallel={"virtual_pipeline_model_parallel_size": 2}),
            "parallel.virtual_pipeline_model_parallel_size")


def test_unknown_variant():
    for build in (lambda: C.model_config("h14"), lambda: C.from_dict({"model": {"variant": "h14"}}),
                  lambda: C.load(overrides=["model.variant=h14"])):
        with pytest.raises(C.ConfigError) as err:
            build()
        assert str(err.value).startswith("model.variant:"), str(err.value)
    cfg = tiny()
    cfg.model.variant = "h14"
    rejects(cfg, "model.variant")


@pytest.mark.parametrize("section, key, value, field", [
    ("model", "hidden_size", 98, "model.hidden_size"),                    # not divisible by 4 heads
    ("model", "mrope_section", [4, 4], "model.mrope_section"),
    ("model", "mrope_section", [4, 5, 5], "model.mrope_section"),         # 3*5 > head_dim/2 = 12
    ("model", "drop_path_rate", 1.0, "model.drop_path_rate"),
    ("model", "transformer_impl", "apex", "model.transformer_impl"),
    ("model", "attention_backend", "sdpa", "model.attention_backend"),
    ("model", "recompute_granularity", "full", "model.recompute_method"),
    ("parallel", "context_parallel_size", 2, "parallel.context_parallel_size"),
    ("parallel", "overlap_param_gather", True, "parallel.overlap_param_gather"),
    ("precision", "fp8", "e5m2", "precision.fp8"),
    ("training", "micro_batch_size", 0, "training.micro_batch_size"),
    ("optimizer", "weight_decay_params", "some", "optimizer.weight_decay_params"),
    ("optimizer", "lr", 0.0, "optimizer.lr"),
    ("optimizer", "lr_warmup_fraction", 1.0, "optimizer.lr_warmup_fraction"),
])
def test_other_rejections_name_their_field(section, key, value, field):
    tree = {"model": {"variant": "tiny"}}
    tree.setdefault(section, {})[key] = value
    rejects(C.from_dict(tree), field)


# The probes of issue 10: each of these validated and then failed later (a traceback, or a silently wrong run).
SHARDS = ["data.sources=/nonexistent/*.tar", "data.tokenizer_path=/nonexistent/tokenizer.model"]


@pytest.mark.parametrize("overrides, field", [
    (["data.image_size=0"], "data.image_size"),
    (["model.patch_size=32", "data.image_size=240"], "data.image_size"),       # a multiple of 16, not of 32
    (["data.max_caption_tokens=0"], "data.max_caption_tokens"),
    (["data.max_sample_len=0"], "data.max_sample_len"),
    (["optimizer.lr_decay_style=bogus"], "optimizer.lr_decay_style"),
    (["optimizer.lr_decay_style=WSD"], "optimizer.lr_decay_style"),              # needs WSD steps we never pass
    (["logging.peak_tflops=-1"], "logging.peak_tflops"),
    (["training.global_batch_size=0"], "training.global_batch_size"),
    (["training.global_batch_size=-4"], "training.global_batch_size"),
    (["training.global_batch_size=6", "training.micro_batch_size=4"], "training.global_batch_size"),
    (["training.exit_interval=-1"], "training.exit_interval"),
    (["training.exit_interval=0"], "training.exit_interval"),
    (["data.skip_window=0"], "data.skip_window"),
    (["training.exit_duration_mins=0"], "training.exit_duration_mins"),
    (["training.exit_duration_mins=-5"], "training.exit_duration_mins"),
    (["training.stop_grace_secs=0"], "training.stop_grace_secs"),
    (["training.eval_interval=-1"], "training.eval_interval"),
    (["training.eval_iters=0"], "training.eval_iters"),
    # found reading the config with a hostile eye
    (["data.min_pixels=300000"], "data.max_pixels"),                               # > max_pixels 262144
    (["data.max_sample_len=2048"], "data.max_sample_len"),                         # longer than a 1024 row
    (["data.pad_to_multiple_of=0"], "data.pad_to_multiple_of"),                    # was a ZeroDivisionError
    (["data.end_text=''"], "data.end_text"),
    (["data.max_aspect_ratio=0.5"], "data.max_aspect_ratio"),
    (["optimizer.min_lr=0.1", "optimizer.lr=0.01"], "optimizer.min_lr"),           # Megatron asserts max >= min
    (["optimizer.lr_warmup_fraction=-0.1"], "optimizer.lr_warmup_fraction"),
    (["optimizer.lr=.inf"], "optimizer.lr"),
    (["optimizer.min_lr=.nan"], "optimizer.min_lr"),
    (["optimizer.weight_decay=-0.1"], "optimizer.weight_decay"),
    (["optimizer.adam_beta2=1.0"], "optimizer.adam_beta2"),
    (["optimizer.adam_eps=0"], "optimizer.adam_eps"),
    (["optimizer.clip_grad=-1"], "optimizer.clip_grad"),
    (["training.keep_last=0"], "training.keep_last"),
    (["training.seed=-1"], "training.seed"),
    (["training.run_dir=''"], "training.run_dir"),
    (["model.rope_theta=0"], "model.rope_theta"),
    (["model.layernorm_epsilon=0"], "model.layernorm_epsilon"),
    (["model.mrope_section=[-1,4,4]"], "model.mrope_section"),
    (["data.valid_sources=/nonexistent/*.tar"], "data.valid_sources"),              # generated data: no held-out
    (["data.sources=/nonexistent/*.tar"], "data.tokenizer_path"),                   # not set: pure, no file looked at
    ([*SHARDS, "data.max_seq_len=192"], "data.max_seq_len"),                        # 196 image tokens of a 224 image
    ([*SHARDS, "data.stage=2", "data.max_sample_len=16"], "data.max_sample_len"),  # the smallest image is 16 patches
])
def test_probe_rejections_name_their_field(overrides, field):
    with pytest.raises(C.ConfigError) as err:
        C.load(overrides=overrides)
    msg = str(err.value)
    assert msg.startswith(field + ":") and "\n" not in msg, msg


@pytest.mark.parametrize("overrides", [
    ["model.patch_size=32"],                                   # 224 is a multiple of 32
    ["model.patch_size=32", "data.stage=2", "data.image_size=256"],
    ["training.exit_interval=null", "training.exit_duration_mins=0.5", "training.eval_interval=0"],
    ["optimizer.lr_decay_style=linear", "optimizer.min_lr=0.001", "optimizer.lr=0.001"],
    [*SHARDS, "data.max_seq_len=200"],                         # 196 image tokens + 1 end token fit
])
def test_probe_neighbours_are_accepted(overrides):
    C.load(overrides=overrides)


def test_validate_touches_no_file(monkeypatch):
    """Shards, tokenizer and checkpoints that do not exist pass validate(): it is pure, the preflight looks."""
    import builtins
    import os

    cfg = tiny(data={"sources": ["/nonexistent/{0..9}.tar"], "tokenizer_path": "/nonexistent/tokenizer.model"},
               training={"load_dir": "/nonexistent/ckpt"})

    touched = []

    def no_io(*args, **kwargs):
        touched.append(args)
        raise OSError("validate() must not touch files")

    with monkeypatch.context() as mp:          # undone before pytest itself needs the filesystem again
        for mod, name in ((os, "stat"), (os, "lstat"), (os, "scandir"), (os, "listdir"), (builtins, "open")):
            mp.setattr(mod, name, no_io)
        try:
            C.validate(cfg, world_size=1)
            cfg.training.load_dir, cfg.training.init_from = None, "/nonexistent/ckpt"
            C.validate(cfg, world_size=1)
        except Exception as e:                 # noqa: BLE001 (reported below, outside the patch)
            touched.append(e)
    assert touched == []


def test_errors_are_value_errors():
    assert issubclass(C.ConfigError, ValueError)


# ------------------------------------------------------------------------------------------------------------------
# Example configs
# ------------------------------------------------------------------------------------------------------------------
def test_examples_exist():
    names = {p.name for p in EXAMPLES}
    expected = {"tiny_cpu.yaml"} | {f"{v}_stage{s}.yaml" for v in ("l16", "so16", "g16") for s in (1, 2)}
    assert expected <= names, sorted(expected - names)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_parses_and_documents_itself(path):
    text = path.read_text()
    assert text.startswith("#"), f"{path.name}: first line should be a comment saying what the file is"
    cfg = C.from_dict(yaml.safe_load(text))                              # every field exists, every type is right
    assert cfg.model.variant in C.VARIANTS


@pytest.mark.parametrize("path", [p for p in EXAMPLES if "sources:" in p.read_text()], ids=lambda p: p.name)
def test_example_shard_patterns_expand_as_intended(path, tmp_path):
    """Each pattern, moved under tmp_path, finds exactly the files it names: brace ranges expand to plain names
    (a doubled `{{a..b}}` leaves literal braces and can never match), globs reach into subfolders."""
    from braceexpand import braceexpand

    sources = yaml.safe_load(path.read_text())["data"]["sources"]
    assert sources, path.name
    for pattern in sources:
        assert pattern.startswith("/data/"), pattern
        moved = str(tmp_path) + pattern[len("/data"):]
        if "{" in pattern:
            names = list(braceexpand(moved))
            assert not any(c in n for n in names for c in "{}"), f"{path.name}: {pattern} leaves braces"
            assert len(names) == 100_000 and names[0].endswith("/000000.tar") and names[-1].endswith("/099999.tar")
            want = [names[0], names[4321], names[-1]]
        else:
            want = [str(tmp_path / "navit-mix" / "a.tar"), str(tmp_path / "navit-mix" / "sub" / "deeper" / "b.tar")]
        for f in want:
            Path(f).parent.mkdir(parents=True, exist_ok=True)
            Path(f).write_bytes(b"")
        assert expand_shards(moved) == sorted(want), f"{path.name}: {pattern}"


def test_tiny_cpu_loads():
    path = REPO / "examples" / "configs" / "tiny_cpu.yaml"
    cfg = C.load(path, world_size=1)
    assert cfg.model.variant == "tiny" and cfg.model.transformer_impl == "local"
    assert cfg.precision.bf16 is False and cfg.precision.fp8 is None
    assert cfg.data.max_seq_len == 512
    assert cfg.training.micro_batch_size == 1 and cfg.training.global_batch_size % 4 == 0
    assert isinstance(cfg.optimizer.lr, float) and cfg.optimizer.lr > 0       # "3.0e-3" parsed as a number
    for world in (2, 4):                                                 # also fine under 2-4 rank DP
        C.load(path, world_size=world)


@pytest.mark.parametrize("path", TE_EXAMPLES, ids=lambda p: p.name)
def test_te_example_fails_validation_without_te(no_te, path):
    with pytest.raises(C.ConfigError) as err:
        C.load(path)
    assert str(err.value).startswith("model.transformer_impl:"), str(err.value)


@pytest.mark.parametrize("path", TE_EXAMPLES, ids=lambda p: p.name)
def test_te_example_is_the_reference_recipe(with_te, path, tmp_path):
    """Spec §7, and valid as a whole on a TE machine at its intended scale (DP 32), once pointed at real data."""
    variant, stage = path.stem.split("_stage")
    cfg = C.from_dict(yaml.safe_load(path.read_text()))
    assert cfg.model.variant == variant
    assert cfg.model.transformer_impl == "transformer_engine" and cfg.model.attention_backend == "te"
    assert cfg.precision.bf16 is True
    assert cfg.optimizer.lr == pytest.approx({"1": 1e-3, "2": 1e-4}[stage])
    assert cfg.optimizer.min_lr == pytest.approx(1e-6)
    assert (cfg.optimizer.adam_beta1, cfg.optimizer.adam_beta2, cfg.optimizer.adam_eps) == (0.9, 0.95, 1e-8)
    assert (cfg.optimizer.weight_decay, cfg.optimizer.weight_decay_params) == (0.01, "all")
    assert (cfg.optimizer.clip_grad, cfg.optimizer.lr_warmup_fraction) == (1.0, 0.007)
    assert cfg.optimizer.lr_decay_style == "cosine"
    assert cfg.data.max_seq_len == 16384 and cfg.training.micro_batch_size == 16
    assert cfg.training.seed == 42
    assert cfg.data.stage == int(stage) and cfg.data.tokenizer_kind == "hf"
    assert cfg.data.decoder == "dali" and cfg.data.dali_device == "mixed"
    model_parallel = cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size
    C.validate(cfg, world_size=32 * model_parallel)          # pure: whether /data exists is the preflight's question
    with pytest.raises(C.ConfigError, match=r"^data.sources\[0\]: .* matches no file"):
        preflight.check_sources(cfg.data)
    (tmp_path / "000.tar").write_bytes(b"")
    cfg.data.sources = [str(tmp_path / "*.tar")]
    assert preflight.check_sources(cfg.data) == {"sources": 1, "valid_sources": 0}
