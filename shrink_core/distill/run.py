"""A distillation run end to end: data, student, training with checkpoints, save, evaluate, store with lineage.

State on disk, under `$SHRINK_HOME/distill/<run>/`: config.json (the DistillConfig), run.json (evaluation slices and
budget, store run id, student blocks), checkpoint.pt (the latest; removed once the student is saved and stored),
checkpoint.json (its step), student/ (the final candidate directory). The CLI calls `run_distill` inline; the
Distill page runs `distill_job` in a worker. Same code path.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from shrink_core import __version__
from shrink_core.distill.config import DistillConfig
from shrink_core.distill.student import (
    attach_straight_through_,
    block_influence,
    build_student,
    detach_straight_through_,
    kept_blocks,
    lowest_influence,
    parameter_count,
)
from shrink_core.distill.train import (
    checkpoint_step,
    drop_checkpoint,
    has_checkpoint,
    load_checkpoint_,
    make_state,
    train_,
)
from shrink_core.errors import ShrinkError
from shrink_core.evaluation.calibration import CalibrationRecipe, calibration_tokens
from shrink_core.model.arch import decoder_layers
from shrink_core.paths import SAFE_NAME, safe_join, safe_name, shrink_home


def run_dir(name: str) -> Path:
    return safe_join(shrink_home() / "distill", safe_name(name, "run name"))


def new_run_name() -> str:
    return time.strftime("run-%Y%m%d-%H%M%S")


def resolve_device(config: DistillConfig) -> torch.device:
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ShrinkError("device 'cuda' was asked for but torch sees no CUDA GPU; use device 'cpu' or 'auto'.")
    return torch.device("cuda" if config.device != "cpu" and torch.cuda.is_available() else "cpu")


def training_data(tokenizer, config: DistillConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(pool, heldout) token windows from the calibration rows of the mix; the held-out windows are never trained on."""
    recipe = CalibrationRecipe(config.mix, config.pool_sequences + config.heldout_sequences, config.seq_len,
                               config.seed)
    tokens = calibration_tokens(tokenizer, recipe)  # (pool + heldout, seq_len), calibration split only
    return tokens[:config.pool_sequences], tokens[config.pool_sequences:]


def influence_tokens(tokenizer, config: DistillConfig, n: int = 16) -> torch.Tensor:
    """Calibration windows for block influence (a seed of their own, so they do not repeat the training order)."""
    return calibration_tokens(tokenizer, CalibrationRecipe(config.mix, n, config.seq_len, config.seed + 1))


def prepare_student(teacher_loaded, config: DistillConfig, progress=None) -> dict:
    """The student model and what it is: dropped blocks, the influence that chose them, its plan."""
    progress = progress or (lambda f, m="": None)
    teacher = teacher_loaded.model
    influence = None
    if config.student_dir:
        from shrink_core.model.load import load
        from shrink_core.plan import load_plan

        candidate = load(config.student_dir)
        student = candidate.model
        for param in student.parameters():
            param.requires_grad_(True)
        plan_path = Path(config.student_dir) / "plan.yaml"
        plan = load_plan(plan_path.read_text()) if plan_path.is_file() else None
        from shrink_core.plan import plan_to_dict

        plan_dict = plan_to_dict(plan) if plan else None
        quantized = plan_dict is not None and any(
            r.weights is not None and not r.weights.is_float for r in plan.rules)
        straight_through = attach_straight_through_(student, plan_dict) if quantized else 0
        kept = None
        drop = ()
    else:
        drop = tuple(config.drop_blocks)
        if config.drop_count:
            progress(0.03, "measuring block influence")
            influence = block_influence(teacher, influence_tokens(teacher_loaded.tokenizer, config))
            drop = lowest_influence(influence, config.drop_count)
        student, plan_dict = build_student(teacher, drop, config.mlp_prune)
        kept = kept_blocks(len(decoder_layers(teacher)), drop)
        straight_through = 0
    if student.config.vocab_size != teacher.config.vocab_size:
        raise ShrinkError("The student and the teacher have different vocabularies; logit distillation needs the same "
                          "tokenizer.")
    return {"student": student, "plan": plan_dict, "dropped": list(drop), "kept": kept, "influence": influence,
            "straight_through_modules": straight_through}


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def run_distill(config: DistillConfig, *, name: str | None = None, slices: list[str] | tuple | None = None,
                budget: str | None = None, resume: bool = False, store=None, progress=None, job_id: int | None = None,
                stop_after: int | None = None, deadline: float | None = None, evaluate_at_end: bool = True) -> dict:
    """Distil `config.teacher` into a student; returns the JSON report (and the saved candidate when finished).

    slices / budget: what the student is evaluated on at the end; None means the run's own on resume (they are saved
    with the run, so a Resume from a fresh page or another shell ends like the run that was started), else en / fast.
    """
    from shrink_core.evaluation.evaluate import get_protocol
    from shrink_core.evaluation.slices import get_slice
    from shrink_core.model.load import load
    from shrink_core.results.store import Store

    progress = progress or (lambda f, m="": None)
    store = store or Store()
    name = name or new_run_name()
    directory = run_dir(name)
    info_path = directory / "run.json"
    info = json.loads(info_path.read_text()) if resume and info_path.is_file() else {}
    slices = list(slices) if slices is not None else info.get("slices", ["en"])
    budget = budget or info.get("budget", "fast")
    get_protocol(budget)
    slice_infos = [get_slice(s) for s in slices]
    if resume:
        if not (directory / "config.json").is_file():
            raise ShrinkError(f"There is no run '{name}' to resume under {directory.parent}.")
        if student_saved(directory) and not has_checkpoint(directory):
            raise ShrinkError(f"The run '{name}' is finished: its student is saved in {directory / 'student'} (the "
                              f"candidate 'distilled {name}'); start a new run to train further.")
        saved = DistillConfig.from_dict(json.loads((directory / "config.json").read_text()))
        config = saved  # a resumed run keeps its own config, whatever else is asked
    elif (directory / "config.json").is_file():
        raise ShrinkError(f"The run '{name}' already exists; resume it (--resume) or choose another name.")
    directory.mkdir(parents=True, exist_ok=True)
    _write_json(directory / "config.json", config.to_dict())
    info.update({"slices": slices, "budget": budget})
    _write_json(info_path, info)
    device = resolve_device(config)
    torch.manual_seed(config.seed)

    progress(0.01, "loading the teacher")
    teacher_loaded = load(config.teacher)
    if teacher_loaded.tokenizer is None:
        raise ShrinkError(f"The teacher {config.teacher} has no tokenizer, which the training data needs.")
    pool, heldout = training_data(teacher_loaded.tokenizer, config)
    built = prepare_student(teacher_loaded, config, progress)
    student, teacher = built["student"].to(device), teacher_loaded.model.to(device)
    for param in teacher.parameters():
        param.requires_grad_(False)
    state = make_state(student, config)

    if resume and has_checkpoint(directory):
        load_checkpoint_(state, directory)
    if resume and info.get("run_id"):  # forget metrics logged after the checkpoint (all, without one): redone
        store.execute("DELETE FROM metrics WHERE run_id = ? AND step > ?", (info["run_id"], state.step))
    if not info.get("run_id"):
        info["run_id"] = store.create_run("distill", name, config.to_dict(), job_id)
    info.update({"name": name, "dropped": built["dropped"], "influence": built["influence"],
                 "student_params": parameter_count(student), "teacher_params": parameter_count(teacher),
                 "device": str(device), "straight_through_modules": built["straight_through_modules"]})
    if job_id is not None:
        info.setdefault("jobs", []).append(job_id)
    _write_json(info_path, info)
    run_id = info["run_id"]

    def on_metrics(step: int, values: dict) -> None:
        store.log_metrics(run_id, step, values)
        progress(0.05 + 0.8 * step / config.steps, f"step {step}/{config.steps}, loss {values['train_loss']:.4f}")

    progress(0.05 + 0.8 * state.step / config.steps, f"training from step {state.step}")
    train_(state, teacher, pool, heldout, config, directory, on_metrics, stop_after=stop_after, deadline=deadline,
           kept=built["kept"])
    report = {"run": name, "run_id": run_id, "dir": str(directory), "step": state.step, "steps": config.steps,
              "finished": state.step >= config.steps, "dropped_blocks": built["dropped"],
              "influence": built["influence"], "student_params": info["student_params"],
              "teacher_params": info["teacher_params"], "device": str(device), "config": config.to_dict(),
              "teacher_logits": "computed on the fly, full vocabulary (no top-k cache)"}
    if not report["finished"]:
        return report
    detach_straight_through_(student)
    student.to("cpu")
    teacher.to("cpu")
    report.update(finish(store, teacher_loaded, student, built, config, name, directory, slice_infos, budget,
                         evaluate_at_end, progress, job_id))
    drop_checkpoint(directory)  # the student is saved and stored: the resume state would only restart finished work
    progress(1.0, "done")
    return report


def finish(store, teacher_loaded, student, built, config, name, directory, slice_infos, budget, evaluate_at_end,
           progress, job_id) -> dict:
    """Save the student as a candidate directory, evaluate it against the teacher, store both with lineage."""
    from shrink_core.compression.export import save_candidate
    from shrink_core.evaluation.evaluate import evaluate
    from shrink_core.plan import load_plan
    from shrink_core.results.eval_run import (
        _provenance,
        eval_payload,
        public_entry,
        reference_candidate,
        reference_results,
        size_key,
    )

    base = built["plan"] or {"version": 1, "rules": [{"name": ".*", "keep": True}]}
    plan_dict = {**base, "name": f"distilled {name}",
                 "description": (f"distilled from {config.teacher} for {config.steps} steps (run {name}); "
                                 f"dropped blocks {built['dropped'] or 'none'}")}
    plan = load_plan(plan_dict)
    recipe = CalibrationRecipe(config.mix, config.pool_sequences, config.seq_len, config.seed).to_dict()
    calibration = {**recipe, "distill": config.to_dict()}
    progress(0.86, "saving the student")
    out = save_candidate(student, teacher_loaded.tokenizer, plan, directory / "student",
                         {"model_spec": config.teacher, "weights_hash": teacher_loaded.weights_hash,
                          "calibration": calibration, "distill_run": name})
    parent = reference_candidate(store, teacher_loaded)
    if config.student_dir:
        matches = [c for c in store.candidates() if c["artifact_dir"] and
                   Path(c["artifact_dir"]).resolve() == Path(config.student_dir).resolve()]
        parent = matches[-1]["id"] if matches else parent
    candidate_id = store.upsert_candidate(
        name=f"distilled {name}", kind="distilled", model_spec=teacher_loaded.spec.raw,
        weights_hash=teacher_loaded.weights_hash, code_version=__version__, plan=plan_dict, calibration=calibration,
        parent_id=parent, artifact_dir=str(out))
    # The Pareto plots need a size for every candidate; without this record the student is "not plotted".
    size = student_size(store, student, parent, recovered=bool(config.student_dir))
    store.add_result("size", _provenance(teacher_loaded, plan_dict, None, None),
                     {**size, "figure_key": size_key(teacher_loaded, plan_dict)}, job_id=job_id,
                     candidate_id=candidate_id)
    result = {"candidate_id": candidate_id, "parent_id": parent, "student_dir": str(out), "slices": {}}
    if not evaluate_at_end or not slice_infos:
        return result
    ids = [s.id for s in slice_infos]
    reference = reference_results(store, teacher_loaded, ids, budget,
                                  progress=lambda f, m="": progress(0.87 + 0.05 * f, f"teacher {m}"))
    results = evaluate(student, teacher_loaded.tokenizer, slice_infos, budget, reference=teacher_loaded.model,
                       reference_results=reference, progress=lambda f, m="": progress(0.92 + 0.07 * f, f"student {m}"))
    for info, item in zip(slice_infos, results):
        store.add_result("eval", _provenance(teacher_loaded, plan_dict, item.slice, budget),
                         eval_payload(teacher_loaded, info, item, budget, plan_dict, calibration), job_id=job_id,
                         candidate_id=candidate_id)
        entry = public_entry(item)
        entry["teacher_ppl"] = reference[item.slice].ppl
        result["slices"][item.slice] = entry
    return result


def student_size(store, student, parent_id: int, recovered: bool) -> dict:
    """The student's weight bytes: a recovered candidate's own packed size (training keeps its shapes and its grid),
    else the student's parameters at their dtype, tied weights counted once."""
    parent_sizes = store.results("size", candidate_id=parent_id) if recovered else []
    packed = parent_sizes[0]["payload"] if parent_sizes else {}
    if packed.get("total_packed_bytes") is not None:
        return {**packed, "source": "computed from the packed format of the recovered candidate (same grid, shapes)"}
    dense = sum(p.numel() * p.element_size() for p in {id(p): p for p in student.parameters()}.values())
    return {"total_packed_bytes": dense, "dense_bytes_before": dense,
            "source": "dense weights of the student, computed from its parameters"}


def distill_job(ctx, config: dict, name: str, slices: list[str] | None = None, budget: str | None = None,
                resume: bool = False) -> dict:
    """Job: the Distill page's Start / Resume (a Resume passes no slices: the run keeps its own)."""
    report = run_distill(DistillConfig.from_dict(config), name=name, slices=slices, budget=budget, resume=resume,
                         store=ctx.store, progress=ctx.progress, job_id=ctx.job_id)
    return {k: report.get(k) for k in ("run", "run_id", "step", "finished", "candidate_id", "student_dir")}


def student_saved(directory: Path) -> bool:
    """Whether the run in `directory` has saved its student (what "finished" means on the page and for a resume)."""
    return (Path(directory) / "student" / "config.json").is_file()


def read_run(name: str) -> dict | None:
    """One run's state on disk: config, store run id, step of the last checkpoint, whether the student was saved."""
    run = run_dir(name)
    if not (run / "config.json").is_file():
        return None
    info = json.loads((run / "run.json").read_text()) if (run / "run.json").is_file() else {}
    return {"name": name, "config": json.loads((run / "config.json").read_text()), "run_id": info.get("run_id"),
            "dropped": info.get("dropped"), "checkpoint_step": checkpoint_step(run),
            "student_params": info.get("student_params"), "device": info.get("device"),
            "finished": student_saved(run), "jobs": info.get("jobs", [])}


def list_runs() -> list[dict]:
    """Runs on disk, newest first (see `read_run`)."""
    paths = sorted((shrink_home() / "distill").glob("*/config.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    return [run for run in (read_run(p.parent.name) for p in paths if SAFE_NAME.fullmatch(p.parent.name))
            if run is not None]


def teacher_config(spec: str, store=None):
    """The teacher's transformers config without loading its weights: from a model directory, or the directory the
    store recorded when the model was loaded. None when neither is known."""
    from transformers import AutoConfig

    directory = Path(spec).expanduser() if not spec.startswith("builtin:") else None
    if directory is None or not (directory / "config.json").is_file():
        described = store.latest_model(spec) if store is not None else None
        directory = Path(described["source_dir"]) if described and described.get("source_dir") else None
    if directory is None or not (directory / "config.json").is_file():
        return None
    return AutoConfig.from_pretrained(str(directory), local_files_only=True)


def latest_job(store, run_name: str):
    """The newest distill job of this run (any status), if any: after an app restart it still says why a run stopped."""
    from shrink_core.runtime import jobs

    return next((j for j in jobs.list_jobs(store, "distill") if j.params.get("name") == run_name), None)


def active_job(store, run_name: str):
    """The queued or running distill job of this run, if any."""
    from shrink_core.runtime import jobs

    return next((j for j in jobs.list_jobs(store, "distill") if j.active and j.params.get("name") == run_name), None)
