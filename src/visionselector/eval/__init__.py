"""Evaluation: the efficiency benchmark (``bench``)."""
