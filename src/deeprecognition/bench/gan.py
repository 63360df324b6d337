"""`deeprec bench gan`: one GAN iteration's cost for each preset, without the loader."""

from __future__ import annotations

import time

import torch
from torch import nn


def _parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def bench_gan(size: int, batch_sizes: tuple[int, ...], iterations: int, presets: tuple[str, ...]) -> dict:
    """Iterations/s and images/s of one GAN iteration (optim.n_dis D steps, then the G step) for each
    preset at each batch size, on random uint8 "real" batches: the models' cost without the loader;
    with each preset's G and D parameter counts at this size. bf16 autocast on a GPU, as in
    training; three warm-up iterations are not timed. A conditional preset draws random label
    vectors (the cost of real ones)."""
    from deeprecognition.config import GAN_PRESETS
    from deeprecognition.gan.conditions import LabelBank
    from deeprecognition.gan.step import gan_step, make_nets

    unknown = set(presets) - set(GAN_PRESETS)
    if unknown:
        raise ValueError(f"unknown GAN preset(s) {', '.join(sorted(unknown))}; presets: {', '.join(GAN_PRESETS)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    for preset_name in presets:
        cfg = GAN_PRESETS[preset_name]()
        attributes = cfg.condition_attributes()
        bank = (
            LabelBank(attributes, torch.randint(0, 2, (1000, len(attributes)), dtype=torch.uint8))
            if attributes
            else None
        )
        for batch in batch_sizes:
            nets = make_nets(cfg, size, device, bank)
            real = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
            reals = [real] * cfg.optim.n_dis  # the same batch for every D step: the cost is the same
            labels = [nets.bank.sample(batch, torch.Generator(device))] * cfg.optim.n_dis if bank else None
            noise = torch.Generator(device).manual_seed(0)
            for i in range(3):  # warm-up: the first iterations pay for oneDNN/cuDNN kernel selection
                gan_step(cfg, nets, reals, noise, i, labels)
            start = time.perf_counter()
            for i in range(iterations):
                gan_step(cfg, nets, reals, noise, i, labels)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            results.append(
                {
                    "preset": preset_name,
                    "arch": cfg.model.arch,
                    "batch_size": batch,
                    "n_dis": cfg.optim.n_dis,
                    "params_g": _parameters(nets.G),
                    "params_d": _parameters(nets.D),
                    "iterations_per_s": round(iterations / seconds, 3),
                    "images_per_s": round(iterations * batch / seconds, 1),
                }
            )
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return {"device": name, "image_size": size, "iterations_measured": iterations, "results": results}
