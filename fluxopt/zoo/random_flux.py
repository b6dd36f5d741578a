"""``flux-dev-random`` / ``flux-schnell-random``: a FluxPipeline with FLUX.1-dev's (or -schnell's)
transformer and VAE configuration and random weights created directly on the device, for
performance work without a download. The two differ in the guidance embedding (schnell is
timestep-distilled and has none) and in their generation defaults (see ``fluxopt.models``).

The cost per denoising step is the real model's; the images are noise-like, so fidelity
numbers on it only say whether a backend computes the same function, not whether images
look right. Text encoders keep the real output shapes (CLIP pooled 768, T5 4096 wide) but
only two layers each: they run once per image and are not what fluxopt optimises.
"""

from __future__ import annotations

import contextlib

import torch

FLUX_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56))

FLUX_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
    use_quant_conv=False, use_post_quant_conv=False)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@torch.no_grad()
def _init_like_trained(model: torch.nn.Module, std: float = 0.02) -> None:
    """Linear weights ~ N(0, 0.02), biases 0: the magnitudes of a trained transformer.

    PyTorch's default (Kaiming-uniform) init lets the residual stream of 57 blocks grow until
    bf16 overflows; with these magnitudes activations stay finite, so fidelity comparisons
    between backends are meaningful as comparisons of the same function.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()


FLUX_DEV_CLIP = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=2, num_attention_heads=12,
                     projection_dim=768, max_position_embeddings=77)
FLUX_DEV_T5 = dict(d_model=4096, d_kv=64, d_ff=1024, num_layers=2, num_heads=64, dropout_rate=0.0)


def build_random_flux(device: torch.device, dtype: torch.dtype, guidance_embeds: bool = True, weight_seed: int = 0):
    """Built directly on ``device`` in ``dtype`` (no 48 GB fp32 detour through host memory);
    ``guidance_embeds=False`` gives FLUX.1-schnell's transformer."""
    from fluxopt.zoo.tiny import assemble_flux_pipeline

    init_dtype = dtype if dtype.is_floating_point else torch.float32
    transformer = {**FLUX_DEV_TRANSFORMER, "guidance_embeds": guidance_embeds}
    with torch.device(device), _default_dtype(init_dtype):
        pipe = assemble_flux_pipeline(FLUX_DEV_CLIP, FLUX_DEV_T5, transformer, FLUX_VAE, weight_seed)
        _init_like_trained(pipe.transformer)
    return pipe.to(device=device, dtype=dtype)
