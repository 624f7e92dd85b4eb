"""Two processes x 2 CPU devices (gloo collectives on localhost) == one process x 4 devices."""

import os
import socket
import subprocess
import sys

from helpers import ROOT, assert_same_training_result, tiny_config

from diff_fastener_jax.training.loop import train_and_evaluate
from diff_fastener_jax.training.run_loading import load_run_config, load_run_params


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(demo_root, tmp_path):
    steps = 2
    root = demo_root  # the suite's smoke demo data
    overrides = [
        f"--config.data.root={root}",
        f"--config.train.num_steps={steps}",
        "--config.train.batch_size=8",
        "--config.train.eval_every=0",
    ]

    single = str(tmp_path / "single")
    config = tiny_config(**{"train.num_steps": steps, "train.batch_size": 8, "train.eval_every": 0})
    config.data.root = root
    train_and_evaluate(config, single, quiet=True)  # this pytest process has 4 CPU devices

    multi = str(tmp_path / "multi")
    port = _free_port()
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "diff_fastener_jax.train",
                f"--config={ROOT}/configs/demo.py:smoke",
                f"--workdir={multi}",
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
                *overrides,
            ],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]

    a = load_run_params(single, load_run_config(single))[0]
    b = load_run_params(multi, load_run_config(multi))[0]
    assert_same_training_result(a, b, config.optim.lr_recon, steps)
