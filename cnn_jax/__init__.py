"""cnn_jax: convolutional networks on MNIST-style data in JAX/Flax."""

__version__ = '0.1.0'
