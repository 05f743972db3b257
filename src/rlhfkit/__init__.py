"""rlhfkit: align causal language models with human preferences."""

__version__ = "0.1.0"
