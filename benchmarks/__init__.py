"""Performance and learning-quality benchmarks: each prints a table and writes JSON."""
