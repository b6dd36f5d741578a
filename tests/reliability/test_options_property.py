"""For every option of every backend, any value a user could type gives either a clear
ConfigError or a valid stack: never another exception (a traceback from deep inside torch,
OmegaConf or a backend). Validation needs no model, so this runs in milliseconds a case."""

from __future__ import annotations

import dataclasses

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fluxopt import ConfigError, plugins
from fluxopt.stack import build_stack

VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-10**6, max_value=10**6),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.lists(st.one_of(st.integers(-5, 5), st.floats(-1e4, 1e4), st.text(max_size=6)), max_size=4),
    st.dictionaries(st.text(max_size=8), st.one_of(st.booleans(), st.integers(-3, 3), st.text(max_size=4)),
                    max_size=2),
)
OPTIONS = sorted((name, field.name) for name, backend in plugins.backends().items()
                 for field in dataclasses.fields(backend.options_class))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(option=st.sampled_from(OPTIONS), value=VALUES, typo=st.booleans())
def test_any_value_of_any_option_is_valid_or_a_clear_config_error(option, value, typo):
    backend, field = option
    key = field + "x" if typo else field
    try:
        stack = build_stack({backend: {key: value}})
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc)
        assert backend in str(exc) or key in str(exc)
        return
    assert not typo
    assert stack.names == [backend]
    assert getattr(stack.entries[0].options, key) == value  # taken as given: no silent coercion ("yes" -> True)
    numbers = value if isinstance(value, list) else [value]
    assert not any(isinstance(v, float) and v != v or v in (float("inf"), float("-inf")) for v in numbers)
