"""Tests of helpers.studies.self_repair (statistics on top tokens, anti-erasure neurons)."""

from __future__ import annotations

import pytest
import torch

from helpers.ablation import Head, resample_reference
from helpers.effects import AblationEffects, ablation_effects
from helpers.models import load_model, post_sublayer_norm
from helpers.prompts import tokenize
from helpers.studies.self_repair import (
    cumulative_share,
    head_summary,
    neuron_repair,
    neuron_repair_parts,
    token_effects,
    top_token_mask,
)

TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank today",
    "In 1969 the first humans walked on the surface of the moon and came back",
    "She opened the old wooden box and found a letter from her grandmother inside",
    "Prices rose sharply last year because the supply of grain was very low again",
]


def synthetic_effects() -> AblationEffects:
    """Two components, 1 prompt × 5 positions, the last position invalid."""
    direct = torch.tensor([[[1.0, 4.0, 2.0, 3.0, 99.0]], [[0.5, 0.1, 0.2, 0.3, 99.0]]])
    total = torch.tensor([[[1.0, 1.0, 2.0, -1.0, 0.0]], [[0.5, 0.1, 0.2, 0.3, 0.0]]])
    sr = direct - total
    final_norm = 0.5 * sr
    later_heads = 0.25 * sr
    later_mlps = sr - final_norm - later_heads
    valid = torch.tensor([[True, True, True, True, False]])
    return AblationEffects(components=[Head(3, 1), Head(4, 2)], method="resample", direct=direct, total=total,
                           later_heads=later_heads, later_mlps=later_mlps, final_norm=final_norm, valid=valid,
                           clean_logit=torch.zeros(1, 5))


def test_top_token_mask_picks_largest_valid_tokens():
    effects = synthetic_effects()
    mask = top_token_mask(effects.direct, effects.valid, fraction=0.5)  # 2 of 4 valid tokens
    assert mask.sum(dim=(1, 2)).tolist() == [2, 2]
    assert mask[0, 0].tolist() == [False, True, False, True, False]  # 4.0 and 3.0, not the invalid 99
    assert mask[1, 0].tolist() == [True, False, False, True, False]
    # at least one token even for tiny fractions
    assert top_token_mask(effects.direct, effects.valid, fraction=1e-6).sum(dim=(1, 2)).tolist() == [1, 1]


def test_top_token_mask_bad_input():
    effects = synthetic_effects()
    with pytest.raises(ValueError, match="fraction"):
        top_token_mask(effects.direct, effects.valid, fraction=0)
    with pytest.raises(ValueError, match="expected"):
        top_token_mask(effects.direct, effects.valid[:, :3])
    with pytest.raises(ValueError, match="No valid"):
        top_token_mask(effects.direct, torch.zeros_like(effects.valid))


def test_head_summary_statistics():
    effects = synthetic_effects()
    frame = head_summary(effects, fraction=0.5).set_index("component")
    row = frame.loc["L3H1"]  # tokens with DE 4 (TE 1) and 3 (TE −1)
    assert row["direct"] == pytest.approx(3.5)
    assert row["total"] == pytest.approx(0.0)
    assert row["self_repair"] == pytest.approx(3.5)
    assert row["logit_change"] == pytest.approx(0.0)
    assert row["final_norm"] == pytest.approx(1.75)
    assert row["ln_share"] == pytest.approx(0.5)
    assert row["overcorrect_frac"] == pytest.approx(0.5)
    assert row["self_repair_std"] == pytest.approx(0.5)  # SR 3 and 4
    assert row["later_heads"] + row["later_mlps"] + row["final_norm"] == pytest.approx(row["self_repair"])
    other = frame.loc["L4H2"]
    assert other["self_repair"] == pytest.approx(0.0) and other["overcorrect_frac"] == 0.0
    tokens = token_effects(effects, Head(3, 1), fraction=0.5)
    assert sorted(tokens["pos"]) == [1, 3] and sorted(tokens["direct"]) == [3.0, 4.0]


def test_ln_share_is_clipped():
    effects = synthetic_effects()
    effects.final_norm = 10 * effects.direct
    frame = head_summary(effects, fraction=0.5)
    assert (frame["ln_share"] > 1).all() and (frame["ln_share_clipped"] == 1).all()


def test_cumulative_share():
    shares = cumulative_share(torch.tensor([3.0, -1.0, 1.0, 0.0]), [1, 2, 4])
    assert shares[1] == pytest.approx(0.75) and shares[2] == pytest.approx(1.0) and shares[4] == pytest.approx(1.0)
    assert torch.isnan(torch.tensor(cumulative_share(torch.tensor([-1.0, -2.0]), [1])[1]))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-gemma3"])
def test_neuron_repair_adds_up_to_each_mlp_layers_change(name):
    """Independent check: the neurons' changes summed per layer = that MLP layer's change of direct
    effect from helpers.effects (computed from hook_mlp_out, not from neurons)."""
    model = load_model(name, device="cpu")
    batch = tokenize(model, TEXTS)
    batch = batch[:, -int(batch.lengths.min()):]
    head = Head(0, 1)
    effects = ablation_effects(model, batch, [head], method="resample", seed=2, keep_per_layer=True, progress=False)
    mask = top_token_mask(effects.direct, effects.valid, fraction=0.2)[0]
    per_neuron = neuron_repair(model, batch, head, mask, reference=resample_reference(batch, seed=2))
    parts, rescale = neuron_repair_parts(model, batch, head, mask, reference=resample_reference(batch, seed=2))
    torch.testing.assert_close(parts, per_neuron)
    expected = (effects.per_layer_mlp[0] * mask).sum((-2, -1)) / mask.sum()
    # the neurons, plus (Gemma-3 layout) the post-feedforward norm's rescaling of the clean MLP output
    torch.testing.assert_close(per_neuron.sum(-1) + rescale, expected, atol=1e-5, rtol=1e-4)
    if post_sublayer_norm(model, 0, "mlp") is None:
        assert not rescale.any()
    assert per_neuron.abs().sum() > 0
    with pytest.raises(ValueError, match="token_mask"):
        neuron_repair(model, batch, head, mask[:, :2])
