"""`deeprec bench train`: the classifier loop's images/s in a plain process and under Ray Train."""

from __future__ import annotations

import tempfile

import torch

from deeprecognition import storage


def bench_train(data: str, steps: int, batch_size: int = 64, layers: int = 3) -> dict:
    """The classifier loop's images/s in a plain process, under Ray Train with 1 worker, and with 2:
    the price of Ray Train, and what a second worker buys. The last epoch is measured (the first
    pays for warm-up); every run gets one CPU thread, as Ray gives each worker."""
    from deeprecognition.classifier.loop import train_loop_per_worker
    from deeprecognition.config import apply_overrides, preset, to_dict
    from deeprecognition.launch import absolute_paths, run
    from deeprecognition.runs.report import read_history

    with tempfile.TemporaryDirectory() as runs:

        def cfg(name: str, workers: int):
            overrides = [
                f"data.data={data}",
                f"storage={runs}",
                f"name={name}",
                f"model.layers={layers}",
                f"data.batch_size={batch_size}",
                "optim.epochs=2",
                f"optim.steps_per_epoch={steps}",
                "data.loader_workers=1",
                f"scale.num_workers={workers}",
            ]
            return absolute_paths(apply_overrides(preset("paper-cnn"), overrides))

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            train_loop_per_worker(to_dict(cfg("plain", 1)))
        finally:
            torch.set_num_threads(threads)
        plain = read_history(storage.join(runs, "plain"))[-1]["train/images_per_s"]
        one = run(cfg("ray1", 1)).metrics["train/images_per_s"]
        two = run(cfg("ray2", 2)).metrics["train/images_per_s"]
    return {
        "plain_images_per_s": round(plain, 1),
        "ray_1_worker_images_per_s": round(one, 1),
        "ray_overhead_ratio": round(one / plain, 3),
        "ray_2_workers_images_per_s": round(two, 1),
        "scaling_2_vs_1": round(two / one, 3),
        "steps_per_epoch": steps,
        "batch_size": batch_size,
        "model": f"cnn{layers}",
    }
