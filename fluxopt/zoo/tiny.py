"""The embedded default model: a real FluxPipeline (diffusers/transformers classes) with tiny
random weights and tokenizers built locally, so everything runs offline on a CPU.

It is written with ``save_pretrained`` and read back with ``FluxPipeline.from_pretrained``,
so the normal loading path is exercised. Weights depend only on ``weight_seed``.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

# Bump when the architecture or tokenizers change: cached copies are then rebuilt.
TINY_FORMAT_VERSION = 1

CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>")

# FLUX.1-dev's scheduler configuration (resolution-dependent timestep shift).
FLUX_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096)


def clip_tokenizer():
    """Byte-level CLIP BPE with no merges: one token per character, always offline."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet + [c + "</w>" for c in alphabet])}
    for special in CLIP_SPECIALS:
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer(words: Sequence[str] = ()):
    """SentencePiece-style unigram vocabulary over printable ASCII (word-start and inner pieces),
    plus ``words`` as single pieces (appended, so character ids never move)."""
    from transformers import T5Tokenizer

    chars = string.ascii_letters + string.digits + string.punctuation
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    pieces += [("\u2581" + w, -1.0) for w in words]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def assemble_flux_pipeline(clip: dict[str, Any], t5: dict[str, Any], transformer: dict[str, Any],
                           vae: dict[str, Any], weight_seed: int = 0, t5_words: Sequence[str] = ()):
    """A FluxPipeline of diffusers/transformers classes with fresh weights (eval mode) and the
    locally built tokenizers; the sizes come from the four config dicts."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_tok, t5_tok = clip_tokenizer(), t5_tokenizer(t5_words)
    eos = clip_tok.convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(weight_seed)
    modules = dict(
        text_encoder=CLIPTextModel(CLIPTextConfig(
            vocab_size=len(clip_tok), bos_token_id=clip_tok.convert_tokens_to_ids("<|startoftext|>"),
            eos_token_id=eos, pad_token_id=eos, **clip)),
        text_encoder_2=T5EncoderModel(T5Config(vocab_size=len(t5_tok), **t5)),
        transformer=FluxTransformer2DModel(**transformer),
        vae=AutoencoderKL(**vae),
    )
    for module in modules.values():
        module.eval()
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), tokenizer=clip_tok,
                        tokenizer_2=t5_tok, **modules)


TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32,
                 max_position_embeddings=77, attention_dropout=0.0, dropout=0.0)
TINY_T5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
               dropout_rate=0.0)
TINY_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
                        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                        guidance_embeds=True, axes_dims_rope=(4, 6, 6))
TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 16, 32, 32), layers_per_block=1,
                latent_channels=16, norm_num_groups=8, sample_size=64, use_quant_conv=False,
                use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)


def build_tiny_pipeline(weight_seed: int = 0):
    """Construct the tiny FluxPipeline in memory (float32, eval mode)."""
    return assemble_flux_pipeline(TINY_CLIP, TINY_T5, TINY_TRANSFORMER, TINY_VAE, weight_seed)


def save_tiny_pipeline(directory: Path, weight_seed: int = 0) -> None:
    """Write the tiny pipeline with ``save_pretrained`` (safetensors)."""
    build_tiny_pipeline(weight_seed).save_pretrained(str(directory), safe_serialization=True)
