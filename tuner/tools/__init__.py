"""Command-line tools beyond training: sampling, grids, export, merge, evaluation."""
