"""ipsd: Intra-class Patch Swap self-distillation and its baselines under one training engine."""

__version__ = "0.1.0"
