"""GenLIP on Megatron-Core: build the model chunks of this rank for a config."""

from __future__ import annotations

from megatron.core import parallel_state
from megatron.core.tensor_parallel import set_defaults_if_not_set_tensor_model_parallel_attributes

from genlip_mcore.config import Config
from genlip_mcore.model.attention import GenLIPPackedSeqParams, build_packed_params
from genlip_mcore.model.genlip import GenLIPModel
from genlip_mcore.model.init import initialize_weights
from genlip_mcore.model.spec import GenLIPTransformerConfig, transformer_config

__all__ = ["GenLIPModel", "GenLIPPackedSeqParams", "GenLIPTransformerConfig", "build_model_chunks",
           "build_packed_params", "initialize_weights", "transformer_config"]


def build_model_chunks(cfg: Config, *, initialize: bool = True) -> list[GenLIPModel]:
    """One GenLIPModel per virtual pipeline stage of this rank (one without VPP), initialised per spec §5."""
    tconf = transformer_config(cfg)
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    pp_first = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    pp_last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    chunks = []
    for vp_stage in range(vpp or 1):
        pre = pp_first and vp_stage == 0
        post = pp_last and vp_stage == (vpp or 1) - 1
        model = GenLIPModel(tconf, cfg.model, pre_process=pre, post_process=post,
                            vp_stage=vp_stage if vpp else None, seed=cfg.training.seed)
        for p in model.parameters():
            set_defaults_if_not_set_tensor_model_parallel_attributes(p)
        if initialize:
            initialize_weights(model, cfg.model, cfg.training.seed)
        if tconf.genlip_fp8_linears:                    # FP8 GEMMs in our own linears (emulate / torchao)
            from genlip_mcore.model.fp8.attach import attach_fp8

            attach_fp8(model, cfg, tconf.genlip_fp8_linears)
        chunks.append(model)
    return chunks
