"""DistillConfig: everything a distillation run depends on, frozen and versioned (the checkpoint records it)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from shrink_core.errors import ShrinkError

CONFIG_VERSION = 1
DEVICES = ("cpu", "cuda", "auto")


@dataclass(frozen=True)
class DistillConfig:
    """A run: teacher, student shape (or a stored candidate), data mix, optimisation and loss weights."""

    teacher: str = "builtin:smollm2-135m"
    drop_blocks: tuple[int, ...] = ()  # explicit block indices removed from the teacher
    drop_count: int = 0  # or: remove this many blocks with the lowest block influence (measured on calibration data)
    mlp_prune: float = 0.0  # share of MLP channels removed in every kept block (structured width pruning)
    student_dir: str | None = None  # a stored candidate directory to recover instead of a teacher-derived student
    mix: tuple[tuple[str, float], ...] = (("en", 1.0),)  # calibration mix (calibration rows only)
    seq_len: int = 256
    batch_size: int = 4
    pool_sequences: int = 256  # training windows drawn from the calibration mix
    heldout_sequences: int = 8  # windows kept apart from the training pool (never trained on)
    steps: int = 200
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0
    temperature: float = 2.0
    kl_weight: float = 1.0
    ce_weight: float = 0.0  # plain next-token loss on the data
    hidden_weight: float = 0.0  # MSE between aligned student / teacher hidden states
    seed: int = 0
    checkpoint_every: int = 50
    eval_every: int = 10  # held-out loss every N steps
    device: str = "cpu"  # "cpu", "cuda" or "auto" (cuda when available)
    version: int = CONFIG_VERSION

    def __post_init__(self):
        if self.version != CONFIG_VERSION:
            raise ShrinkError(f"DistillConfig version {self.version} is not supported; this code reads {CONFIG_VERSION}.")
        if self.device not in DEVICES:
            raise ShrinkError(f"device '{self.device}' is unknown; use one of {', '.join(DEVICES)}.")
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 8:
            raise ShrinkError("A distillation run needs steps >= 1, batch_size >= 1 and seq_len >= 8.")
        if self.pool_sequences < self.batch_size:
            raise ShrinkError(f"pool_sequences ({self.pool_sequences}) must be at least batch_size ({self.batch_size}).")
        if self.heldout_sequences < 1:
            raise ShrinkError("heldout_sequences must be at least 1 (the held-out loss needs a batch).")
        if not self.lr > 0 or self.temperature <= 0:
            raise ShrinkError("lr and temperature must be positive.")
        if not 0 <= self.mlp_prune < 1:
            raise ShrinkError(f"mlp_prune must be a share in [0, 1), not {self.mlp_prune}.")
        if min(self.kl_weight, self.ce_weight, self.hidden_weight) < 0 or \
                self.kl_weight + self.ce_weight + self.hidden_weight <= 0:
            raise ShrinkError("Loss weights must be non-negative and at least one must be positive.")
        if self.drop_blocks and self.drop_count:
            raise ShrinkError("Give either explicit blocks to drop or a count chosen by block influence, not both.")
        if self.student_dir and (self.drop_blocks or self.drop_count or self.mlp_prune):
            raise ShrinkError("A stored candidate is used as it is; drop blocks or prune width only on a teacher-derived "
                              "student.")
        if not self.mix or any(w <= 0 for _, w in self.mix):
            raise ShrinkError("The data mix needs at least one slice with a positive weight, e.g. en=1.")
        if self.checkpoint_every < 1 or self.eval_every < 1:
            raise ShrinkError("checkpoint_every and eval_every must be at least 1.")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["drop_blocks"] = list(self.drop_blocks)
        data["mix"] = dict(self.mix)
        return data

    @staticmethod
    def from_dict(data: dict) -> DistillConfig:
        allowed = {f.name for f in fields(DistillConfig)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ShrinkError(f"Unknown key '{unknown[0]}' in the distillation config; allowed: {', '.join(sorted(allowed))}.")
        data = dict(data)
        if "drop_blocks" in data:
            data["drop_blocks"] = tuple(int(b) for b in data["drop_blocks"])
        if isinstance(data.get("mix"), dict):
            data["mix"] = tuple((k, float(v)) for k, v in data["mix"].items())
        elif "mix" in data:
            data["mix"] = tuple((k, float(v)) for k, v in data["mix"])
        return DistillConfig(**data)


def parse_drop_blocks(text: str) -> tuple[tuple[int, ...], int]:
    """'10' -> drop 10 blocks chosen by influence; '3,5,7' -> drop exactly those blocks. Returns (blocks, count)."""
    text = (text or "").strip()
    if not text:
        return (), 0
    try:
        if "," in text:
            return tuple(sorted({int(p) for p in text.split(",") if p.strip()})), 0
        return (), int(text)
    except ValueError:
        raise ShrinkError(f"--drop-blocks '{text}' is neither a count (10) nor a list of block indices (3,5,7).") from None


def parse_mix(text: str) -> tuple[tuple[str, float], ...]:
    from shrink_core.evaluation.calibration import CalibrationRecipe

    return CalibrationRecipe.parse(text).mix
