"""diff_fastener_jax: one-step norm-guided diffusion anomaly detection in JAX/Flax."""

__version__ = "0.1.0"
