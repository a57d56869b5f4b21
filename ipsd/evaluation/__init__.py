"""Evaluation metrics on a trained model's outputs: safety and calibration, white-box attacks."""
