"""The embedded tiny model is a real FluxPipeline that round-trips through save/load."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FluxPipeline

from fluxopt import Shapes
from fluxopt.environment import detect_device
from fluxopt.measure import PipelineCaller
from fluxopt.zoo.tiny import build_tiny_pipeline

SHAPES = Shapes(height=64, width=64, steps=3, guidance_scale=3.5, max_sequence_length=64)


def _generate(pipe) -> np.ndarray:
    sample, _, _ = PipelineCaller(pipe, SHAPES, detect_device("cpu"))("a red circle", seed=7)
    return sample.image


def test_tiny_is_a_real_flux_pipeline(tiny_pipe):
    assert isinstance(tiny_pipe, FluxPipeline)
    assert type(tiny_pipe.transformer).__name__ == "FluxTransformer2DModel"
    assert type(tiny_pipe.text_encoder_2).__name__ == "T5EncoderModel"
    assert tiny_pipe.vae.config.latent_channels == 16  # FLUX's latent space


def test_tiny_save_load_roundtrip_is_bit_identical(tmp_path, tiny_pipe):
    tiny_pipe.save_pretrained(tmp_path)
    reloaded = FluxPipeline.from_pretrained(tmp_path, dtype=torch.float32)
    first, second = _generate(tiny_pipe), _generate(reloaded)
    assert first.shape == (64, 64, 3)
    assert np.array_equal(first, second)


def test_tiny_weights_depend_only_on_seed():
    a, b, c = build_tiny_pipeline(weight_seed=0), build_tiny_pipeline(weight_seed=0), build_tiny_pipeline(weight_seed=1)
    wa, wb, wc = (p.transformer.state_dict()["proj_out.weight"] for p in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)


def test_same_seed_same_image_different_prompt_different_image(tiny_pipe):
    gen = PipelineCaller(tiny_pipe, SHAPES, detect_device("cpu"))
    x1 = gen("a red circle", seed=3)[0].image
    x2 = gen("a red circle", seed=3)[0].image
    y = gen("a blue square", seed=3)[0].image
    assert np.array_equal(x1, x2)
    assert not np.allclose(x1, y)  # captions must condition the output
