"""Synthetic task generators (state tracking, recall) and their metrics."""
