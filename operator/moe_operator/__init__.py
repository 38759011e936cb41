"""moe-operator: run DeepSeek-V3-class Mixture-of-Experts models with large expert parallelism."""

__version__ = "0.1.0"
