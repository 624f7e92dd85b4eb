"""One trained smoke model shared by the deployment tests (detector, export, predict, serve).

`smoke_run(tmp_path_factory)` trains configs/demo.py:smoke once per test session (the first module
that asks pays for it) and returns its workdir; later callers get the same folder.
"""

import os

from conftest import tiny_config

_CACHE: dict[str, str] = {}


def smoke_run(tmp_path_factory) -> str:
    """Workdir of a finished smoke training run (checkpoints, config.json, detector.json)."""
    if "workdir" not in _CACHE:
        from diff_fastener_jax.train import train_and_evaluate

        workdir = str(tmp_path_factory.mktemp("smoke_run"))
        config = tiny_config()
        config.train.eval_every = 0  # validation is tested elsewhere; keep the shared fixture fast
        train_and_evaluate(config, workdir, quiet=True)
        _CACHE["workdir"] = workdir
    return _CACHE["workdir"]


def smoke_test_images(workdir: str, n: int | None = None) -> list[str]:
    """Paths of the smoke run's demo test images (sorted)."""
    from diff_fastener_jax.config import config_from_json
    from diff_fastener_jax.data import datasets

    config = config_from_json(os.path.join(workdir, "config.json"))
    samples = datasets.list_samples(config.data, "test", seed=config.seed)
    return [s.path for s in samples][:n]


def smoke_export(tmp_path_factory) -> str:
    """An export folder (model.stablehlo, model.onnx with a fixed batch of 2, params, detector.json)
    of the smoke run, written once per session."""
    if "export" not in _CACHE:
        from diff_fastener_jax.export import export_run

        out = str(tmp_path_factory.mktemp("smoke_export"))
        export_run(smoke_run(tmp_path_factory), out, onnx_batch=2, log=lambda *_: None)
        _CACHE["export"] = out
    return _CACHE["export"]
