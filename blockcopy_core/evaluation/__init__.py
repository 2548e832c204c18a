"""Metrics for detections produced on video."""
from .detection import (Agreement, average_precision_50, detection_agreement, log_average_miss_rate,
                        miss_rate_curve)

__all__ = [
    "Agreement",
    "average_precision_50",
    "detection_agreement",
    "log_average_miss_rate",
    "miss_rate_curve",
]
