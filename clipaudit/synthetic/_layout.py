"""File names inside a synthetic data set's folder."""

MANIFEST_NAME = "manifest.csv"
GROUND_TRUTH_NAME = "ground_truth.json"
IMAGES_DNAME = "images"
MASKS_DNAME = "masks"
"""Folder of the artifact mask PNGs, beside ``images/``."""
