"""HTML report of training runs, pipelines and evaluations: ``rlhfkit report RUN_DIR [--output FILE]``."""

from .build import build_report, main

__all__ = ["build_report", "main"]
