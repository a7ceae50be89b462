"""One model's description (summary + inventory + provenance), shared by the CLI, the jobs and the pages."""
from __future__ import annotations

import platform

from shrink_core import __version__
from shrink_core.model.inventory import inventory, summary
from shrink_core.model.load import load


def device_label(model=None) -> str:
    """Where and in what dtype figures were computed: part of every result's provenance, shown beside the figure."""
    import torch

    if model is None:
        return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__})"
    weight = next(model.parameters())
    dtype = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(weight.dtype, str(weight.dtype))
    where = str(weight.device)  # cuda:1, not only cuda: which GPU it ran on
    detail = (torch.cuda.get_device_name(weight.device) if weight.device.type == "cuda"
              else f"{platform.machine()}, {torch.get_num_threads()} threads")
    return f"{where} {dtype} ({detail}, torch {torch.__version__})"


def describe(spec: str, *, allow_pickle: bool = False, trust_remote_code: bool = False, progress=None) -> dict:
    kwargs = {"progress": progress} if progress else {}
    loaded = load(spec, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, **kwargs)
    rows = inventory(loaded.model)
    return {
        "spec": loaded.spec.raw,
        "source_dir": str(loaded.source_dir),
        "weights_hash": loaded.weights_hash,
        "load_seconds": round(loaded.load_seconds, 3),
        "from_cache": loaded.from_cache,
        "notes": loaded.notes,
        "code_version": __version__,
        "device": device_label(loaded.model),
        "summary": summary(loaded.model, rows),
        "modules": [r.row() for r in rows],
    }


def describe_job(ctx, spec: str, allow_pickle: bool = False, trust_remote_code: bool = False) -> dict:
    """Job: load a model, store its summary and inventory; the Model page reads them from the store."""
    description = describe(
        spec, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, progress=ctx.progress
    )
    model_id = ctx.store.save_model(description)
    return {"model_id": model_id, "spec": description["spec"], "load_seconds": description["load_seconds"],
            "from_cache": description["from_cache"]}
