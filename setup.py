"""Packaging for genlip_mcore. Install with the pins of constraints.txt, e.g.

    pip install -c constraints.txt -e ".[dev]"      # CPU development and CI
    pip install -c constraints.txt -e ".[gpu]"      # on a CUDA image that already has a CUDA torch

Without the constraints file pip may resolve `torch` to a CUDA build (several GB) on a CPU machine.
"""

from setuptools import find_packages, setup

setup(
    name="genlip_mcore",
    version="0.1.0",
    description="GenLIP vision-language pretraining on Megatron-Core",
    packages=find_packages(include=["genlip_mcore", "genlip_mcore.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        # 0.16.1 is what CI runs (the newest release for Python 3.11); the model uses public mcore APIs that exist
        # across this range. cpu_backend touches private names and is only exercised with the CI pin.
        "megatron-core>=0.16.1,<0.20",
        "psutil",  # undeclared runtime dependency of megatron.core.dist_checkpointing
        "numpy",
        "pyyaml",
        "pillow",
        "tqdm",
        "webdataset>=1.0",      # shard patterns (braceexpand) and shard writing
        "sentencepiece>=0.2",   # self-contained tokenizers trained on the captions
        "tokenizers>=0.19",     # HF tokenizer.json (the released Qwen3 vocabulary)
    ],
    extras_require={
        "dev": ["pytest", "pytest-timeout", "ruff"],
        # DALI runs its CPU operators without a GPU, so CI tests the DALI path too (about 1 GB installed).
        "dali": ["nvidia-dali-cuda120"],
        # metrics sinks, imported only when enabled in the config (logging.tensorboard / logging.wandb_mode)
        "logging": ["tensorboard", "wandb"],
        # HF export and AutoModel loading of exported checkpoints
        # tested: 4.53 (the reference's pin; CI runs tests/unit/test_hf_modeling.py under it) and the lock's 5.x
        "hf": ["transformers>=4.53", "safetensors", "huggingface_hub"],
        # FP8 experiments: torchao's quantizers (emulation, CPU or GPU) and real FP8 GEMMs without Transformer Engine
        # (precision.fp8_backend: emulate | torchao); matplotlib for the plots of `genlip-fp8 report`.
        # tested: torchao 0.18.0 (its Float8 and MX APIs move between minor releases), matplotlib 3.11
        "fp8": ["torchao>=0.18,<0.19", "matplotlib>=3.8"],
        # GPU only: never install these on a CPU machine (they need a CUDA torch and a CUDA runtime).
        "gpu": [
            "transformer-engine[pytorch]>=2.6",
            # DALI wheels are per CUDA major version: CUDA 13 images use nvidia-dali-cuda130 instead.
            "nvidia-dali-cuda120",
        ],
    },
    entry_points={
        "console_scripts": [
            "genlip-pretrain=genlip_mcore.train.__main__:main",
            "genlip-model-info=genlip_mcore.info:main",
            "genlip-data=genlip_mcore.data.__main__:main",
            "genlip-caption=genlip_mcore.caption:main",
            "genlip-convert=genlip_mcore.convert:main",
            "genlip-fp8=genlip_mcore.fp8.__main__:main",
        ],
    },
)
