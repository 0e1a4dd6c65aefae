"""Data pipeline: sources -> buckets -> transforms -> cache."""
