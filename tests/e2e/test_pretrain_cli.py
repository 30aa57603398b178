"""The main job, end to end: `python -m genlip_mcore.train` on the tiny config, as the quickstart runs it, and the
start-up failures a user meets first: each is rc 2 and one line on stderr naming the field or file, before any step."""

import re
import subprocess
import sys
import tempfile

import pytest

from tests.distributed.launch import REPO

TINY = "examples/configs/tiny_cpu.yaml"


def _run(*overrides, config=TINY, timeout=600):
    run_dir = tempfile.mkdtemp(prefix="genlip-e2e-")
    cmd = [sys.executable, "-m", "genlip_mcore.train", "--config", str(config), f"training.run_dir={run_dir}",
           *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _one_line_error(proc, field):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"genlip-pretrain: config error: {field}:"), lines[0]
    assert "iteration" not in proc.stdout
    return lines[0]


def test_tiny_run_learns_to_look_at_the_image():
    from genlip_mcore.data.synthetic import blind_floor, make_row

    proc = _run()
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"lm loss: ([-\d.E+e]+)", proc.stdout)]
    assert len(re.findall(r"iteration +\d+/ *200 \|", proc.stdout)) == 200 and len(losses) == 200
    # the colour prior: what a model blind to the image reaches on these rows (tiny_cpu: seed 42, rows of 512)
    rows = [make_row(i, seed=42, max_seq_len=512, patch_dim=768) for i in range(64)]
    floor = sum(blind_floor(r) for r in rows) / len(rows)
    assert losses[-1] < floor - 0.2, f"final loss {losses[-1]} is not clearly below the blind floor {floor}"
    assert "blind" not in proc.stdout                  # the toy-data report belongs to the quickstart
    assert f"done: loss {losses[0]:.4f} -> {losses[-1]:.4f} over 200 iterations" in proc.stdout


def test_wrong_config_fails_before_any_work_naming_the_field():
    _one_line_error(_run("parallel.tensor_model_parallel_size=3", timeout=120), "parallel.tensor_model_parallel_size")


def test_config_errors_come_before_torch_is_imported(tmp_path):
    """A typo costs the time of reading YAML, not of importing torch and Megatron."""
    code = ("import sys; from genlip_mcore.train.__main__ import main; "
            f"rc = main(['--config', {TINY!r}, 'data.image_size=0', 'training.run_dir={tmp_path}/run']); "
            "print('torch imported:', 'torch' in sys.modules); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    _one_line_error(proc, "data.image_size")
    assert "torch imported: False" in proc.stdout
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name, content, problem", [
    ("missing.yaml", None, "no such config file"),
    ("syntax.yaml", "model:\n  variant: tiny\n bad: [1\n", "YAML syntax error"),
    ("list.yaml", "- model\n", "top level must be a mapping"),
])
def test_unreadable_config_file(tmp_path, name, content, problem):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    line = _one_line_error(_run(config=path, timeout=120), str(path))
    assert problem in line


def test_unwritable_save_dir_fails_before_the_first_step(tmp_path):
    """Found in preflight, not at the first save after all the training (a path under a file: even root fails)."""
    (tmp_path / "file").write_text("x")
    line = _one_line_error(_run(f"training.save_dir={tmp_path}/file/ckpt", timeout=120), "training.save_dir")
    assert f"{tmp_path}/file/ckpt" in line


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Four shards of generated shapes and a tokenizer trained on their captions."""
    from genlip_mcore.data.shapes import make_shapes

    root = tmp_path_factory.mktemp("shapes")
    make_shapes(root, samples=300, shards=4, seed=1, heldout=16)
    subprocess.run([sys.executable, "-m", "genlip_mcore.data", "train-tokenizer", "--shards",
                    str(root / "train" / "*.tar"), "--out", str(root / "tok"), "--vocab-size", "400"],
                   check=True, capture_output=True, cwd=REPO, timeout=600)
    return root


def test_trains_on_webdataset_shards_and_checks_the_vocabulary(shapes):
    data = [f"data.sources={shapes}/train/*.tar", f"data.tokenizer_path={shapes}/tok/tokenizer.model"]
    proc = _run(*data, "training.train_iters=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"lm loss: ([-\d.E+e]+)", proc.stdout)]
    assert len(losses) == 8 and losses[-1] < losses[0]
    small = _run(*data, "model.vocab_size=256", timeout=120)
    assert "is smaller than the tokenizer's" in _one_line_error(small, "model.vocab_size")


def test_tokenizer_that_is_not_a_tokenizer(shapes, tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a sentencepiece model\n")
    proc = _run(f"data.sources={shapes}/train/*.tar", f"data.tokenizer_path={bad}", timeout=120)
    assert "is not a sentencepiece tokenizer" in _one_line_error(proc, "data.tokenizer_path")


def test_partly_missing_brace_shards(shapes):
    """shapes-00004 and -00005 do not exist: a failure naming them, or with allow_missing_shards a warning with the
    count and a run on the four that do."""
    pattern = f"{shapes}/train/shapes-{{00000..00005}}.tar"
    data = [f"data.sources={pattern}", f"data.tokenizer_path={shapes}/tok/tokenizer.model"]
    line = _one_line_error(_run(*data, timeout=120), "data.sources[0]")
    assert f"2 of 6 shards of '{pattern}' are missing: {shapes}/train/shapes-00004.tar, " \
           f"{shapes}/train/shapes-00005.tar" in line
    proc = _run(*data, "data.allow_missing_shards=true", "training.train_iters=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "data.sources[0]: 2 of 6 shards" in out and "going on without them" in out
    assert len(re.findall(r"lm loss: ", proc.stdout)) == 2
