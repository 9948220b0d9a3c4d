"""Evaluation metrics (seed 000): FID (Fréchet distance of Inception features), CLIP score, precision/recall."""

from .fid import FeatureStats, InceptionFeatures, frechet_distance, load_stats, save_stats
from .prdc import precision_recall

__all__ = ["FeatureStats", "InceptionFeatures", "frechet_distance", "load_stats", "save_stats", "precision_recall"]
