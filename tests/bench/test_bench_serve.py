"""The serving benchmark (oss_mlx.bench_serve) on the tiny model: real server, loopback clients.

The oracle is the steering rule itself: every request must stream exactly <|channel|>final
<|message|> then " la" until its max_tokens, so the figures count known tokens.
"""

import pytest

from oss_mlx.bench.serve import Steered, run_level
from oss_mlx.engine import Engine, SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_model):
    engine = Engine.load(str(tiny_model))
    engine.model = Steered(engine.model, engine.encoding)
    return engine


def test_steered_model_streams_a_known_final_message(engine):
    c = engine.complete(_prompt(engine), SamplingParams(temperature=0, max_tokens=10))
    assert c.final == " la" * 7 and c.stop_reason == "length"


def _prompt(engine):
    from oss_mlx.harmony import build_conversation, user_message

    return engine.render(build_conversation([user_message("Hello")]))


def test_run_level_counts_every_stream(engine):
    row = run_level(engine, n=2, concurrency=2, requests=2, prompt_words=8, max_tokens=6,
                    timeout=120)
    assert row["requests"] == 4 and row["completion_tokens"] == 4 * 6
    assert row["aggregate_tps"] > 0 and row["per_stream_tps_p50"] > 0
    assert 0 < row["ttft_p50_s"] <= row["ttft_p95_s"]
    assert 0 <= row["cache_reuse"] <= 1
