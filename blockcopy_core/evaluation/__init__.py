"""Metrics for detections produced on video."""
from .citypersons import CITYPERSONS_SETUPS, CityPersonsSetup, citypersons_miss_rates
from .detection import (Agreement, average_precision_50, detection_agreement, log_average_miss_rate,
                        miss_rate_curve)

__all__ = [
    "CITYPERSONS_SETUPS",
    "Agreement",
    "CityPersonsSetup",
    "average_precision_50",
    "citypersons_miss_rates",
    "detection_agreement",
    "log_average_miss_rate",
    "miss_rate_curve",
]
