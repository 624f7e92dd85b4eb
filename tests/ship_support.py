"""One trained smoke model shared by the deployment tests (detector, export, predict, serve).

The trained model is conftest's session-wide `smoke_run` fixture (the whole suite trains it once);
`smoke_export(tmp_path_factory, run)` exports it once per session.
"""

import os


def smoke_test_images(workdir: str, n: int | None = None) -> list[str]:
    """Paths of the smoke run's demo test images (sorted)."""
    from diff_fastener_jax.config import config_from_json
    from diff_fastener_jax.data import datasets

    config = config_from_json(os.path.join(workdir, "config.json"))
    samples = datasets.list_samples(config.data, "test", seed=config.seed)
    return [s.path for s in samples][:n]


def smoke_export(tmp_path_factory, run: str) -> str:
    """An export folder (model.stablehlo, model.onnx with a fixed batch of 2, params, detector.json)
    of the smoke run, written once per session (across xdist workers, like the run itself)."""
    from conftest import shared_once

    from diff_fastener_jax.deploy.export import export_run

    return shared_once(tmp_path_factory, "smoke_export",
                       lambda out: export_run(run, out, onnx_batch=2, log=lambda *_: None))
