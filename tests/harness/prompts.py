"""API-format prompt nodes the server tests build graphs from: any node, the test pack's seeded latent and core's
KSampler at the tests' fixed settings."""

from __future__ import annotations


def node(kind: str, **inputs) -> dict:
    return {"class_type": kind, "inputs": inputs}


def tiny_latent(family: str, seed: int, size: int = 64, empty: bool = False) -> dict:
    """``SCTest_Latent``: a seeded square latent of ``size`` px (a reference or target), or with ``empty`` the zeros
    a sampler starts from."""
    return node("SCTest_Latent", family=family, seed=seed, width=size, height=size, batch_size=1, empty=empty)


def ksampler(model: list, positive: list, negative: list, latent: list, steps: int, seed: int = 5) -> dict:
    """Core's KSampler: euler, simple schedule, cfg 1, full denoise."""
    return node("KSampler", model=model, positive=positive, negative=negative, latent_image=latent, seed=seed,
                steps=steps, cfg=1.0, sampler_name="euler", scheduler="simple", denoise=1.0)
