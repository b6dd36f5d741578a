"""fluxopt.kit.eager_rounding: the explicit rounding equals torch's cast for every value it is used
on, and the wrapper is a no-op in eager (so the stack stays lossless there)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

from fluxopt.kit.eager_rounding import EagerRoundedTimesteps, keep_eager_timestep_rounding, round_like
from fluxopt.zoo.tiny import build_tiny_pipeline

LIMIT = 60000.0  # float16's normal range is [2**-14, 65504]; timesteps and guidance x 1000 are inside it
NORMAL = st.floats(-LIMIT, LIMIT, width=32).filter(lambda v: v == 0 or abs(v) >= 2 ** -14)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@given(values=st.lists(NORMAL, min_size=1, max_size=64))
def test_round_like_equals_the_cast(dtype, values):
    x = torch.tensor(values, dtype=torch.float32)
    assert torch.equal(round_like(x, dtype), x.to(dtype).float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ties_round_to_even(dtype):
    grid = torch.arange(1, 2000, dtype=torch.float32).to(dtype).float().unique()
    midpoints = (grid[:-1] + grid[1:]) / 2  # exactly halfway between neighbouring dtype values
    assert torch.equal(round_like(midpoints, dtype), midpoints.to(dtype).float())


def test_wrapper_installs_once_changes_nothing_in_eager_and_is_undone():
    pipe = build_tiny_pipeline()
    transformer = pipe.transformer.to(torch.bfloat16)
    t = torch.tensor([0.7], dtype=torch.bfloat16) * 1000
    before = transformer.time_text_embed.time_proj(t)
    original = transformer.time_text_embed.time_proj
    undo = keep_eager_timestep_rounding(transformer)
    assert isinstance(transformer.time_text_embed.time_proj, EagerRoundedTimesteps)
    assert keep_eager_timestep_rounding(transformer) is None  # already wrapped
    assert torch.equal(transformer.time_text_embed.time_proj(t), before)
    undo()
    assert transformer.time_text_embed.time_proj is original
    assert "time_proj" in transformer.time_text_embed._modules  # a submodule again, not an attribute
    assert keep_eager_timestep_rounding(torch.nn.Linear(2, 2)) is None  # not a FLUX transformer


def test_wrapper_rounds_only_low_precision_inputs():
    """float32 timesteps pass unchanged (eager does not round them); bf16-typed ones are rounded."""
    seen = []

    class Record(torch.nn.Module):
        def forward(self, t):
            seen.append(t)
            return t

    wrapper = EagerRoundedTimesteps(Record())
    exact = torch.tensor([699.21875])
    wrapper(exact)
    assert seen[-1].item() == 699.21875
    wrapper(torch.tensor([700.0], dtype=torch.bfloat16))
    assert seen[-1].item() == 700.0
