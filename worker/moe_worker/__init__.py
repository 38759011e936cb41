"""moe_worker: the DeepSeek-V3 worker (model, FP8 linears, checkpoints, command line)."""

__version__ = "0.1.0"
