"""Visualisation: kept tokens over the image (``show``)."""
