"""The plan's `tune: scales` (compression/tune.py): the group scales trained end to end lower the quantized model's KL
to the unquantized one on rows it did not train on, the codes and zeros stay, the packed artifact holds exactly the
tuned weights (rotated or not), and bad settings are refused in one sentence."""
import copy

import pytest
import torch

from shrink_core.compression import apply as apply_module
from shrink_core.compression.apply import _tuning_note, apply_plan_
from shrink_core.compression.ct_export import compressed_state_dict
from shrink_core.compression.export import packed_tensors
from shrink_core.compression.primitives import dequantize, unpack
from shrink_core.compression.tune import auto_lr, split_rows, token_kl
from shrink_core.errors import ShrinkError
from shrink_core.model.toy import FAMILIES, tiny_family, tiny_llama
from shrink_core.plan import dump_plan, load_plan
from shrink_core.plan.spec import PlanError, TuneSpec, plan_to_dict
from shrink_core.results.candidates import plan_lines, plan_summary

LINEARS = "[q, k, v, o, gate, up, down]"
CALIBRATION = torch.randint(0, 256, (12, 24), generator=torch.Generator().manual_seed(7))


def plan_text(tune: str = "tune: {steps: 40, lr: 0.01, holdout: 4}\n", extra: str = "", method: str = "rtn") -> str:
    return (f"version: 1\n{tune}{extra}rules:\n"
            f"- {{kind: {LINEARS}, weights: {{bits: 3, group_size: 32, method: {method}}}}}\n")


def kl_to(reference, model, ids) -> float:
    with torch.no_grad():
        return token_kl(reference(input_ids=ids).logits, model(input_ids=ids).logits).item()


def quantized(text: str, seed: int = 2):
    reference = tiny_llama(seed=seed).eval()
    model = copy.deepcopy(reference)
    report = apply_plan_(model, load_plan(text), CALIBRATION)
    return reference, model, report


@pytest.mark.parametrize("rotate", ["", "rotate: hadamard\n"])
def test_tuned_scales_lower_the_kl_on_rows_not_trained_on_and_keep_codes_and_zeros(rotate):
    reference, plain, plain_report = quantized(plan_text(tune="", extra=rotate))
    _, tuned, report = quantized(plan_text(extra=rotate))
    unseen = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(99))
    assert report.tuning["kept"] and report.tuning["modules"] == 21
    assert report.tuning["held_kl_end"] < report.tuning["held_kl_start"]
    assert kl_to(reference, tuned, unseen) < 0.9 * kl_to(reference, plain, unseen)
    assert "tune_s" in report.timings and any("tuned end to end" in note for note in report.notes)
    changed = 0
    for name, state in report.quant_states.items():
        before = plain_report.quant_states[name]
        assert torch.equal(state.zero, before.zero)
        assert torch.equal(state.scale, state.scale.half().float())  # what the packed format stores
        assert state.rotation == before.rotation
        changed += int(not torch.equal(state.scale, before.scale))
        for model, st in ((tuned, state), (plain, before)):  # the same codes under each model's own grid
            weight = model.get_submodule(name).weight.detach()
            basis = weight if st.rotation is None else st.rotation.apply(weight)
            codes = (basis.reshape(weight.shape[0], -1, 32) / st.scale[..., None] + st.zero[..., None]).round()
            if model is tuned:
                tuned_codes = codes
            else:
                assert torch.equal(tuned_codes, codes)
    assert changed == 21


def test_without_an_lr_each_module_steps_by_its_bit_width():
    assert auto_lr(2) == auto_lr(3) == 2e-3 and auto_lr(4) == auto_lr(8) == 5e-4
    text = ("version: 1\ntune: {steps: 30, holdout: 4}\nrules:\n"
            "- {kind: [q, k, v], weights: {bits: 3, group_size: 32, method: rtn}}\n"
            "- {kind: [o, gate, up, down], weights: {bits: 4, group_size: 32, method: rtn}}\n")
    _, plain, plain_report = quantized(text.replace("tune: {steps: 30, holdout: 4}\n", ""))
    _, _, report = quantized(text)
    assert report.tuning["lr"] == [[2e-3, 9], [5e-4, 12]]
    assert "at lr 0.002 for 9, 0.0005 for 12 against" in _tuning_note(report.tuning)

    def moved(bits):  # mean |log| change of the scales of the modules at `bits`
        return torch.cat([(s.scale / plain_report.quant_states[n].scale).log().abs().flatten()
                          for n, s in report.quant_states.items() if s.bits == bits]).mean()
    assert moved(4) < 0.5 * moved(3)
    _, _, fixed = quantized(plan_text())
    assert fixed.tuning["lr"] == [[0.01, 21]] and "at lr 0.01 against" in _tuning_note(fixed.tuning)


def test_the_packed_artifact_holds_the_tuned_weights():
    _, model, report = quantized(plan_text(extra="rotate: hadamard\n"))
    tensors, _ = packed_tensors(model, report)
    for name, state in report.quant_states.items():
        weight = model.get_submodule(name).weight.detach()
        codes = unpack(tensors[f"{name}.weight.codes"], state.bits, weight.shape[1])
        zeros = tensors[f"{name}.weight.zeros"].float()
        decoded = dequantize(codes, tensors[f"{name}.weight.scales"].float(), zeros, state.group_size)
        assert torch.allclose(state.rotation.invert(decoded), weight, atol=1e-5)


def test_a_tuned_int4_plan_exports_to_compressed_tensors_exactly():
    text = plan_text().replace("bits: 3", "bits: 4")
    _, model, report = quantized(text)
    assert report.tuning["kept"]
    _, schemes, deviation = compressed_state_dict(model, report)
    assert len(schemes) == 21 and max(deviation.values()) == 0.0  # the tuned scales are the ones written


def test_the_weights_are_left_as_quantized_when_the_held_out_kl_does_not_fall(monkeypatch):
    _, plain, _ = quantized(plan_text(tune=""))
    monkeypatch.setattr(apply_module, "tune_scales_", _never_better(apply_module.tune_scales_))
    _, model, report = quantized(plan_text())
    assert not report.tuning["kept"]
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), model.state_dict().values()))
    assert "left as quantized" in _tuning_note(report.tuning)


def _never_better(tune):
    """tune_scales_ whose held-out check always says 'worse' (the KL it measures after is made to rise)."""
    def wrapped(model, reference, targets, calibration, spec, **kw):
        import shrink_core.compression.tune as tune_module

        real = tune_module.token_kl
        calls = {"n": 0}

        def rising(ref_logits, logits):
            calls["n"] += 1
            return real(ref_logits, logits) + calls["n"]  # later calls, the last check included, read higher
        tune_module.token_kl = rising
        try:
            return tune(model, reference, targets, calibration, spec, **kw)
        finally:
            tune_module.token_kl = real
    return wrapped


def test_the_plan_reads_writes_and_refuses_tune():
    plan = load_plan(plan_text(tune="tune: scales\n"))
    assert plan.tune == TuneSpec() and plan.needs_calibration  # rtn alone needs none; tune does
    assert load_plan(dump_plan(plan)) == plan
    assert "tune: {kind: scales, steps: 100" in dump_plan(plan)
    stored = plan_to_dict(plan)
    assert plan_summary(stored).endswith("; scales tuned end to end (100 steps)")
    assert plan_lines(stored)[-1] == "scales tuned end to end (100 steps)"
    assert "scales tuned" not in plan_summary(plan_to_dict(load_plan(plan_text(tune=""))))
    for bad, said in (("tune: weights\n", "kind 'weights' is unknown; use scales"),
                      ("tune: {steps: 0}\n", "steps must be a whole number >= 1, not 0"),
                      ("tune: {lr: 2}\n", "lr must be a number above 0 and at most 0.1, not 2; leave it out"),
                      ("tune: {epochs: 3}\n", "Unknown key 'epochs' in the plan's tune")):
        with pytest.raises(PlanError, match=said):
            load_plan(plan_text(tune=bad))


def test_tune_refuses_what_it_cannot_do_in_one_sentence(monkeypatch):
    model = tiny_llama(seed=2)
    with pytest.raises(ShrinkError, match="needs calibration tokens"):
        apply_plan_(model, load_plan(plan_text()), None)
    with pytest.raises(ShrinkError, match="holdout 12 leaves none of the 12 calibration rows"):
        apply_plan_(model, load_plan(plan_text(tune="tune: {holdout: 12}\n")), CALIBRATION)
    monkeypatch.setattr(apply_module, "onload_for", lambda model, onload: torch.device("cpu"))
    with pytest.raises(ShrinkError, match="cannot do; drop --onload, or drop tune"):
        apply_plan_(model, load_plan(plan_text()), CALIBRATION, onload="cuda")
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, tiny_llama(seed=2).model.layers[0].mlp.down_proj.weight)


def test_split_rows_is_a_fixed_random_partition():
    train, held = split_rows(10, 3)
    assert sorted(torch.cat([train, held]).tolist()) == list(range(10)) and len(held) == 3
    assert torch.equal(held, split_rows(10, 3)[1])
    assert held.tolist() != [7, 8, 9]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_tunes_or_says_why_not(family):
    """Plain Linear block linears are tuned; GPT-2's Conv1D and fused experts are left as quantized, and said so."""
    reference = tiny_family(family).eval()
    model = copy.deepcopy(reference)
    text = "version: 1\ntune: {steps: 3, holdout: 1}\nrules:\n- {kind: [q, k, v, qkv, o, gate, up, gate_up, down], " \
           "weights: {bits: 4, group_size: 32, method: rtn}}\n"
    report = apply_plan_(model, load_plan(text), CALIBRATION[:4, :16], reference=reference)
    linear = [n for n in report.quant_states if type(model.get_submodule(n)) is torch.nn.Linear]
    assert report.tuning["modules"] == len(linear)
    if linear:
        assert report.tuning["held_kl_end"] >= 0 and any("tuned end to end" in note for note in report.notes)
    else:
        assert any("no scales to tune" in note for note in report.notes)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=CALIBRATION[:1, :16]).logits).all()

