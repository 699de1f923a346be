"""rayseg: COCO instances -> semantic masks (PNG + Parquet) -> Ray Train segmentation."""

__version__ = "0.1.0"
