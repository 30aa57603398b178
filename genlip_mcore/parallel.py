"""Process groups: torch.distributed from the torchrun/slurm environment, then Megatron's parallel state.

NCCL on GPUs, gloo (with the CPU backend) otherwise. Layouts can be re-initialised inside one process (tests run
several layouts per launch): `setup_model_parallel` tears down the previous Megatron groups first.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from genlip_mcore import cpu_backend
from genlip_mcore.config import ParallelConfig


def init_distributed(timeout_minutes: int = 30) -> tuple[int, int]:
    """Start the default process group (idempotent). Returns (rank, world_size)."""
    if not dist.is_initialized():
        # srun without torchrun: map slurm's variables onto the ones torch reads.
        if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:
            os.environ["RANK"] = os.environ["SLURM_PROCID"]
            os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
            os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        init_method = None                                          # env://
        if "MASTER_PORT" not in os.environ:
            if os.environ["WORLD_SIZE"] == "1":
                # One process on its own: any free port, so concurrent single-process jobs never collide. Not
                # exported: this process keeps listening on it, and a child that inherited it would fail to bind.
                init_method = f"tcp://{os.environ['MASTER_ADDR']}:{_free_port()}"
            else:
                os.environ["MASTER_PORT"] = "29500"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            backend = "nccl"
        else:
            cpu_backend.activate()
            backend = "gloo"
        dist.init_process_group(backend, init_method=init_method, timeout=datetime.timedelta(minutes=timeout_minutes),
                                **({} if init_method is None else {"rank": 0, "world_size": 1}))
    return dist.get_rank(), dist.get_world_size()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_model_parallel(p: ParallelConfig, seed: int) -> None:
    """Megatron groups for this layout, and the TP-aware RNG tracker seeded from `seed`."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        context_parallel_size=p.context_parallel_size,
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def data_parallel_info() -> tuple[int, int]:
    return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
