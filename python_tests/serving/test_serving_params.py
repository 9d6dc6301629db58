"""What a serving request may carry (no vLLM needed: runs in the main venv too)."""
import math

import pytest

from upsafe_ext.serving import SAFETY_TEMPERATURE_KEY, parse_safety_temperature, serving_model_info
from upsafe_ext.upcycle import UpcycleConfig


@pytest.mark.parametrize("value", [0, 0.0, 0.3, 0.5, 1, 1.0])
def test_accepts_tau_in_unit_interval(value):
    assert parse_safety_temperature({SAFETY_TEMPERATURE_KEY: value}) == float(value)


@pytest.mark.parametrize("extra", [None, {}, {"other": 1}, {SAFETY_TEMPERATURE_KEY: None}])
def test_absent_tau_is_none(extra):
    assert parse_safety_temperature(extra) is None


@pytest.mark.parametrize("value", [1.5, -0.1, math.nan, math.inf, "0.3", True, [0.3], {"t": 1}])
def test_rejects_bad_tau_naming_the_key(value):
    with pytest.raises(ValueError, match="safety_temperature"):
        parse_safety_temperature({SAFETY_TEMPERATURE_KEY: value})


def test_model_info_from_saved_config_dicts():
    up = UpcycleConfig(layers=[2, 5], safety_temperature=0.25).to_dict()
    new = {"model_type": "upsafe_upcycled", "base_model_type": "llama", "upsafe_upcycle": up}
    old = {"model_type": "llama", "upsafe_upcycle": up}  # folders saved before model_type upsafe_upcycled
    for cfg in (new, old):
        info = serving_model_info(cfg)
        assert info.upcycle.layers == [2, 5] and info.default_safety_temperature == 0.25
    assert serving_model_info({"model_type": "llama"}) is None


def test_sequence_routed_models_are_refused_not_served_per_token():
    up = UpcycleConfig(layers=[2, 5], routing="sequence").to_dict()
    with pytest.raises(ValueError, match="routing='sequence'"):
        serving_model_info({"model_type": "upsafe_upcycled", "base_model_type": "llama", "upsafe_upcycle": up})
