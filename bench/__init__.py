"""Benchmarks (scripts, not tests): each prints its figure beside a reference run in the same
process, as a ratio, and writes JSON to ``bench/results/<name>.json``."""
