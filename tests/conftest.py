"""Shared fixtures. Unit tests that build Megatron modules run in a one-process gloo world (TP=PP=1)."""

import socket

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _reset_cli_logging():
    """Tests that call an entry point's main() in-process leave its console handlers behind; remove them, or the
    next test's captured stdout receives log lines."""
    yield
    from genlip_mcore import logs

    logs.reset()


@pytest.fixture(scope="session")
def mcore_world():
    """A single-rank process group with the CPU backend active (or NCCL on a GPU machine), on a free port that is
    not exported: subprocesses of later tests must not inherit a port this process listens on."""
    from genlip_mcore.parallel import init_distributed

    init_distributed()
    return True


@pytest.fixture
def tp1(mcore_world):
    """Megatron parallel state for TP=PP=1; yields a function that builds a one-chunk tiny-like model."""
    from genlip_mcore import config as C
    from genlip_mcore.model import build_model_chunks
    from genlip_mcore.parallel import setup_model_parallel

    setup_model_parallel(C.ParallelConfig(), seed=1234)

    def build(cfg=None, **model_overrides):
        cfg = cfg or C.Config(model=C.model_config("tiny", **model_overrides))
        C.validate(cfg, world_size=1)
        return build_model_chunks(cfg)[0], cfg

    return build
