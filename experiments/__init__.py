"""Experiment scripts reproducing the paper's tables and figures."""
