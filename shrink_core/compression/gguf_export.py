"""`export --format gguf`: the evaluated candidate as a GGUF file that llama.cpp loads, bit for bit what was scored.

Each module a plan put in a llama.cpp type is written as the very block bytes the engine evaluated (GgmlState);
fp16 modules as F16; everything else as F32 (the reference's values). Modules in the engine's own integer formats
have no exact GGUF type and are refused with the way out. With an importance matrix in the plan, the imatrix file
goes beside the model, so `llama-quantize --imatrix` can be given the same weighting.
"""
from __future__ import annotations

from pathlib import Path

from shrink_core.compression.ggml.gguf_file import GgufTensor, arch_rules, gguf_names, write_gguf
from shrink_core.compression.ggml.imatrix import write_imatrix
from shrink_core.compression.ggml.types import GgmlState
from shrink_core.errors import ShrinkError


def gguf_tensors(model, report) -> dict[str, GgufTensor]:
    """HF parameter name -> what the file stores, from the apply report (names after any block removal)."""
    now = report.current_names or {}
    modules = dict(model.named_modules())
    tensors: dict[str, GgufTensor] = {}
    for name, state in report.quant_states.items():
        name = now.get(name, name)
        weight = modules[name].weight.data
        if getattr(state, "rotation", None) is not None:
            raise ShrinkError(f"{name} was quantized with its input rotated (the plan's rotate), which a GGUF file "
                              "cannot hold; remove rotate from the plan and give it a llama.cpp type to export GGUF.")
        if not isinstance(state, GgmlState):
            other = "" if state.scales != "fp16" else " or export it with --format compressed-tensors"
            raise ShrinkError(f"{name} is in the engine's {state.weight_format().bits}-bit integer format, which no "
                              "GGUF type stores exactly; give it a llama.cpp type in the plan (weights: {ggml: Q4_K})"
                              f"{other}.")
        if state.data is None:  # a row width no block tiles: llama.cpp keeps it in float16
            tensors[f"{name}.weight"] = GgufTensor.floats(weight, "F16")
        else:
            tensors[f"{name}.weight"] = GgufTensor.blocks(state.data, state.stored, tuple(weight.shape))
    for row in report.modules:
        name = now.get(row.name, row.name)
        if row.bits == 16 and f"{name}.weight" not in tensors and name in modules:
            tensors[f"{name}.weight"] = GgufTensor.floats(modules[name].weight.data, "F16")
    return tensors


def write_candidate_gguf(loaded, model, report, path, provenance: dict) -> dict[str, Path]:
    """Write `model` (compressed by `report`) as `path`, plus `<stem>.imatrix.gguf` when the plan used one."""
    path = Path(path)
    source = None
    if loaded.spec.kind in ("builtin", "gguf"):
        from shrink_core.model.load import BUILTINS

        source = BUILTINS[loaded.spec.target].gguf_path() if loaded.spec.kind == "builtin" else Path(loaded.spec.target)
    out = {"gguf": write_gguf(path, model, source_gguf=source, tokenizer_dir=None if source else loaded.source_dir,
                              tensors=gguf_tensors(model, report),
                              provenance={k: str(v) for k, v in provenance.items()})}
    if report.importance:
        text = getattr(model.config, "text_config", None) or model.config
        rules = arch_rules(text.model_type)
        now = report.current_names or {}
        hf = {f"{now.get(n, n)}.weight": value for n, value in report.importance.items()}
        names = gguf_names(rules, hf, int(text.num_hidden_layers))
        entries = {names[h]: value for h, value in hf.items() if names.get(h)}
        recipe = report.calibration or {}
        out["imatrix"] = write_imatrix(path.with_suffix(".imatrix.gguf"), entries,
                                       dataset=f"shrink calibration {recipe}", chunks=int(recipe.get("n_sequences", 0)),
                                       chunk_size=int(recipe.get("seq_len", 0)))
    return out
