"""The GPU check: everything this project claims for GPUs, measured in one run of a few minutes, in one report.

A GPU is lent to us rarely and briefly, so the check is prepared ahead and runs unattended:
`bash scripts/gpu_check.sh --out DIR` (tools/gpu_check.py) on the bare device, `--smoke` on CPU in CI so the script
cannot rot between GPU runs. Stages, each in its own process under its own time budget (harness.py):

- correctness: `pytest -m gpu tests/gpu` but the FP8 tests, one record per test (stages.py);
- attention: `local` and `flex` forward+backward against `local` in fp32 on stage-1-like and stage-2-like rows of
  16384 tokens, and their speed (stages.py, rows from packs.py);
- throughput: l16, so16, g16 at full depth on one GPU in bf16, one packed row per step: ms/step, tokens/s,
  samples/s, TFLOP/s and MFU by our FLOP count, peak memory, and the share of attention, GEMMs and the optimizer in
  the step (profile.py); `flex` against `local` (tools/gpu_check.py: it runs the training step);
- loader: the Pillow path on 8 and 16 workers, 224 px and NaViT, against what one GPU consumes (stages.py);
- fp8: `pytest -m gpu tests/gpu/test_gpu_fp8_*.py` (the emulator against hardware FP8 GEMMs, short FP8 training
  runs; TE ones skip on the lent machine, which has no TE) and `python -m genlip_mcore.fp8 bench --variant l16 so16
  g16` (BF16 against FP8 GEMMs on the model's own shapes), its figures recorded (stages.py). Either part is skipped
  with the reason where the tree lacks it.

Results: DIR/gpu_report.json (everything) and DIR/gpu_report.md (report.py), rewritten after every stage.
"""
