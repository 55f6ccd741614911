"""Results store: persistence, filtering, checked cache entries."""

from __future__ import annotations

import sqlite3

from engine.core.keys import cache_key
from engine.runs.store import ResultsStore


def _add(store, method="dense", ppl=20.0, model="m"):
    return store.add_run(model=model, model_fingerprint="abc", method=method, config={"sp": 0.1},
                         data={"source": "wiki-offline"}, metrics={"ppl": ppl}, duration_s=1.5)


def test_runs_survive_a_new_store_object(tmp_path):
    path = tmp_path / "r.sqlite"
    first = _add(ResultsStore(path))
    runs = ResultsStore(path).runs()
    assert [r.id for r in runs] == [first]
    assert runs[0].metrics == {"ppl": 20.0} and runs[0].config == {"sp": 0.1}


def test_filters_and_frame(store):
    _add(store, "dense", 20.0)
    _add(store, "slicing", 30.0)
    _add(store, "slicing", 40.0, model="other")
    frame = store.runs_frame(model="m")
    assert len(frame) == 2 and set(frame["method"]) == {"dense", "slicing"}
    assert sorted(frame["metrics.ppl"]) == [20.0, 30.0]
    assert len(store.runs(method="slicing")) == 2


def test_cache_round_trip_and_corruption_is_a_miss(store):
    key = cache_key(model="abc", windows=4)
    assert store.get_cached(key) is None
    store.put_cached(key, "scores", {"lr": [0.5, 0.25]})
    assert store.get_cached(key) == {"lr": [0.5, 0.25]}
    with sqlite3.connect(store.path) as conn:
        conn.execute("UPDATE cache_entries SET payload = ? WHERE key = ?", ('{"lr": [9]}', key))
    assert store.get_cached(key) is None
    assert store.get_cached(key) is None  # corrupt entry removed, still a miss


def test_cache_key_is_order_independent():
    assert cache_key(a=1, b=[2]) == cache_key(b=[2], a=1) != cache_key(a=1, b=[3])
