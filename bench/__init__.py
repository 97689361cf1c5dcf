"""Benchmarks: mps_ext against CPU eager, in one process, printed as ratios."""
