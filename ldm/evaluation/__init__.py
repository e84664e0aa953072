"""Measuring images: the learned image-text evaluator, image metrics, and the attribute classifier that
reads the built-in shapes data."""
