"""Forward throughput for time estimates: measured once, trusted for a while, then measured again."""

from __future__ import annotations

import engine.evaluation.latency as latency
from tests.tiny_models import TINY_FACTORIES


def _counted(model):
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_throughput_is_reused_within_its_lifetime_and_measured_again_after(monkeypatch):
    """A measurement taken while the machine was busy must not skew every estimate for the rest of a session."""
    model = TINY_FACTORIES["llama"]()
    calls = _counted(model)
    now = [1000.0]
    monkeypatch.setattr(latency, "_THROUGHPUT", {})  # no reading left by another test's model
    monkeypatch.setattr(latency.time, "monotonic", lambda: now[0])
    first = latency.tokens_per_second(model)
    assert first > 0 and len(calls) == 4  # a warm-up and three timed passes
    now[0] += latency.FIRST_RECHECK_S / 2
    assert latency.tokens_per_second(model) == first and len(calls) == 4  # cached
    now[0] += latency.FIRST_RECHECK_S
    first = latency.tokens_per_second(model)
    assert len(calls) == 8  # the start-up reading is checked once, soon
    now[0] += latency.THROUGHPUT_TTL_S / 2
    assert latency.tokens_per_second(model) == first and len(calls) == 8  # then trusted for longer
    now[0] += latency.THROUGHPUT_TTL_S
    latency.tokens_per_second(model)
    assert len(calls) == 12  # measured again
    assert latency.estimate_seconds(model, 1000, forward_passes=2) == 2000 / latency.tokens_per_second(model)


def test_a_slow_reading_never_replaces_a_faster_one(monkeypatch):
    """A re-measurement while another job runs reads slow: the fastest reading stands."""
    model = TINY_FACTORIES["llama"]()
    now = [1000.0]
    monkeypatch.setattr(latency, "_THROUGHPUT", {})
    monkeypatch.setattr(latency.time, "monotonic", lambda: now[0])
    seconds = iter([0.2, 0.1, 1.0, 0.05])
    monkeypatch.setattr(latency, "forward_latency", lambda *a, **k: next(seconds))
    assert latency.tokens_per_second(model) == 640  # 128 tokens in 0.2 s, as the app starts
    now[0] += latency.FIRST_RECHECK_S + 1
    assert latency.tokens_per_second(model) == 1280  # 128 tokens in 0.1 s
    now[0] += latency.THROUGHPUT_TTL_S + 1
    assert latency.tokens_per_second(model) == 1280  # the busy reading (128 tokens/s) is not kept
    now[0] += latency.THROUGHPUT_TTL_S + 1
    assert latency.tokens_per_second(model) == 2560  # a faster one is
