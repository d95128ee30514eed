"""The Prometheus text of /metrics: vLLM's names, cumulative buckets, counts and sums."""

from cpmtool.serve.metrics import Metrics, _one_two_five, parse_metrics


def test_histogram_buckets_are_cumulative_and_counts_add_up():
    m = Metrics("m", max_model_len=100)
    for x in (0.003, 0.003, 0.5, 3000.0):
        m.observe("time_to_first_token_seconds", x)
    s = parse_metrics(m.render())
    b = 'vllm:time_to_first_token_seconds_bucket{model_name="m",le="%s"}'
    assert s[b % "0.001"] == 0 and s[b % "0.005"] == 2 and s[b % "0.5"] == 3 and s[b % "2560.0"] == 3
    assert s[b % "+Inf"] == 4 == s['vllm:time_to_first_token_seconds_count{model_name="m"}']
    assert abs(s['vllm:time_to_first_token_seconds_sum{model_name="m"}'] - 3000.506) < 1e-9


def test_counters_gauges_and_finish_reasons():
    m = Metrics('we"ird', max_model_len=100)
    m.add(prompt_tokens=7, generation_tokens=3)
    m.add(generation_tokens=2)
    m.finish("stop")
    m.finish("abort")
    m.finish("abort")
    m.set_load(running=4, waiting=1)
    text = m.render()
    assert "# TYPE vllm:prompt_tokens counter" in text and "# TYPE vllm:num_requests_running gauge" in text
    s = parse_metrics(text)
    lab = 'model_name="we\\"ird"'
    assert s[f"vllm:prompt_tokens_total{{{lab}}}"] == 7 and s[f"vllm:generation_tokens_total{{{lab}}}"] == 5
    assert s[f'vllm:request_success_total{{{lab},finished_reason="abort"}}'] == 2
    assert s[f'vllm:request_success_total{{{lab},finished_reason="stop"}}'] == 1
    assert s[f"vllm:num_requests_running{{{lab}}}"] == 4 and s[f"vllm:num_requests_waiting{{{lab}}}"] == 1


def test_token_buckets_follow_1_2_5():
    assert _one_two_five(600) == (1, 2, 5, 10, 20, 50, 100, 200, 500)
