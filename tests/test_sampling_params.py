import pytest

from pagedformers import SamplingParams
from pagedformers.sampling_params import RequestOutputKind


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("min_p", 2.0), ("n", 0),
    ("max_tokens", 0), ("min_tokens", -1), ("logprobs", -1), ("prompt_logprobs", -3),
    ("presence_penalty", 3.0), ("frequency_penalty", -2.5), ("repetition_penalty", 0.0), ("stop", [""]),
    ("stop_token_ids", [-1]), ("output_kind", RequestOutputKind.DELTA),
    # out of the engine's integer range, not finite, not the type asked for
    ("top_k", 10**20), ("seed", -(2**70)), ("max_tokens", 2**63), ("stop_token_ids", [2**64]), ("n", 2.0),
    ("logprobs", True), ("temperature", float("inf")), ("top_p", float("nan")), ("repetition_penalty", float("inf")),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}="):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=10, max_tokens=5)


def test_defaults_follow_vllm():
    p = SamplingParams(stop="###", top_k=-1)
    assert p.max_tokens == 16 and p.temperature == 1.0 and p.stop == ["###"] and p.top_k == 0
    assert SamplingParams(temperature=0).is_greedy
