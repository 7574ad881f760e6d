"""The three model families (SETR, conv hybrid, CvT) in every attention mode, by name."""

from __future__ import annotations

from kvseg.models.base import SegmentationModel
from kvseg.models.registry import create_model, list_models, model_info

__all__ = ["SegmentationModel", "create_model", "list_models", "model_info"]
