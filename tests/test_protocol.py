"""Figure keys: a stored figure is reused only under the key this code would write, never because __version__ held
still (it has read 0.1.0 since the first commit)."""
import gzip
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from shrink_core import __version__
from shrink_core.evaluation import protocol
from shrink_core.evaluation.protocol import PROTOCOLS, eval_key, figure_key
from shrink_core.evaluation.slices import SliceInfo, get_slice
from shrink_core.model.load import LoadedModel, ModelSpec
from shrink_core.model.toy import ByteTokenizer, tiny_llama
from shrink_core.results.eval_run import reference_results
from shrink_core.results.store import Provenance, Store
from shrink_core.sensitivity import run_scan, stored_records


def tiny_loaded() -> LoadedModel:
    return LoadedModel(ModelSpec("toy:tiny", "local", "toy"), tiny_llama(vocab=258), ByteTokenizer(), Path("."),
                       "hash0", 0.0, False)


def write_slice(path: Path, texts: list[str], mtime: int = 0) -> SliceInfo:
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=mtime) as handle:
        for i, text in enumerate(texts):
            handle.write((json.dumps({"id": f"r{i}", "split": "eval", "text": text}) + "\n").encode())
    os.utime(path, ns=(mtime * 10**9 + 1, mtime * 10**9 + 1))
    return SliceInfo(id="mine", title="mine", kind="text", metric="ppl", languages=("en",), source=(), license="-",
                     rows=len(texts), rows_calib=0, rows_eval=len(texts), tokens=0, path=path)


def test_the_key_changes_with_every_input_and_only_with_them(tmp_path):
    info = write_slice(tmp_path / "a.jsonl.gz", ["one row", "two rows"])
    recipe = {"mix": {"en": 1.0}, "n_sequences": 16, "seq_len": 512, "seed": 0, "version": 1}
    base = dict(weights_hash="h", info=info, budget=PROTOCOLS["fast"], plan={"rules": []}, calibration=recipe)
    key = eval_key(**base)
    assert key.startswith(f"eval/p{protocol.PROTOCOL_VERSION}.") and eval_key(**base) == key
    # the same rows in a file written at another time (gzip stamps its header): the same key
    assert eval_key(**{**base, "info": write_slice(tmp_path / "b.jsonl.gz", ["one row", "two rows"], 99)}) == key
    changed = [
        {"weights_hash": "h2"},
        {"info": write_slice(tmp_path / "c.jsonl.gz", ["one row", "two rows!"])},
        {"budget": replace(PROTOCOLS["fast"], long_window=2048)},
        {"budget": "standard"},
        {"plan": {"rules": [{"kind": ["q"]}]}},
        {"plan": None},
        {"calibration": {**recipe, "seed": 1}},
    ]
    keys = {eval_key(**{**base, **change}) for change in changed}
    assert key not in keys and len(keys) == len(changed)
    common = dict(weights_hash="h", protocol={}, slice_info=info)
    fast, exhaustive = (figure_key("sensitivity", **common, method=m) for m in ("fast", "exhaustive"))
    assert fast != exhaustive


def test_a_protocol_bump_stops_reuse_of_a_stored_reference_result(shrink_home, monkeypatch):
    store, loaded = Store(), tiny_loaded()

    def stored() -> int:
        return len(store.results("eval", slice="toy_en"))

    first = reference_results(store, loaded, ["toy_en"], "fast")["toy_en"]
    assert stored() == 1
    assert reference_results(store, loaded, ["toy_en"], "fast")["toy_en"] == first and stored() == 1  # reused
    monkeypatch.setattr(protocol, "PROTOCOL_VERSION", protocol.PROTOCOL_VERSION + 1)
    again = reference_results(store, loaded, ["toy_en"], "fast")["toy_en"]
    assert stored() == 2 and again.ppl == pytest.approx(first.ppl)  # computed again, under the new key
    assert reference_results(store, loaded, ["toy_en"], "fast")["toy_en"] == again and stored() == 2
    monkeypatch.setitem(protocol.FIGURE_VERSIONS, "eval", protocol.FIGURE_VERSIONS["eval"] + 1)
    reference_results(store, loaded, ["toy_en"], "fast")
    assert stored() == 3


def test_a_result_stored_without_a_key_is_never_served(shrink_home):
    """What the old rule reused: same model, budget and __version__ (which never moved), whatever the evaluator was."""
    store, loaded = Store(), tiny_loaded()
    fresh = reference_results(Store(shrink_home / "other.db"), loaded, ["toy_en"], "fast")["toy_en"]
    stale = {**fresh.to_dict(with_items=True), "ppl": 1.0}
    store.add_result("eval", Provenance("toy:tiny", "hash0", __version__, "cpu", slice="toy_en", budget="fast"), stale)
    served = reference_results(store, loaded, ["toy_en"], "fast")["toy_en"]
    assert served.ppl == pytest.approx(fresh.ppl) and served.ppl != 1.0
    newest = store.results("eval", slice="toy_en")[0]["payload"]
    assert newest["figure_key"] == eval_key("hash0", get_slice("toy_en"), "fast") and newest["calibration"] is None


def test_a_protocol_bump_stops_reuse_of_stored_sensitivity_scores(shrink_home, monkeypatch):
    store, loaded = Store(), tiny_loaded()
    scan = dict(slice_ids=["toy_en"], setting_ids=["w8"], method="fast", budget="quick", store=store,
                embeddings=False)
    assert run_scan(loaded, **scan).computed == 21
    again = run_scan(loaded, **scan)
    assert again.computed == 0 and again.reused == 21
    assert len(stored_records(store, "toy:tiny")) == 21 * 2
    monkeypatch.setattr(protocol, "PROTOCOL_VERSION", protocol.PROTOCOL_VERSION + 1)
    assert stored_records(store, "toy:tiny") == []  # the planner and the pages no longer see the old scores
    bumped = run_scan(loaded, **scan)
    assert bumped.computed == 21 and bumped.reused == 0
    assert len(stored_records(store, "toy:tiny")) == 21 * 2
