"""What the HF conversion worker and its test share: the training overrides, the layout, and the test pack."""

import torch

# tiny GenLIP on the generated packs, a few steps, fp32, drop path on (training only; the forward is eval)
TRAIN = ["model.variant=tiny", "model.drop_path_rate=0.1", "data.max_seq_len=128", "training.train_iters=3",
         "training.global_batch_size=4", "training.micro_batch_size=1", "optimizer.lr=2e-3",
         "optimizer.lr_warmup_fraction=0.2"]
LAYOUT = ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"]
SAMPLES = [(2, 3, 5), (3, 2, 9), (4, 4, 6), (1, 5, 4)]      # (grid h, grid w, text tokens)
PAD_TO = 80


def conversion_pack(model_cfg):
    """One packed row (with trailing padding) of SAMPLES, and the per-sample rows it is made of (for batches)."""
    from tests.packs import ref_config
    from tests.reference.genlip_ref import make_packed_row

    row = make_packed_row(ref_config(model_cfg), SAMPLES, pad_to=PAD_TO, generator=torch.Generator().manual_seed(7))
    sids, img = row["sample_ids"], row["image_mask"]
    singles, first_patch = [], 0
    for s, (gh, gw, _) in enumerate(SAMPLES):
        at = sids == s
        n_patches = gh * gw
        singles.append({"input_ids": row["input_ids"][at], "image_mask": img[at], "labels": row["labels"][at],
                        "position_ids": row["position_ids"][:, at],
                        "pixel_patches": row["pixel_patches"][first_patch:first_patch + n_patches],
                        "positions": torch.nonzero(at).flatten()})
        first_patch += n_patches
    return row, singles
