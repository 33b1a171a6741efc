"""Feature cache and pipeline for cross-manipulation deepfake detection with CLIP-like models."""

__version__ = "0.1.0"
