"""Experiments on cnn_jax: recipes, ablation studies, benchmarks.

Run from the checkout as ``python -m experiments.NAME``.
"""
