"""`deeprec bench gan`: one GAN iteration's cost for both architectures, without the loader."""

from __future__ import annotations

import time

import torch


def bench_gan(size: int, batch_sizes: tuple[int, ...], iterations: int, presets: tuple[str, ...]) -> dict:
    """Iterations/s and images/s of one GAN iteration (the D phase, then the G phase) for both
    architectures at each batch size, on random uint8 "real" batches: the models' cost without the
    loader. bf16 autocast on a GPU, as in training; three warm-up iterations are not timed."""
    from deeprecognition.config import GAN_PRESETS
    from deeprecognition.gan.loop import gan_step, make_nets

    unknown = set(presets) - set(GAN_PRESETS)
    if unknown:
        raise ValueError(f"unknown GAN preset(s) {', '.join(sorted(unknown))}; presets: {', '.join(GAN_PRESETS)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    for preset_name in presets:
        cfg = GAN_PRESETS[preset_name]()
        for batch in batch_sizes:
            nets = make_nets(cfg, size, device)
            real = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
            noise = torch.Generator(device).manual_seed(0)
            for i in range(3):  # warm-up: the first iterations pay for oneDNN/cuDNN kernel selection
                gan_step(cfg, nets, real, noise, i)
            start = time.perf_counter()
            for i in range(iterations):
                gan_step(cfg, nets, real, noise, i)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            results.append(
                {
                    "arch": cfg.model.arch,
                    "batch_size": batch,
                    "iterations_per_s": round(iterations / seconds, 3),
                    "images_per_s": round(iterations * batch / seconds, 1),
                }
            )
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return {"device": name, "image_size": size, "iterations_measured": iterations, "results": results}
