"""Slices (built-in and the user's), the calibration recipe, the evaluation protocol, the runner and its statistics."""
