"""A candidate to measure: the reference model, or the model after a plan (`compression.candidate.from_plan`), with
its storage description."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    name: str
    model: object  # the compressed model (quantize-dequantized floats, pruned shapes)
    bits: dict  # module name -> WeightFormat for modules stored as integer codes
    packed: dict | None  # module name -> packed bytes from the engine's apply report
    sparse: dict  # module name -> "2:4" | "unstructured" for masked modules
    states: dict  # module name -> the engine's QuantState (scale, zero per group): the exact grid
    notes: tuple[str, ...]


def reference(model, name: str = "reference") -> Candidate:
    return Candidate(name, model, {}, None, {}, {}, ())
