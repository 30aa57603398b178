import subprocess
import sys

import pytest

from tests.distributed.launch import REPO


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory):
    """Overrides that point a run at small generated shapes shards and a tokenizer trained on them."""
    from genlip_mcore.data.shapes import make_shapes

    root = tmp_path_factory.mktemp("shapes_data")
    make_shapes(root, samples=400, shards=4, seed=1, heldout=16)
    subprocess.run([sys.executable, "-m", "genlip_mcore.data", "train-tokenizer", "--shards",
                    str(root / "train" / "*.tar"), "--out", str(root / "tok"), "--vocab-size", "400"],
                   check=True, capture_output=True, cwd=REPO)
    return [f"data.sources={root}/train/*.tar", f"data.tokenizer_path={root}/tok/tokenizer.model"]
