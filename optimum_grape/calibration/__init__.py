"""Calibration: turning data into token batches and recording per-expert statistics."""

from .data import (CalibrationSample, calibration_batches, check_token_ids, default_calibration_path,
                   load_calibration_data, sample_windows, warn_if_degenerate, warn_if_little_data)
from .recorder import recording

__all__ = ["CalibrationSample", "calibration_batches", "check_token_ids", "default_calibration_path",
           "load_calibration_data", "recording", "sample_windows", "warn_if_degenerate", "warn_if_little_data"]
