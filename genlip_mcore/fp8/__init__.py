"""`genlip-fp8`: FP8 scaling experiments, from one sweep file to a report.

A sweep is model sizes x precisions x seeds (`sweep`). `plan` expands and validates every cell before anything
runs; `run` launches `genlip-pretrain` once per cell, locally or on slurm, and skips finished cells (`run`);
`report` reads only the run directories and judges each FP8 cell's loss gap against the baseline's seed noise
(`report`, `plots`); `bench` times BF16 against FP8 GEMMs on the model's own shapes (`bench`).

Nothing here is imported by the trainer: the tool drives it through its command line, like a user would.
"""
