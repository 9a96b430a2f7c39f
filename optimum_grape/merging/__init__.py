"""Changing the model: a plan applied in place (`apply`), and merging with calibration data
(`with_data`: activation-aware alignment, least-squares refits, sequential re-planning)."""
