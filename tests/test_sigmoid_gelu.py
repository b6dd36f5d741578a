"""``compile(sigmoid_gelu=true)``: FLUX's tanh-GELUs computed through a sigmoid are the same
function (float32 rounding apart), every one of the transformer's is routed through it, the
compiled stack's images match eager's and closing the stack puts diffusers' GELUs back."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fluxopt.serving import apply_stack, load_model
from fluxopt_plugins._sigmoid_gelu import SigmoidGelu, sigmoid_gelu, use_sigmoid_gelu


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**16), st.floats(0.01, 30.0), st.sampled_from([torch.float32, torch.bfloat16]))
def test_it_is_the_tanh_gelu(seed, spread, dtype):
    x = (torch.randn(4096, generator=torch.Generator().manual_seed(seed)) * spread).to(dtype)
    expected = torch.nn.functional.gelu(x.float(), approximate="tanh")
    got = sigmoid_gelu(x)
    assert got.dtype == dtype
    # fp32: a few ulps of the larger of |x| and |gelu|; bf16: the output rounding (2^-8) on top
    tolerance = (4e-7 if dtype == torch.float32 else 2 ** -8) * x.float().abs().clamp_min(1e-3)
    assert bool(((got.float() - expected).abs() <= tolerance + 1e-7).all())


def _generate(pipe):
    return pipe("a red fox", num_inference_steps=2, height=64, width=64, max_sequence_length=32,
                generator=torch.Generator().manual_seed(0), output_type="latent").images


def test_every_gelu_of_flux_is_routed_and_the_stack_undoes_it():
    from diffusers.models.activations import GELU as ProjectedGelu

    pipe = load_model("tiny", device="cpu")
    transformer = pipe.transformer
    singles, doubles = len(transformer.single_transformer_blocks), len(transformer.transformer_blocks)
    before = _generate(pipe)
    with apply_stack(pipe, {"compile": {"backend": "eager", "fullgraph": True, "sigmoid_gelu": True}},
                     height=64, width=64, steps=2, max_sequence_length=32) as applied:
        # a single block's act_mlp, and the two feed-forwards (image, text) of a joint block
        assert applied.stats["compile"]["sigmoid_gelu"] == singles + 2 * doubles
        assert all(isinstance(b.act_mlp, SigmoidGelu) for b in transformer.single_transformer_blocks)
        assert all(b.ff.net[0].gelu is sigmoid_gelu for b in transformer.transformer_blocks)
        routed = _generate(pipe)
    assert float((routed - before).abs().max()) < 1e-4  # fp32 here: rounding only
    assert all(isinstance(b.act_mlp, torch.nn.GELU) for b in transformer.single_transformer_blocks)
    assert all("gelu" not in vars(m) for m in transformer.modules() if isinstance(m, ProjectedGelu))
    assert torch.equal(_generate(pipe), before)


def test_other_gelus_are_left_alone():
    model = torch.nn.Sequential(torch.nn.GELU(), torch.nn.GELU(approximate="tanh"))
    assert use_sigmoid_gelu(model) == 1
    assert type(model[0]) is torch.nn.GELU and isinstance(model[1], SigmoidGelu)


def test_routing_flux_changes_its_output_by_rounding_only():
    """Eager (no compile): what ``use_sigmoid_gelu`` does to the tiny FLUX transformer by itself."""
    from diffusers.models.activations import GELU as ProjectedGelu

    pipe = load_model("tiny", device="cpu")
    transformer = pipe.transformer
    before = _generate(pipe)
    projected = [m for m in transformer.modules() if isinstance(m, ProjectedGelu)]
    assert use_sigmoid_gelu(transformer) == len(transformer.single_transformer_blocks) + len(projected)
    assert all(m.gelu is sigmoid_gelu for m in projected)
    assert not any(isinstance(m, torch.nn.GELU) for m in transformer.modules())
    after = _generate(pipe)
    assert float((after - before).abs().max()) < 1e-4
    assert use_sigmoid_gelu(transformer) == len(projected)  # already routed: only re-set, no module swapped again
