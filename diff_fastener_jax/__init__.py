"""diff_fastener_jax: one-step norm-guided diffusion anomaly detection in JAX/Flax."""

from diff_fastener_jax.version import __version__


def __getattr__(name):
    # Lazy: `import diff_fastener_jax` stays light (no JAX import) until the API is used.
    if name == "Detector":
        from diff_fastener_jax.deploy.detector import Detector

        return Detector
    raise AttributeError(f"module 'diff_fastener_jax' has no attribute {name!r}")


__all__ = ["Detector", "__version__"]
