"""genlip_mcore: GenLIP ("Let ViT Speak") pretraining on Megatron-Core."""

__version__ = "0.1.0"
