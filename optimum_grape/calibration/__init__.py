"""Calibration: turning data into token batches and recording per-expert statistics."""

from .data import (calibration_batches, calibration_windows, default_calibration_path, held_aside,
                   load_calibration_data, warn_if_little_data)
from .recorder import recording

__all__ = ["calibration_batches", "calibration_windows", "default_calibration_path", "held_aside",
           "load_calibration_data", "recording", "warn_if_little_data"]
