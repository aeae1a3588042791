"""cnn_jax: convolutional networks on MNIST-style data in JAX/Flax.

Importing the package changes no environment variable or JAX setting; the
entry points apply process-wide defaults (`cnn_jax.runtime`).
"""

__version__ = '0.1.0'
