"""Distillation units on the tiny model: block influence, student construction, losses, schedule, exact resume."""
from pathlib import Path

import pytest
import torch

from shrink_core.distill import DistillConfig, block_influence, build_student, lowest_influence, projected_shape
from shrink_core.distill.config import parse_drop_blocks
from shrink_core.distill.student import kept_blocks, parameter_count
from shrink_core.distill.train import batch_indices, kl_loss, load_checkpoint_, lr_factor, make_state, train_
from shrink_core.errors import ShrinkError
from shrink_core.model.toy import tiny_llama


def identity_block_(model, index):
    """Zero a block's output projections: its residual branches add nothing, so output == input."""
    layer = model.model.layers[index]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


def sharp_teacher(layers=4):
    """A tiny teacher with peaked logits (scaled embedding), so KL to a student starts well above zero."""
    teacher = tiny_llama(vocab=258, layers=layers)
    with torch.no_grad():
        teacher.model.embed_tokens.weight.mul_(8)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def config(**overrides):
    base = dict(teacher="toy", seq_len=32, batch_size=2, pool_sequences=16, heldout_sequences=2, steps=12, lr=3e-3,
                warmup_steps=2, checkpoint_every=5, eval_every=4, mix=(("toy_en", 1.0),))
    return DistillConfig(**{**base, **overrides})


def test_block_influence_ranks_an_identity_block_lowest():
    model = tiny_llama(vocab=258, layers=4)
    identity_block_(model, 2)
    influence = block_influence(model, torch.randint(0, 256, (4, 24)), batch_size=2)
    assert len(influence) == 4
    assert influence[2] < 1e-6 and min(influence[i] for i in (1, 3)) > 1e-3
    assert lowest_influence(influence, 1) == (2,)
    assert 0 not in lowest_influence(influence, 3)  # block 0 is kept by default


def test_student_removes_the_right_blocks_and_keeps_teacher_weights():
    teacher = tiny_llama(vocab=258, layers=4)
    student, plan = build_student(teacher, (1, 2))
    assert len(student.model.layers) == 2 and len(teacher.model.layers) == 4
    assert plan["rules"][0]["blocks"] == [1, 2]
    for position, original in enumerate(kept_blocks(4, (1, 2))):  # student block 0 = teacher 0, 1 = teacher 3
        s_state = student.model.layers[position].state_dict()
        t_state = teacher.model.layers[original].state_dict()
        assert all(torch.equal(s_state[k], t_state[k]) for k in t_state)
        assert student.model.layers[position].self_attn.layer_idx == position
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert student.model.embed_tokens.weight.data_ptr() != teacher.model.embed_tokens.weight.data_ptr()
    tokens = torch.randint(0, 256, (1, 8))
    assert student(tokens).logits.shape == (1, 8, 258)


def test_projected_shape_matches_the_built_student():
    teacher = tiny_llama(vocab=258, layers=4)
    student, _ = build_student(teacher, (0, 3), mlp_prune=0.5)
    projected = projected_shape(teacher.config, (0, 3), 0.5)
    assert projected["params"] == parameter_count(student)
    assert projected["blocks"] == 2 and "projected" in projected["source"]


def test_bad_students_are_refused_with_one_sentence():
    teacher = tiny_llama(vocab=258, layers=3)
    with pytest.raises(ShrinkError, match="Block 7 does not exist"):
        build_student(teacher, (7,))
    with pytest.raises(ShrinkError, match="Cannot drop 3 of 3"):
        lowest_influence([0.1, 0.2, 0.3], 3)
    with pytest.raises(ShrinkError, match="either explicit blocks"):
        DistillConfig(drop_blocks=(1,), drop_count=2)
    with pytest.raises(ShrinkError, match="version 9"):
        DistillConfig(version=9)
    assert parse_drop_blocks("10") == ((), 10) and parse_drop_blocks("3,5,7") == ((3, 5, 7), 0)


def test_config_round_trips_and_rejects_unknown_keys():
    cfg = config(drop_blocks=(1, 2))
    assert DistillConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ShrinkError, match="Unknown key 'stepz'"):
        DistillConfig.from_dict({"stepz": 3})


def test_losses_and_schedule_math():
    logits = torch.randn(2, 5, 11)
    assert kl_loss(logits, logits, 2.0).abs() < 1e-6
    assert kl_loss(torch.zeros(2, 5, 11), logits, 1.0) > 0
    assert lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert torch.equal(batch_indices(3, 7, 16, 4), batch_indices(3, 7, 16, 4))
    assert not torch.equal(batch_indices(3, 7, 16, 4), batch_indices(3, 8, 16, 4))


def test_loss_decreases_over_a_few_steps():
    torch.manual_seed(0)
    teacher = sharp_teacher()
    student, _ = build_student(teacher, (1, 2))
    pool, heldout = torch.randint(0, 256, (16, 32)), torch.randint(0, 256, (2, 32))
    cfg = config(steps=30, eval_every=10)
    log = []
    train_(make_state(student, cfg), teacher, pool, heldout, cfg, on_metrics=lambda s, v: log.append(v))
    first = sum(v["train_loss"] for v in log[:3]) / 3
    last = sum(v["train_loss"] for v in log[-3:]) / 3
    assert last < 0.8 * first
    held = [v["heldout_loss"] for v in log if "heldout_loss" in v]
    assert len(held) == 3 and held[-1] < held[0]


def _fresh(cfg):
    torch.manual_seed(0)
    teacher = sharp_teacher()
    student, _ = build_student(teacher, (1,))
    return teacher, make_state(student, cfg)


def test_resume_after_interruption_is_bit_identical(tmp_path):
    cfg = config(steps=12, checkpoint_every=5)
    pool, heldout = torch.randint(0, 256, (16, 32), generator=torch.Generator().manual_seed(1)), \
        torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))
    teacher, straight = _fresh(cfg)
    train_(straight, teacher, pool, heldout, cfg)

    teacher, interrupted = _fresh(cfg)
    train_(interrupted, teacher, pool, heldout, cfg, checkpoint_dir=tmp_path, stop_after=7)  # "killed" after step 7
    assert interrupted.step == 7
    teacher, resumed = _fresh(cfg)
    torch.manual_seed(123)  # a restarted process has another RNG state; the checkpoint restores it
    load_checkpoint_(resumed, tmp_path)
    assert resumed.step == 5  # the last checkpoint, not the last step done
    train_(resumed, teacher, pool, heldout, cfg, checkpoint_dir=tmp_path)
    assert resumed.step == 12
    final, expected = resumed.student.state_dict(), straight.student.state_dict()
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    assert resumed.scheduler.last_epoch == straight.scheduler.last_epoch


class _Planted:
    """Unpickling this calls Path.touch: a stand-in for a checkpoint file someone replaced to run their code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_planted_checkpoint_is_refused_and_runs_nothing(tmp_path):
    from shrink_core.distill.train import CHECKPOINT, save_checkpoint

    cfg = config()
    _, state = _fresh(cfg)
    save_checkpoint(state, tmp_path, cfg)  # a real checkpoint loads under the restricted loader
    load_checkpoint_(state, tmp_path)
    marker = tmp_path / "ran"
    payload = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    torch.save({**payload, "extra": _Planted(marker)}, tmp_path / CHECKPOINT)
    with pytest.raises(ShrinkError, match="not loaded; delete it") as info:
        load_checkpoint_(state, tmp_path)
    assert str(tmp_path / CHECKPOINT) in str(info.value)
    assert not marker.exists()


def test_a_checkpoint_never_holds_a_step_whose_metrics_were_not_logged(tmp_path):
    """A kill can land anywhere in a step; here, in the metrics callback of a checkpoint step (before it logs). The
    checkpoint the run resumes from must not be past the last logged step, or that step's metrics are lost for good
    (seen in the browser test: steps 1-7 and 9-18 logged, 8 missing)."""
    from shrink_core.distill.train import checkpoint_step

    cfg = config(steps=8, checkpoint_every=2)
    pool, heldout = torch.randint(0, 256, (16, 32)), torch.randint(0, 256, (2, 32))
    teacher, state = _fresh(cfg)
    logged = []

    def log_until_killed(step, values):
        if step == 4:
            raise KeyboardInterrupt("killed")
        logged.append(step)

    with pytest.raises(KeyboardInterrupt):
        train_(state, teacher, pool, heldout, cfg, checkpoint_dir=tmp_path, on_metrics=log_until_killed)
    assert logged == [1, 2, 3]
    assert checkpoint_step(tmp_path) == 2  # resumes at 2: steps 3-4 are done (and logged) again


def test_quantized_student_trains_straight_through_and_ends_on_its_grid():
    from shrink_core.compression.apply import apply_plan_
    from shrink_core.distill.student import attach_straight_through_, detach_straight_through_
    from shrink_core.plan import load_plan, plan_to_dict

    teacher = sharp_teacher(layers=2)
    student = tiny_llama(vocab=258, layers=2)
    plan = load_plan("version: 1\nrules:\n- kind: [q, k, v, o, gate, up, down]\n  weights: {bits: 4, group_size: 32}\n")
    apply_plan_(student, plan)
    for p in student.parameters():
        p.requires_grad_(True)
    assert attach_straight_through_(student, plan_to_dict(plan)) == 14
    before = student.model.layers[0].mlp.up_proj.parametrizations.weight.original.detach().clone()
    cfg = config(steps=5)
    train_(make_state(student, cfg), teacher, torch.randint(0, 256, (16, 32)), torch.randint(0, 256, (2, 32)), cfg)
    after = student.model.layers[0].mlp.up_proj.parametrizations.weight.original.detach()
    assert not torch.equal(before, after)  # the float weights behind the grid were trained
    detach_straight_through_(student)
    weight = student.model.layers[0].mlp.up_proj.weight.detach()  # (out, in), groups of 32 columns
    distinct = [torch.unique(group).numel() for group in weight.reshape(weight.shape[0], -1, 32).flatten(0, 1)]
    assert max(distinct) <= 16  # 4 bits: at most 16 levels per group
