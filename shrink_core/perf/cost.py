"""Cost: dollars per million tokens from throughput and an hourly price, with the assumptions spelled out."""
from __future__ import annotations

from dataclasses import dataclass


def dollars_per_million(price_per_hour: float, tokens_per_s: float, utilisation: float = 1.0) -> float:
    """price / (tokens per busy hour) * 1e6; utilisation is the share of paid hours spent serving."""
    if tokens_per_s <= 0 or not 0 < utilisation <= 1:
        raise ValueError("tokens_per_s must be positive and utilisation a share in (0, 1].")
    return price_per_hour / (tokens_per_s * 3600 * utilisation) * 1e6


@dataclass(frozen=True)
class CostEstimate:
    target: str
    basis: str  # "measured" | "projected": where the throughput came from
    price_per_hour: float
    batch: int
    utilisation: float
    input_tokens_per_s: float  # prefill throughput
    output_tokens_per_s: float  # decode throughput (all sequences of the batch)
    input_dollars_per_million: float
    output_dollars_per_million: float
    assumptions: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"kind": self.basis, "target": self.target, "price_per_hour": self.price_per_hour, "batch": self.batch,
                "utilisation": self.utilisation, "input_tokens_per_s": round(self.input_tokens_per_s, 2),
                "output_tokens_per_s": round(self.output_tokens_per_s, 2),
                "input_dollars_per_million": round(self.input_dollars_per_million, 6),
                "output_dollars_per_million": round(self.output_dollars_per_million, 6),
                "assumptions": list(self.assumptions)}


def cost_estimate(target: str, price_per_hour: float, prefill_tokens_per_s: float, decode_tokens_per_s: float,
                  batch: int, basis: str, utilisation: float = 0.5) -> CostEstimate:
    """Input tokens are priced at prefill throughput, output tokens at decode throughput, each as if alone."""
    if basis not in ("measured", "projected"):
        raise ValueError("basis must be 'measured' or 'projected'.")
    assumptions = (
        f"${price_per_hour:.3f} per hour for {target} (editable hardware table)",
        f"{utilisation:.0%} of paid hours serve requests",
        f"batch {batch}; throughput {basis}",
        "input priced at prefill throughput, output at decode throughput, each alone (no overlap)",
    )
    return CostEstimate(
        target=target, basis=basis, price_per_hour=price_per_hour, batch=batch, utilisation=utilisation,
        input_tokens_per_s=prefill_tokens_per_s, output_tokens_per_s=decode_tokens_per_s,
        input_dollars_per_million=dollars_per_million(price_per_hour, prefill_tokens_per_s, utilisation),
        output_dollars_per_million=dollars_per_million(price_per_hour, decode_tokens_per_s, utilisation),
        assumptions=assumptions,
    )
