"""diff_fastener_jax: one-step norm-guided diffusion anomaly detection in JAX/Flax."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: `import diff_fastener_jax` stays light (no JAX import) until the API is used.
    if name == "Detector":
        from diff_fastener_jax.deploy.detector import Detector

        return Detector
    raise AttributeError(f"module 'diff_fastener_jax' has no attribute {name!r}")


__all__ = ["Detector", "__version__"]


def _reexec_with_hugepages():
    # Before JAX is imported, and only for `python -m diff_fastener_jax.<cmd>` (see hostenv).
    from diff_fastener_jax.perf import hostenv

    hostenv.reexec_with_hugepages()


_reexec_with_hugepages()
