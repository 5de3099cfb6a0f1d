"""Exploring an image step by step (notebooks/explore.ipynb): its logic, widgets and profile proposals."""
