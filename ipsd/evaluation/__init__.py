"""Evaluation metrics on a trained model's outputs: safety and calibration, white-box attacks."""

SUITES = ("safety", "attack", "corruption")  # the suites of `ipsd evaluate` (ipsd.evaluation.run): eval/<suite>.json
