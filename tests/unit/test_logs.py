"""genlip_mcore.logs: our lines and real warnings reach the console; megatron-core's chatter reaches only the log
file, relabelled DEBUG, including what was logged before the file was attached. Run in a subprocess: the logging
and warnings setup is process-wide, and pytest has its own."""

import os
import subprocess
import sys
import textwrap

from tests.distributed.launch import REPO

SCRIPT = textwrap.dedent("""
    import logging, sys, warnings
    from genlip_mcore import logs

    logs.setup()
    warnings.simplefilter("default")
    logging.getLogger("megatron.core.distributed.param_and_grad_buffer").info("Params for bucket 1 (10 elements)")
    warnings.warn("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.", UserWarning)
    logging.getLogger("genlip_mcore.train").info("ours before the file")
    logs.attach_file(sys.argv[1])
    logging.getLogger("megatron.core.optimizer").warning("a real megatron warning")
    warnings.warn("something the user must see", UserWarning)
    logging.getLogger("genlip_mcore.train").info("ours after the file")
    logging.getLogger("megatron.core").debug("below the level: nowhere")
""")


def run(tmp_path, **env):
    import os

    log = tmp_path / "logs" / "rank0.log"
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, **env}, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout, log.read_text()


def test_console_shows_ours_and_real_warnings_and_the_file_keeps_everything(tmp_path):
    console, file = run(tmp_path)
    assert "ours before the file" in console and "ours after the file" in console
    assert "a real megatron warning" in console and "something the user must see" in console
    assert "Params for bucket" not in console and "not installed" not in console
    assert len(console.strip().splitlines()) == 5          # 4 records; the real warning carries its source line
    lines = file.splitlines()
    bucket = next(line for line in lines if "Params for bucket" in line)
    te = next(line for line in lines if "not installed" in line)
    assert " DEBUG megatron.core.distributed.param_and_grad_buffer: " in bucket and " DEBUG py.warnings: " in te
    assert any(" INFO genlip_mcore.train: ours before the file" in line for line in lines)
    assert any(" WARNING megatron.core.optimizer: a real megatron warning" in line for line in lines)
    assert any(" WARNING py.warnings: " in line and "something the user must see" in line for line in lines)
    assert "below the level" not in file + console


def test_chatter_can_be_shown_on_the_console(tmp_path):
    console, _ = run(tmp_path, GENLIP_LOG_CHATTER="1")
    assert "Params for bucket" in console and "not installed" in console


TORCHAO_SCRIPT = """
import sys
from genlip_mcore import logs
import torchao  # noqa: F401  (transformers imports it whenever it is installed, often before logs.setup())
logs.setup()
import logging
logging.getLogger("torchao").warning("a real torchao warning")
"""


def test_torchao_import_notices_stay_off_the_console(tmp_path):
    """torchao's CUDA kernels do not load on a CPU machine, and torch's pytree announces each enum torchao registers:
    neither is news to a user, even when torchao is imported before logging is set up. A real torchao warning still
    shows, and GENLIP_LOG_CHATTER=1 shows the notices."""
    def output(**env):
        res = subprocess.run([sys.executable, "-c", TORCHAO_SCRIPT], capture_output=True, text=True, cwd=REPO,
                             env={**os.environ, **env}, timeout=120)
        assert res.returncode == 0, res.stderr
        return res.stdout + res.stderr

    out = output()
    assert "Failed to load" not in out and "is an Enum subclass" not in out, out
    assert "a real torchao warning" in out
    assert "is an Enum subclass" in output(GENLIP_LOG_CHATTER="1")
