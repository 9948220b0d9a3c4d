"""Evaluation metrics: FID (Heusel et al. 2017) (Fréchet distance of Inception features), CLIP score (Hessel et al. 2021),
precision/recall (Kynkäänniemi et al. 2019)."""

from .fid import FeatureStats, InceptionFeatures, frechet_distance, load_stats, save_stats
from .prdc import precision_recall

__all__ = ["FeatureStats", "InceptionFeatures", "frechet_distance", "load_stats", "save_stats", "precision_recall"]
