"""Pieces shared by the ops: input checks and time-axis chunking."""
