"""The package version, in a module that imports nothing (pyproject.toml's [project] version matches it)."""

__version__ = "0.1.0"
