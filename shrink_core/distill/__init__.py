"""Distillation: teacher -> smaller student (blocks dropped by influence, width pruned) or recovery of a candidate.

- `config.DistillConfig`: the frozen, versioned run config.
- `student`: block influence, student construction, projected shape, straight-through fake-quant for quantized students.
- `train`: losses (pure), schedule, data order as a pure function of (seed, step), checkpoints, the loop.
- `run`: a run end to end (also as the `distill_job` background job); see docs/distill.md.
"""
from shrink_core.distill.config import DistillConfig, parse_drop_blocks, parse_mix
from shrink_core.distill.student import block_influence, build_student, lowest_influence, parameter_count, projected_shape

__all__ = ["DistillConfig", "block_influence", "build_student", "lowest_influence", "parameter_count",
           "parse_drop_blocks", "parse_mix", "projected_shape"]
