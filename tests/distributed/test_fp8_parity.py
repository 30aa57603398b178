"""Emulated FP8 training under TP=2 + SP and PP=2 against TP=1, from one TP=1 checkpoint (a 1-rank and a 2-rank
launch).

TP-invariant mode (precision.fp8_tp_invariant; blockwise and MXFP8, gradient clipping active, against a DP=1 TP=1
run): TP=2 + SP and PP=2 train freely for 5 steps and give TP=1's loss exactly (0 difference at every step,
measured) and its grad norm to <= 4e-16. Every sum that TP splits, and the grad norm that sets the clip factor, is
formed in float64 and rounded once (model/fp8/invariant.py), and micro-batch gradients accumulate in the same order
as at DP=1, so the weights stay identical step after step. Against the DP=2 TP=1 run they drift (~5e-6 by step 4:
DP changes the order in which micro-batch gradients are added). Measured before the float64 grad norm: with fp32's
clip factor the layouts drifted to 1e-4 on the grad norm by step 3; without clipping they stayed at 5.6e-7.

Default mode (fp32 accumulation, as TE). What agrees and how closely (measured on 2 CPU cores, gloo; relative
differences):
  * Step 0 (identical weights): block recipes (blockwise 1x128/128x128, MXFP8 1x32) and power-of-two tensorwise
    scaling give the TP=1 loss and grad norm to <= 2e-7: no scaling block straddles a TP shard, and a power-of-two
    rescale does not move a value's rounding. Tensorwise with fp32 scales (TE's default) differs, 4.7e-5 on the loss
    and 4.9e-4 on the grad norm: TP shards of a weight get their own scales, as in TE.
  * "Forced" runs take each of the 5 steps from the weights the TP=1 run had at that step (it saves them before
    every step). PP=2 then equals TP=1 to <= 1e-7 on loss and grad norm at every step. TP=2 + SP gives the loss to
    <= 2e-8 at every step, and the grad norm to <= 8.7e-6 (MXFP8), 3.9e-6 (blockwise), 4.3e-7 (power-of-two
    tensorwise): TP splits the contractions of the row-parallel GEMMs and the vocabulary softmax, so activations
    and gradients differ from TP=1 by fp32 summation order (~1e-7), and the rare element among ~10^6 per step that
    sits at an FP8 rounding boundary then rounds the other way, a whole FP8 step (6-12% of its value). No exact
    emulation can avoid that; the bound below is 2e-5.
  * Left to run freely the layouts drift apart: the updated weights differ by summation order as in fp32 training
    (test_parallel_parity.py; here also DP=2 at TP=1 against DP=1), and FP8 turns the differences that cross a
    rounding boundary into whole FP8 steps. Observed over steps 1-4: loss <= 3.2e-5, grad norm <= 4.7e-4 (PP=2,
    blockwise). Free-running FP8 runs are reproducible per layout, not bitwise across layouts.
  * Delayed scaling: TP=2 + SP and PP=2 (both DP=1) give the same step-0 loss (amaxes reduced over TP), but not
    the same gradients: PP's 1F1B schedule runs micro-batch k+1's forward before micro-batch k's backward, so the
    gradient scales are updated at different times (5e-4 on the step-0 grad norm). Not asserted beyond the loss.
"""

import json

import pytest

from tests.distributed.launch import torchrun

pytestmark = pytest.mark.distributed
SAME_WEIGHTS = 1e-6                              # identical weights, layout-independent recipes
TP_FLIPS = 2e-5                                  # TP's grad norm from identical weights: rare FP8 rounding flips
DRIFT = {"loss": 2e-4, "grad_norm": 5e-3}        # steps 1-4: FP8 rounding flips seeded by fp32 summation order


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp8_parity")
    torchrun("fp8_parity_worker.py", 1, str(d / "dp1.json"), str(d / "ckpt"), timeout=300)    # saves the checkpoint
    torchrun("fp8_parity_worker.py", 2, str(d / "out.json"), str(d / "ckpt"), timeout=600)
    return {**json.loads((d / "dp1.json").read_text()), **json.loads((d / "out.json").read_text())}


def _rel(run, base, key):
    return [abs(a - b) / abs(b) for a, b in zip(run[key], base[key], strict=True)]


@pytest.mark.parametrize("run", ["blockwise_tpinv/tp2_sp", "blockwise_tpinv/pp2", "mxfp8_tpinv/tp2_sp",
                                 "mxfp8_tpinv/pp2"])
def test_tp_invariant_mode_trains_like_tp1_for_5_steps(results, run):
    """The issue's bound: 5 free-running steps, loss and grad norm within 1e-6 of TP=PP=1 at every step."""
    got, base = results[run], results[f"{run.split('/')[0]}/tp1"]
    assert len(got["loss"]) == len(base["loss"]) == 5
    for key in ("loss", "grad_norm"):
        assert max(_rel(got, base, key)) <= SAME_WEIGHTS, f"{run} {key}: {_rel(got, base, key)}"


def test_tp_invariant_mode_keeps_fp8_numerics(results):
    """float64 sums change a step's loss only by fp32 roundings: the first step equals the default mode's to 1e-6
    (the DP=2 default run sees the same weights and data at step 0)."""
    for recipe in ("blockwise", "mxfp8"):
        assert _rel(results[f"{recipe}_tpinv/tp1"], results[f"{recipe}/tp1"], "loss")[0] <= SAME_WEIGHTS


@pytest.mark.parametrize("run", ["blockwise/tp2_sp", "blockwise/pp2", "mxfp8/tp2_sp", "mxfp8/pp2",
                                 "tensorwise_pow2/tp2_sp"])
def test_layout_independent_recipes_match_tp1(results, run):
    recipe = run.split("/")[0]
    got, base = results[run], results[f"{recipe}/tp1"]
    assert len(got["loss"]) == 5
    for key in ("loss", "grad_norm"):
        rel = _rel(got, base, key)
        assert rel[0] <= SAME_WEIGHTS, f"{run} {key} step 0: {rel[0]:.2e}"
        assert max(rel) <= DRIFT[key], f"{run} {key}: {rel}"


@pytest.mark.parametrize("run", ["blockwise/tp2_sp@forced", "blockwise/pp2@forced", "mxfp8/tp2_sp@forced",
                                 "mxfp8/pp2@forced", "tensorwise_pow2/tp2_sp@forced"])
def test_every_step_from_the_same_weights_matches_tp1(results, run):
    """5 training steps, each from the TP=1 run's weights at that step: the loss to 1e-6, and the grad norm to 1e-6
    under PP (no contraction is split) and to 2e-5 under TP (see the module docstring)."""
    recipe = run.split("/")[0]
    got, base = results[run], results[f"{recipe}/tp1"]
    assert len(got["loss"]) == 5
    assert max(_rel(got, base, "loss")) <= SAME_WEIGHTS, _rel(got, base, "loss")
    bound = TP_FLIPS if "tp2" in run else SAME_WEIGHTS
    assert max(_rel(got, base, "grad_norm")) <= bound, _rel(got, base, "grad_norm")


def test_tensorwise_fp32_scales_depend_on_the_tp_layout(results):
    rel = _rel(results["tensorwise/tp2_sp"], results["tensorwise/tp1"], "loss")
    assert rel[0] > 10 * SAME_WEIGHTS, rel
    assert _rel(results["tensorwise/tp2_sp"], results["tensorwise/tp1"], "grad_norm")[0] > 1e-4


def test_delayed_scales_agree_across_tp(results):
    assert _rel(results["delayed/tp2_sp"], results["delayed/pp2"], "loss")[0] <= SAME_WEIGHTS


def test_fp8_training_moves(results):
    assert len(results) == 23
    for name, r in results.items():
        assert r["loss"][-1] < r["loss"][0] - 0.3, name
