"""The ``flux-mini`` architecture: a real FluxPipeline (FLUX's classes and latent layout) at a
size that trains in minutes and runs on a CPU.

* transformer: FluxTransformer2DModel, 2 double-stream + 4 single-stream blocks, 8 heads of 32
  (hidden 256), ``guidance_embeds=True`` like FLUX.1-dev, 64 input channels (16 latent
  channels packed in 2x2 patches);
* VAE: AutoencoderKL with FLUX's 16 latent channels and 8x downsampling (4 blocks), no
  quant convs (like FLUX); ``scaling_factor``/``shift_factor`` are measured after training;
* text: CLIPTextModel (pooled vector) and T5EncoderModel (sequence), small, trained jointly
  with the transformer. Tokenizers are built locally: CLIP's is fluxopt's character-level one
  (:func:`fluxopt.zoo.tiny.clip_tokenizer`); T5's is the tiny model's character unigram
  vocabulary plus the dataset's words as single pieces (any ASCII text still tokenizes);
* scheduler: FLUX.1-dev's FlowMatchEulerDiscreteScheduler configuration.
"""

from __future__ import annotations

import torch

from fluxopt.zoo.flux_mini.dataset import VOCABULARY

MAX_SEQUENCE_LENGTH = 32  # T5 tokens the model was trained with (the pipeline pads to this)

TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=32,
                   num_attention_heads=8, joint_attention_dim=128, pooled_projection_dim=64,
                   guidance_embeds=True, axes_dims_rope=(8, 12, 12))
VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 64, 128, 128), layers_per_block=1,
           latent_channels=16, norm_num_groups=16, sample_size=128, use_quant_conv=False,
           use_post_quant_conv=False, scaling_factor=1.0, shift_factor=0.0)
CLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, projection_dim=64,
            max_position_embeddings=77, attention_dropout=0.0, dropout=0.0)
T5 = dict(d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4, relative_attention_num_buckets=16,
          relative_attention_max_distance=64, dropout_rate=0.0)


def t5_tokenizer():
    """The tiny model's character unigram vocabulary plus each dataset word as one piece."""
    from fluxopt.zoo.tiny import t5_tokenizer as character_t5_tokenizer

    return character_t5_tokenizer(VOCABULARY)


def build_untrained_pipeline(seed: int = 0):
    """The flux-mini FluxPipeline with freshly initialised weights (float32, eval mode)."""
    from fluxopt.zoo.tiny import assemble_flux_pipeline

    return assemble_flux_pipeline(CLIP, T5, TRANSFORMER, VAE, seed, t5_words=VOCABULARY)


def tokenize(pipe, captions: list[str], max_sequence_length: int = MAX_SEQUENCE_LENGTH):
    """Token ids exactly as FluxPipeline.encode_prompt makes them: (clip_ids, t5_ids)."""
    clip = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer_max_length, truncation=True,
                          return_overflowing_tokens=False, return_length=False, return_tensors="pt").input_ids
    t5 = pipe.tokenizer_2(captions, padding="max_length", max_length=max_sequence_length, truncation=True,
                          return_length=False, return_overflowing_tokens=False, return_tensors="pt").input_ids
    return clip, t5


def encode(pipe, clip_ids: torch.Tensor, t5_ids: torch.Tensor):
    """(prompt_embeds, pooled_prompt_embeds) as the pipeline computes them, with gradients."""
    pooled = pipe.text_encoder(clip_ids, output_hidden_states=False).pooler_output
    embeds = pipe.text_encoder_2(t5_ids, output_hidden_states=False)[0]
    return embeds, pooled
