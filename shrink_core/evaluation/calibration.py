"""The one calibration recipe: what calibration tokens are drawn from, recorded with every result computed from them.

Every entry point (apply, eval --plan, the Plan page's run, measure, the planner's checks) gets its tokens through
`plan_calibration`, so one plan gives one set of weights wherever it runs.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shrink_core.errors import ShrinkError
from shrink_core.evaluation.slices import get_slice, list_slices, load_rows
from shrink_core.paths import REPO_ROOT

if TYPE_CHECKING:
    import torch

# 3: the rows drawn do not depend on the mix's order (each slice draws from its own seed, the slices in name order);
# 2: `shrink` (GPTQ's full statistics shrunk towards their diagonals); 1: the raw statistics. Versions 1 and 2 drew
# each slice from one shared generator in the mix's order, so the same mix written in another order (the store and
# every key sort it) drew other rows: one plan's slices moved 6-8% either way on SmolLM2 (docs/methods.md). They keep
# that draw, so their figures keep their rows.
RECIPE_VERSION = 3
RECIPE_VERSIONS = (1, 2, 3)
# The share of each full calibration statistic's off-diagonal part removed: (1 - a) X^T X + a diag(X^T X), and the same
# for gptq-seq's X^T X_fp. 8k-64k tokens estimate a 576-1536 wide covariance poorly, and GPTQ spends rounding error
# along its off-diagonal structure, tuned to the mix. Measured on SmolLM2 (gptq-seq w3g64, 64 x 512 tokens, 4 windows
# a language, bench/bench_peers.py --shrink): a = 0.3 lowered KL on every language, most on Hindi (outside the mix)
# (docs/methods.md).
SHRINK_DEFAULT = 0.3
# Multilingual by default: calibrated on English alone, GPTQ beat RTN on en but lost to it on ru, zh, ja and ar
# (bench/bench_engine.py). Code and arithmetic too: without them GPTQ left down_proj's whole RTN error on those slices,
# and the w4g64 preset's worst slice was code (KL 0.205); with them code 0.108, arith 0.012 (from 0.066), for en +5%
# and zh +10% (docs/plan.md, 2026-12-02). 16 x 512 = 8k tokens: enough for Hessians of width <= 1536, minutes on 2 cores.
DEFAULT_MIX = (("en", 0.3), ("fr", 0.1), ("de", 0.1), ("es", 0.1), ("ru", 0.1), ("zh", 0.1), ("ja", 0.1), ("ar", 0.1),
               ("code", 0.1), ("arith", 0.1))
RECIPE_KEYS = ("mix", "n_sequences", "seq_len", "seed", "shrink", "version")


class CalibrationError(ShrinkError):
    """A calibration recipe that cannot be used as given."""


def _number(name: str, value) -> float:
    if isinstance(value, bool):
        raise CalibrationError(f"The calibration weight for '{name}' is {value!r}, not a number; write e.g. {name}=0.5.")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise CalibrationError(f"The calibration weight '{value}' for slice '{name}' is not a number; "
                               f"write e.g. {name}=0.5.") from None


def _mix(value) -> tuple[tuple[str, float], ...]:
    pairs = value.items() if isinstance(value, dict) else value
    try:
        mix = tuple((str(name), _number(str(name), weight)) for name, weight in pairs)
    except (TypeError, ValueError):
        raise CalibrationError("A calibration mix maps slice names to weights, e.g. {en: 0.5, fr: 0.5}.") from None
    return mix


@dataclass(frozen=True)
class CalibrationRecipe:
    """Slices and their weights (normalised when tokens are drawn), how many windows of how many tokens, the seed."""

    mix: tuple[tuple[str, float], ...] = DEFAULT_MIX
    n_sequences: int = 16
    seq_len: int = 512
    seed: int = 0
    shrink: float | None = None  # None: the version's own (1: 0, the raw statistics; 2 and 3: SHRINK_DEFAULT)
    version: int = RECIPE_VERSION

    def __post_init__(self):
        if self.version not in RECIPE_VERSIONS:
            raise CalibrationError(f"Calibration recipe version {self.version} is not supported; this code reads "
                                   f"versions {', '.join(map(str, RECIPE_VERSIONS))}.")
        if self.shrink is None:  # a recipe stored before `shrink` existed keeps what it computed: version 1, raw
            object.__setattr__(self, "shrink", 0.0 if self.version == 1 else SHRINK_DEFAULT)
        if isinstance(self.shrink, bool) or not isinstance(self.shrink, (int, float)) or not 0 <= self.shrink <= 1:
            raise CalibrationError(f"calibration shrink must be a share between 0 and 1 (e.g. 0.3), not "
                                   f"{self.shrink!r}.")
        object.__setattr__(self, "shrink", float(self.shrink))
        if self.version == 1 and self.shrink:
            raise CalibrationError("A version 1 calibration recipe reads the raw statistics; drop shrink or use "
                                   f"version {RECIPE_VERSION}.")
        object.__setattr__(self, "mix", _mix(self.mix))
        if not self.mix:
            raise CalibrationError("A calibration mix needs at least one slice, e.g. en=1.")
        if any(w <= 0 for _, w in self.mix):
            raise CalibrationError("Every weight in a calibration mix must be positive, e.g. en=0.5,fr=0.5.")
        if len({name for name, _ in self.mix}) != len(self.mix):
            raise CalibrationError("A calibration mix names a slice twice; give each slice once.")
        for field_name in ("n_sequences", "seq_len", "seed"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise CalibrationError(f"calibration {field_name} must be a whole number, not {value!r}.")
        if self.n_sequences < 1 or self.seq_len < 8:
            raise CalibrationError("A calibration set needs at least 1 sequence of at least 8 tokens.")

    @staticmethod
    def parse(text: str, n_sequences: int = 16, seq_len: int = 512, seed: int = 0) -> CalibrationRecipe:
        """'en=0.5,fr=0.1,...' or 'en' (weight 1)."""
        pairs = []
        for part in text.split(","):
            if not part.strip():
                continue
            name, _, weight = part.partition("=")
            pairs.append((name.strip(), _number(name.strip(), weight) if weight.strip() else 1.0))
        return CalibrationRecipe(tuple(pairs), n_sequences, seq_len, seed)

    @staticmethod
    def from_dict(data) -> CalibrationRecipe:
        if not isinstance(data, dict):
            raise CalibrationError("calibration must be a mapping with mix, n_sequences, seq_len and seed.")
        unknown = sorted(set(data) - set(RECIPE_KEYS))
        if unknown:
            raise CalibrationError(f"calibration has unknown keys {unknown}; allowed: {list(RECIPE_KEYS)}.")
        return CalibrationRecipe(**data)

    def to_dict(self) -> dict:
        """As stored and keyed; a version 1 recipe is written as it always was, so its figures keep their keys."""
        out = {"mix": dict(self.mix), "n_sequences": self.n_sequences, "seq_len": self.seq_len, "seed": self.seed,
               "version": self.version}
        if self.version >= 2:
            out["shrink"] = self.shrink
        return out

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def recipe_for(plan) -> CalibrationRecipe:
    """The recipe a plan calibrates with: its own, else the default. There is no other default anywhere."""
    return plan.calibration or CalibrationRecipe()


def plan_calibration(plan, tokenizer) -> tuple[torch.Tensor | None, dict | None]:
    """(tokens, the recipe as recorded) for a plan that needs calibration; (None, None) for one that does not."""
    if not plan.needs_calibration:
        return None, None
    recipe = recipe_for(plan)
    tokens = calibration_tokens(tokenizer, recipe)
    return tokens, recipe.to_dict()


def _row_text(row: dict) -> str:
    if "text" in row:
        return row["text"]
    if row.get("task") == "mc":
        return row["context"] + row["choices"][row["answer"]]
    return row["context"] + row["answer"]


def allocate(recipe: CalibrationRecipe) -> dict[str, int]:
    """Largest-remainder split of n_sequences over the normalised mix, so the counts add up exactly. From version 3
    the slices come in name order, so equal remainders go to the same slices whatever order the mix was written in."""
    mix = sorted(recipe.mix) if recipe.version >= 3 else recipe.mix
    total = sum(w for _, w in mix)
    raw = {name: weight / total * recipe.n_sequences for name, weight in mix}
    counts = {name: int(value) for name, value in raw.items()}
    remainder = recipe.n_sequences - sum(counts.values())
    for name in sorted(raw, key=lambda n: raw[n] - counts[n], reverse=True)[:remainder]:
        counts[name] += 1
    return counts


def calibration_tokens(tokenizer, recipe: CalibrationRecipe) -> torch.Tensor:
    """(n_sequences, seq_len) token ids drawn from the calib split of each slice in proportion to its weight."""
    import torch  # lazily: recipes are parsed by every CLI start, which stays torch-free

    for slice_id, _ in recipe.mix:  # a misspelled slice whose share rounds to no rows is still refused
        get_slice(slice_id)
    rng = random.Random(recipe.seed)
    eos = tokenizer.eos_token_id
    sequences = []
    for slice_id, count in allocate(recipe).items():
        if count == 0:
            continue
        if recipe.version >= 3:  # its own generator: a slice's rows depend on the seed and its name, not on the rest
            rng = random.Random(f"{recipe.seed}:{slice_id}")
        rows = load_rows(get_slice(slice_id), split="calib")
        if not rows:
            raise CalibrationError(f"The slice '{slice_id}' has no calibration rows; pick another slice for the mix.")
        order = list(range(len(rows)))
        rng.shuffle(order)
        stream: list[int] = []
        needed = count * recipe.seq_len
        cursor = 0
        while len(stream) < needed:
            if cursor == len(order):  # small slices repeat rather than fall short of their share
                rng.shuffle(order)
                cursor = 0
            stream += tokenizer.encode(_row_text(rows[order[cursor]]), add_special_tokens=False) + [eos]
            cursor += 1
        for index in range(count):
            sequences.append(stream[index * recipe.seq_len:(index + 1) * recipe.seq_len])
    (random.Random(recipe.seed) if recipe.version >= 3 else rng).shuffle(sequences)
    return torch.tensor(sequences, dtype=torch.long)


@dataclass(frozen=True)
class MixGaps:
    """Scored slices a calibration mix leaves out. `unseen_language`: written in a language (or programming language)
    no slice of the mix is written in; `outside`: the others outside the mix (long documents, formats, naughty strings)."""

    unseen_language: tuple[str, ...] = ()
    outside: tuple[str, ...] = ()


def mix_gaps(recipe: CalibrationRecipe, scored: list[str]) -> MixGaps:
    """Which scored slices the recipe's mix leaves out, the ones in a language it never shows first: a calibrated
    method fits the mix, and on SmolLM2 at 3 bits about 20 rows of Hindi in the tuning's rows halved Hindi's KL with
    the other languages within 0-5% (docs/methods.md, "Hindi in the tuning's rows")."""
    # each slice's written languages, the manifests read once ("mul", the naughty strings' mixture, names none)
    languages = {info.id: set(info.languages) - {"mul"} for info in list_slices(include_toy=True)}
    in_mix = {name for name, _ in recipe.mix}
    mix_languages = set().union(*(languages.get(name, set()) for name in in_mix))
    unseen, outside = [], []
    for slice_id in dict.fromkeys(scored):
        if slice_id in in_mix or slice_id not in languages:
            continue  # not a gap; or a user slice removed since it was scored: nothing to say of its language
        written = languages[slice_id]
        (unseen if written and not written <= mix_languages else outside).append(slice_id)
    return MixGaps(tuple(unseen), tuple(outside))


def mix_gaps_sentence(gaps: MixGaps) -> str | None:
    """What the Plan page and `eval --plan` say of the gaps; None when the mix holds every scored slice."""
    parts = []
    if gaps.unseen_language:
        names, many = ", ".join(gaps.unseen_language), len(gaps.unseen_language) > 1
        parts.append(f"The calibration mix holds no text in the language{'s' * many} of {names}, so a calibrated "
                     f"method fits {'them' if many else 'it'} least: on SmolLM2 at 3 bits, 20 rows of Hindi in the "
                     "tuning's rows halved Hindi's KL (0.286 to 0.148) with the other languages within 5% "
                     f"(docs/methods.md). Add the ones that matter to the mix, e.g. {gaps.unseen_language[0]}=0.1.")
    if gaps.outside:
        names, many = ", ".join(gaps.outside), len(gaps.outside) > 1
        parts.append(f"{names} {'are' if many else 'is'} outside the mix{' too' * bool(parts)}: a domain left out "
                     "can keep more error (the w4g64 preset's KL on arith: 0.066 with arith and code outside its "
                     "mix, 0.012 with them in; docs/plan.md).")
    return " ".join(parts) or None


# ---------------------------------------------------------------- raw text windows (benchmarks)


def slice_texts(slice_name: str, split: str) -> list[str]:
    path = REPO_ROOT / "evalsets" / "data" / f"{slice_name}.jsonl.gz"
    if not path.is_file():
        raise ShrinkError(f"The eval slice file {path} does not exist; build the evalsets or pick another slice.")
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return [row["text"] for row in rows if row.get("split") == split and row.get("text")]


def token_windows(tokenizer, texts: list[str], n_sequences: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """Concatenate texts (shuffled by seed) and cut n_sequences windows of seq_len tokens: (n, seq_len)."""
    import torch

    order = list(texts)
    random.Random(seed).shuffle(order)
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in order:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else []))
        if len(stream) >= n_sequences * seq_len:
            break
    if len(stream) < n_sequences * seq_len:
        n_sequences = max(1, len(stream) // seq_len)
    if len(stream) < seq_len:
        raise ShrinkError(f"The text has only {len(stream)} tokens; lower seq_len or add text.")
    return torch.tensor(stream[: n_sequences * seq_len], dtype=torch.long).reshape(n_sequences, seq_len)
