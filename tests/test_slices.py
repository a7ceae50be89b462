"""Slices: the committed registry, user uploads with row-level validation, calibration mixes."""
import hashlib
import json

import pytest
import torch

from shrink_core.evaluation import slices
from shrink_core.evaluation.calibration import DEFAULT_MIX, CalibrationError, CalibrationRecipe, calibration_tokens
from shrink_core.evaluation.slices import SliceError, add_user_slice, get_slice, list_slices
from shrink_core.model.toy import ByteTokenizer
from shrink_core.sensitivity.probe import calib_tokens

NATURAL = {"en", "fr", "de", "es", "ru", "zh", "ja", "ar", "hi", "it", "nl", "pt", "pl"}


def test_manifest_has_enough_slices_and_languages():
    infos = list_slices()
    assert len(infos) >= 14
    languages = {lang for s in infos for lang in s.languages} & NATURAL
    assert len(languages) >= 8
    for info in infos:
        assert info.source and info.license and info.rows_eval > 0 and info.rows_calib > 0, info.id
        assert info.path.is_file()
    assert {"en", "fr", "de", "es", "ru", "zh", "ja", "ar", "code", "math", "long", "formats", "adversarial"} <= {
        s.id for s in infos}
    assert sum(s.kind == "task" for s in infos) >= 3


def test_manifest_hashes_match_files():
    import hashlib

    manifest = json.loads((slices.BUILTIN_DIR / "manifest.json").read_text())
    for entry in manifest["slices"]:
        path = slices.BUILTIN_DIR / "data" / f"{entry['id']}.jsonl.gz"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"], entry["id"]


def test_calibration_and_eval_parts_are_disjoint():
    for slice_id in ("en", "fr", "code", "arc"):
        info = get_slice(slice_id)
        calib = {r["id"] for r in slices.load_rows(info, "calib")}
        evaluation = {r["id"] for r in slices.load_rows(info, "eval")}
        assert calib and evaluation and not calib & evaluation
    # parallel languages share groups, and a group is on the same side in every language
    en = {r["group"]: r["split"] for r in slices.load_rows(get_slice("en"), None)}
    fr = {r["group"]: r["split"] for r in slices.load_rows(get_slice("fr"), None)}
    assert en == fr


@pytest.mark.parametrize("slice_id, languages", [("udhr_world", 29), ("udhr_indic", 8)])
def test_udhr_world_leaves_hindi_its_script_and_its_eval_articles_unseen(slice_id, languages):
    """udhr_world (and its Indic-script part) is calibration text beyond the handbook mix that keeps Hindi a language
    absent from the mix."""
    world = slices.load_rows(get_slice(slice_id), None)
    hindi = {r["group"]: r["split"] for r in slices.load_rows(get_slice("hi"), None)}
    assert len({r["lang"] for r in world}) == languages
    assert not {r["lang"] for r in world} & {"hin", "urd", "urd_2", "mar", "nep", "san", "eng", "fra", "rus", "arb"}
    # no Devanagari but its dandas (U+0964-5), the sentence marks Bengali and Gurmukhi text uses too
    assert not any("\u0900" <= ch <= "\u097f" and ch not in "\u0964\u0965" for r in world for ch in r["text"])
    for row in world:  # an article is calib in every language or in none
        assert row["split"] == hindi[row["group"]], row["id"]
    assert {r["split"] for r in world} == {"calib", "eval"}


def test_unknown_slice_is_one_sentence():
    with pytest.raises(SliceError, match="There is no slice 'klingon'"):
        get_slice("klingon")


@pytest.mark.parametrize(
    "name, data, words",
    [
        ("bad.jsonl", b'{"context": "2+2=", "answer": " 4"}\n{"context": "Pick", "choices": "a|b", "answer": 0}\n',
         "row 2: field 'choices' must be a list"),
        ("bad.jsonl", b'{"text": "fine"}\n{"txt": "typo"}\n', "row 2: needs a field 'text'"),
        ("bad.jsonl", b'{"text": "ok"}\n{not json}\n', "row 2: not valid JSON"),
        ("bad.jsonl", b'{"context": "Q", "choices": ["a", "b"], "answer": 5}\n', "row 1: field 'answer' must be the index"),
        ("empty.txt", b"   \n", "is empty"),
        ("latin1.txt", "caf\xe9 cr\xe8me".encode("latin-1"), "not UTF-8"),
        ("table.xlsx", b"PK\x03\x04", "unsupported type"),
    ],
)
def test_bad_uploads_are_refused_and_nothing_is_written(shrink_home, name, data, words):
    good = add_user_slice("good.txt", b"First paragraph.\n\nSecond paragraph.")
    with pytest.raises(SliceError) as info:
        add_user_slice(name, data)
    assert words in str(info.value) and "\n" not in str(info.value)
    assert [s.id for s in list_slices() if s.user] == [good.id]
    assert len(slices.load_rows(good, None)) == 2


def test_oversized_upload(shrink_home, monkeypatch):
    monkeypatch.setattr(slices, "MAX_UPLOAD_BYTES", 10)
    with pytest.raises(SliceError, match="over the"):
        add_user_slice("big.txt", b"x" * 11)


def test_user_task_slice_from_csv_and_folder(shrink_home, tmp_path):
    csv = b'context,choices,answer\n"Sky is","[""blue"", ""green""]",0\n"Grass is","[""red"", ""green""]",1\n'
    info = add_user_slice("quiz.csv", csv)
    assert info.id == "user_quiz" and info.kind == "task" and info.metric == "accuracy"
    rows = slices.load_rows(info, None)
    assert rows[0]["task"] == "mc" and rows[1]["answer"] == 1
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"text": "alpha"}\n')
    (folder / "b.txt").write_text("beta\n\ngamma")
    records = slices.load_dataset_records(str(folder))
    assert [r["text"] for r in records] == ["alpha", "beta", "gamma"]


def test_builtin_names_are_protected(shrink_home):
    with pytest.raises(SliceError, match="built-in slice"):
        add_user_slice("en.txt", b"hello", slice_id="en")


def test_calibration_mix_is_exact_and_reproducible():
    recipe = CalibrationRecipe.parse("en=0.5,fr=0.25,zh=0.25", n_sequences=8, seq_len=32, seed=3)
    assert dict(recipe.mix) == {"en": 0.5, "fr": 0.25, "zh": 0.25}
    tokenizer = ByteTokenizer()
    first = calibration_tokens(tokenizer, recipe)
    assert first.shape == (8, 32)
    assert (first == calibration_tokens(tokenizer, recipe)).all()
    other = calibration_tokens(tokenizer, CalibrationRecipe.parse("en=0.5,fr=0.25,zh=0.25", 8, 32, seed=4))
    assert not (first == other).all()
    # only calibration rows are used: an eval-only text never appears
    eval_text = slices.load_rows(get_slice("en"), "eval")[0]["text"][:32].encode()
    stream = bytes(int(t) for t in first.flatten() if t < 256)
    assert eval_text not in stream
    assert recipe.to_dict()["mix"]["en"] == 0.5


def test_the_rows_drawn_do_not_depend_on_the_mixs_order_and_version_2_keeps_its_rows():
    """The store and every key sort a mix, so a recipe re-read from either must draw the rows it drew when written.
    Version 2 drew from one generator in the mix's order; it keeps those rows (pinned), so its figures reproduce."""
    tokenizer = ByteTokenizer()
    mixes = (DEFAULT_MIX, tuple(sorted(DEFAULT_MIX)), tuple(reversed(DEFAULT_MIX)))
    drawn = [calibration_tokens(tokenizer, CalibrationRecipe(mix=mix, n_sequences=16, seq_len=64)) for mix in mixes]
    assert CalibrationRecipe().version == 3
    assert all(torch.equal(drawn[0], other) for other in drawn[1:])
    assert len({tuple(row) for row in drawn[0].tolist()}) == 16  # the slices' windows, not one repeated

    def digest(tokens):
        return hashlib.sha256(tokens.numpy().astype("<i8").tobytes()).hexdigest()[:16]

    def version_2(mix):
        return calibration_tokens(tokenizer, CalibrationRecipe(mix=mix, n_sequences=16, seq_len=64, version=2))

    # computed by the code before version 3 existed: the mix's order chose other rows
    assert digest(version_2(DEFAULT_MIX)) == "ab372606dbe45764"
    assert digest(version_2(tuple(sorted(DEFAULT_MIX)))) == "bdbe53c6f03d6f56"
    # the scans' probe rows are keyed without the draw, so they keep the rows they had before version 3
    assert digest(calib_tokens(tokenizer, "en", 4, 64)) == "af3178eafe27d9b6"
    # one slice's rows depend on that slice alone: adding another slice leaves en's windows among the rows drawn
    alone = calibration_tokens(tokenizer, CalibrationRecipe(mix=(("en", 1.0),), n_sequences=2, seq_len=64))
    with_fr = calibration_tokens(tokenizer, CalibrationRecipe(mix=(("fr", 0.5), ("en", 0.5)), n_sequences=4,
                                                              seq_len=64))
    assert {tuple(row) for row in alone.tolist()} <= {tuple(row) for row in with_fr.tolist()}


def test_bad_mix():
    with pytest.raises(CalibrationError, match="not a number"):
        CalibrationRecipe.parse("en=lots")
    with pytest.raises(CalibrationError, match="positive"):
        CalibrationRecipe((("en", 0.0),))
    with pytest.raises(CalibrationError, match="not a number"):
        CalibrationRecipe.from_dict({"mix": {"en": "abc"}})
    with pytest.raises(CalibrationError, match="unknown keys"):
        CalibrationRecipe.from_dict({"mix": {"en": 1}, "samples": 3})
    # a misspelled slice is refused even when its share rounds to no rows (2 sequences, 10%)
    with pytest.raises(SliceError, match="There is no slice 'udhr_wrld'"):
        calibration_tokens(ByteTokenizer(), CalibrationRecipe.parse("en=0.9,udhr_wrld=0.1", 2, 16, seed=0))


def test_a_manifest_entry_that_leaves_the_folder_is_never_used(shrink_home):
    """An older version let `--id ../../../x` into the user manifest; such an entry is neither listed nor followed."""
    good = add_user_slice("good.txt", b"First paragraph.\n\nSecond paragraph.")
    manifest_path = slices.user_dir() / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["slices"].append({**manifest["slices"][0], "id": "../../../outside"})
    manifest_path.write_text(json.dumps(manifest))
    outside = shrink_home.parent / "outside.jsonl.gz"
    outside.write_bytes(b"not a slice")
    assert [s.id for s in list_slices() if s.user] == [good.id]
    with pytest.raises(SliceError, match="not valid"):
        slices.remove_user_slice("../../../outside")
    assert outside.read_bytes() == b"not a slice"
