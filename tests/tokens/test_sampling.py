from llmtraj.tokens.sampling import SamplingPolicy


def test_only_allowed_keys_pass_and_fixed_values_are_imposed():
    policy = SamplingPolicy(allow=frozenset({"max_tokens", "stop"}), fixed={"temperature": 1.0, "top_p": 1.0, "seed": 0})
    request = {"model": "m", "messages": [], "max_tokens": 5, "temperature": 0.2, "top_k": 3, "stop": ["x"], "top_p": 1.0}
    sent, note = policy.apply(request)
    assert sent == {"model": "m", "messages": [], "max_tokens": 5, "stop": ["x"], "temperature": 1.0, "top_p": 1.0, "seed": 0}
    assert note == {"removed": {"top_k": 3}, "fixed": {"temperature": 1.0, "seed": 0}}
    assert request["temperature"] == 0.2  # the agent's request (recorded as sent) is left alone


def test_nothing_to_change_leaves_the_request_as_it_is():
    request = {"model": "m", "temperature": 1.0}
    assert SamplingPolicy(fixed={"temperature": 1.0}).apply(request) == (request, {})
    assert SamplingPolicy().apply(request) == (request, {})
