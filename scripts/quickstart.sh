#!/usr/bin/env bash
# Quickstart, the README's main command. On a fresh machine it:
#   1. sets up .venv (first run only),
#   2. generates the shapes dataset (coloured shapes + captions, with a held-out split) and trains a tokenizer,
#   3. trains the tiny GenLIP on CPU (examples/configs/quickstart.yaml) and saves a checkpoint,
#   4. captions the held-out images greedily and prints them next to the true captions, with the exact-match rate,
#   5. exports the checkpoint to the HuggingFace layout and checks that the export captions them identically,
#   6. sums up: held-out loss (measured during training) beside the exact-match rate, and the training loss against
#      the loss floor of a model blind to the image.
# Extra arguments go to genlip-pretrain, e.g. `bash scripts/quickstart.sh training.train_iters=50`.
# Environment: GENLIP_QUICKSTART_DATA (default data/quickstart), GENLIP_QUICKSTART_RUN (default runs/quickstart),
# GENLIP_QUICKSTART_SAMPLES (training images generated, default 6000).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
BIN=.venv/bin
DATA="${GENLIP_QUICKSTART_DATA:-data/quickstart}"
RUN="${GENLIP_QUICKSTART_RUN:-runs/quickstart}"

if ! grep -qs '"square": true' "$DATA/shapes/manifest.json"; then       # missing, or made by an older quickstart
    rm -rf "$DATA/shapes" "$DATA/tok"
    echo "[quickstart] generating the shapes dataset in $DATA/shapes"
    # square images up to 192 px: stage 1 resizes to 96x96 anyway, and small sources decode fast
    "$BIN/genlip-data" make-shapes --out "$DATA/shapes" --samples "${GENLIP_QUICKSTART_SAMPLES:-6000}" --shards 8 \
        --seed 0 --max-side 192 --square > /dev/null
fi
if [[ ! -f "$DATA/tok/tokenizer.model" ]]; then
    echo "[quickstart] training a SentencePiece tokenizer on the captions"
    "$BIN/genlip-data" train-tokenizer --shards "$DATA/shapes/train/*.tar" --out "$DATA/tok" --vocab-size 500
fi

DATA_ARGS=("data.sources=$DATA/shapes/train/*.tar" "data.valid_sources=$DATA/shapes/heldout/*.tar"
           "data.tokenizer_path=$DATA/tok/tokenizer.model" "training.run_dir=$RUN")
echo "[quickstart] training: $BIN/genlip-pretrain --config examples/configs/quickstart.yaml $*"
"$BIN/genlip-pretrain" --config examples/configs/quickstart.yaml "${DATA_ARGS[@]}" "$@"

echo "[quickstart] greedy captions of the held-out images (checkpoint $RUN/checkpoints):"
"$BIN/genlip-caption" --checkpoint "$RUN/checkpoints" --shards "$DATA/shapes/heldout/*.tar" \
    --max-new-tokens 16 --batch-size 32 | tee "$RUN/captions_checkpoint.txt"

echo "[quickstart] exporting to the HuggingFace layout ($RUN/hf) and captioning again from the export"
"$BIN/genlip-convert" to-hf --checkpoint "$RUN/checkpoints" --out "$RUN/hf" --dtype fp32 --overwrite > /dev/null
"$BIN/genlip-caption" --hf "$RUN/hf" --shards "$DATA/shapes/heldout/*.tar" \
    --max-new-tokens 16 --batch-size 32 > "$RUN/captions_hf.txt"
if cmp -s "$RUN/captions_checkpoint.txt" "$RUN/captions_hf.txt"; then
    echo "[quickstart] captions from the HF export are identical to the checkpoint's" \
         "($(grep -c $'\t' "$RUN/captions_hf.txt") images)"
else
    echo "[quickstart] captions from the HF export DIFFER from the checkpoint's:" >&2
    diff "$RUN/captions_checkpoint.txt" "$RUN/captions_hf.txt" | head -20 >&2
    exit 1
fi
"$BIN/genlip-data" shapes-summary --config examples/configs/quickstart.yaml --captions "$RUN/captions_checkpoint.txt" \
    "${DATA_ARGS[@]}" "$@" | sed 's/^/[quickstart] /'
