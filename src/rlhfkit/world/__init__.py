"""The offline demo world: a seeded synthetic assistant world, its gold judge and simulated annotators."""

from .annotators import Annotator, annotator_panel, pairwise_agreement
from .generator import CATEGORIES, STYLES, Request, World, build_world
from .judge import GoldJudge, GoldScore, load_gold_judge

__all__ = ["CATEGORIES", "STYLES", "Annotator", "GoldJudge", "GoldScore", "Request", "World", "annotator_panel",
           "build_world", "load_gold_judge", "pairwise_agreement"]
