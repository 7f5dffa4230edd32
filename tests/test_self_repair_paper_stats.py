"""Tests of the official code's statistics in helpers.studies.self_repair: the clean direct effect,
the two final-norm shares, and the per-token anti-erasure sparsity."""

from __future__ import annotations

import pytest
import torch

from helpers.ablation import Head, resample_reference
from helpers.effects import ablation_effects
from helpers.prompts import tokenize
from helpers.studies.self_repair import (
    clean_direct_effects,
    head_summary,
    ln_share_of_means,
    ln_share_per_token,
    neuron_repair,
    neuron_repair_tokens,
    top_neuron_share,
    top_token_mask,
)

from tests.test_self_repair import TEXTS, synthetic_effects


def share_inputs():
    """Two components, 1 prompt × 4 tokens; the last token is outside the mask."""
    direct = torch.tensor([[[2.0, 2.0, 1.0, 5.0]], [[1.0, 1.0, 0.0, 5.0]]])
    final_norm = torch.tensor([[[1.0, 3.0, 0.5, 100.0]], [[-1.0, 1.0, 0.0, 100.0]]])
    mask = torch.tensor([[[True, True, True, False]], [[True, True, True, False]]])
    return final_norm, direct, mask


def test_ln_share_per_token_clips_each_token_then_averages():
    final_norm, direct, mask = share_inputs()
    # component 0: clip(0.5), clip(1.5) = 1, clip(0.5) -> mean 2/3
    # component 1: clip(-1) = 0, 1, and 0/0 = NaN skipped -> mean 0.5
    torch.testing.assert_close(ln_share_per_token(final_norm, direct, mask), torch.tensor([2 / 3, 0.5]))


def test_ln_share_of_means_divides_the_means_then_clips():
    final_norm, direct, mask = share_inputs()
    # component 0: mean fn 1.5 / mean de 5/3 = 0.9; component 1: 0 / (2/3) = 0
    torch.testing.assert_close(ln_share_of_means(final_norm, direct, mask), torch.tensor([0.9, 0.0]))
    # the two definitions differ: the per-token one is larger when the ratios are spread out
    assert ln_share_per_token(final_norm, direct, mask)[1] > ln_share_of_means(final_norm, direct, mask)[1]


def test_ln_shares_bad_input():
    final_norm, direct, mask = share_inputs()
    with pytest.raises(ValueError, match="same"):
        ln_share_per_token(final_norm, direct[:, :, :2], mask)
    with pytest.raises(TypeError, match="bool"):
        ln_share_of_means(final_norm, direct, mask.float())


def test_head_summary_with_clean_direct_selects_tokens_by_it():
    effects = synthetic_effects()
    # clean DE peaks on tokens 0 and 2 for component 0 (AblationEffects.direct peaks on 1 and 3)
    clean = torch.tensor([[[9.0, 1.0, 8.0, 0.0, 99.0]], [[1.0, 2.0, 3.0, 4.0, 99.0]]])
    frame = head_summary(effects, fraction=0.5, clean_direct=clean).set_index("component")
    row = frame.loc["L3H1"]
    assert row["clean_direct"] == pytest.approx(8.5)
    assert row["direct"] == pytest.approx(1.5)  # direct 1 and 2 on tokens 0 and 2
    # final_norm = 0.5 * (direct - total) = 0 on both tokens
    assert row["ln_share_tokens"] == pytest.approx(0.0) and row["ln_share_means"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="clean_direct"):
        head_summary(effects, clean_direct=clean[:, :, :3])


def test_top_neuron_share():
    changes = torch.tensor([[3.0, 1.0, -2.0, 0.5], [1.0, 1.0, 1.0, 1.0], [5.0, 0.0, 0.0, 0.0]])
    mlp_repair = torch.tensor([4.0, 2.0, 1.0])
    # token 0: top 2 = 3 + 1 = 4 of 4; token 1: 2 of 2... scaled: 2 / 2; token 2: 5 / 1 capped at 3
    torch.testing.assert_close(top_neuron_share(changes, mlp_repair, k=2), torch.tensor([1.0, 1.0, 3.0]))
    torch.testing.assert_close(top_neuron_share(changes, mlp_repair, k=1, cap=None), torch.tensor([0.75, 0.5, 5.0]))
    share = top_neuron_share(changes, torch.tensor([4.0, 0.0, -1.0]), k=1)
    assert share[0] == pytest.approx(0.75) and share[1:].isnan().all()
    with pytest.raises(ValueError, match="k must"):
        top_neuron_share(changes, mlp_repair, k=5)
    with pytest.raises(ValueError, match="mlp_repair"):
        top_neuron_share(changes, mlp_repair[:2])


def test_clean_direct_effect_is_the_zero_ablation_direct_effect(tiny_model):
    """Independent check: zero-ablating a head removes exactly its clean direct effect, so
    AblationEffects.direct (computed from the ablated head's output) must equal it."""
    batch = tokenize(tiny_model, TEXTS)
    heads = [Head(0, 1), Head(tiny_model.cfg.n_layers - 1, 0)]
    clean = clean_direct_effects(tiny_model, batch, heads)
    effects = ablation_effects(tiny_model, batch, heads, method="zero", progress=False)
    valid = effects.valid
    torch.testing.assert_close(clean[:, valid], effects.direct[:, valid], atol=1e-5, rtol=1e-4)
    assert clean[:, valid].abs().sum() > 0
    with pytest.raises(TypeError, match="heads"):
        clean_direct_effects(tiny_model, batch, ["L0H1"])


def test_neuron_repair_tokens_add_up_per_token(tiny_model):
    """Per token, the neurons plus the post-norm rescale are that token's later_mlps (from
    hook_mlp_out in helpers.effects), and their mean is neuron_repair."""
    batch = tokenize(tiny_model, TEXTS)
    batch = batch[:, -int(batch.lengths.min()):]
    head = Head(0, 1)
    effects = ablation_effects(tiny_model, batch, [head], method="resample", seed=2, progress=False)
    mask = top_token_mask(effects.direct, effects.valid, fraction=0.3)[0]
    reference = resample_reference(batch, seed=2)
    per_token, rescale = neuron_repair_tokens(tiny_model, batch, head, mask, reference=reference)
    assert per_token.shape == (int(mask.sum()), tiny_model.cfg.n_layers, tiny_model.cfg.d_mlp)
    expected = effects.later_mlps[0][mask]
    torch.testing.assert_close(per_token.sum((1, 2)) + rescale.sum(1), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(per_token.mean(0), neuron_repair(tiny_model, batch, head, mask, reference=reference))
