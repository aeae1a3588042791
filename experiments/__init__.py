"""Experiments on cnn_jax: recipes, ablation studies, benchmarks; run as ``python -m experiments.NAME``."""
