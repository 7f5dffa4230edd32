"""Tests of the IOI pieces of helpers.studies.patching_practices added for Zhang & Nanda's comparisons:
STR corruptions of some name slots only (S2 vs S1 + IO), patching a group of heads at once (the
S-inhibition restoration) and rank agreement above a noise floor."""

from __future__ import annotations

import pytest
import torch

from helpers.studies import patching_practices as pp

# ------------------------------------------------------------------------------ corrupting some slots


@pytest.mark.parametrize("corruption, slots", [("s2", ("S2",)), ("s1_io", ("IO", "S1"))])
def test_slot_corruptions_replace_exactly_their_slots(tiny_llama, corruption, slots):
    abc = pp.make_ioi_task(tiny_llama, 10, seed=3, corruption="abc")
    task = pp.make_ioi_task(tiny_llama, 10, seed=3, corruption=corruption)
    assert task.clean_prompts == abc.clean_prompts  # the same clean prompts as the notebook's ABC task
    assert torch.equal(task.answer_tokens, abc.answer_tokens)
    data, other = task.details["dataset"], task.details["corrupted_dataset"]
    rows = torch.arange(len(data))
    differs = task.clean.tokens != task.corrupted.tokens
    expected = torch.zeros_like(differs)
    for slot in slots:
        expected[rows, data.word_positions[slot]] = True
    assert torch.equal(differs, expected)  # every replaced slot changed, nothing else did
    assert torch.equal(task.key_mask, expected)
    new = {"IO": other.io_names, "S1": other.s_names, "S2": other.s2_names}
    old = {"IO": data.io_names, "S1": data.s_names, "S2": data.s2_names}
    for row in range(len(data)):
        fresh = [new[s][row] for s in slots]
        assert len(set(fresh)) == len(fresh)
        assert not set(fresh) & {data.io_names[row], data.s_names[row]}
        for slot in set(pp.IOI_CORRUPTION_SLOTS["abc"]) - set(slots):
            assert new[slot][row] == old[slot][row]
    # seeded: the same seed gives the same corruption, another seed another one
    again = pp.make_ioi_task(tiny_llama, 10, seed=3, corruption=corruption)
    assert again.corrupted_prompts == task.corrupted_prompts
    other_seed = pp.refill_name_slots(data, slots, seed=99)
    assert other_seed.prompts != other.prompts


def test_refill_name_slots_rejects_bad_slots(tiny_llama):
    data = pp.make_ioi_task(tiny_llama, 4, seed=0).details["dataset"]
    for bad in ((), ("S3",), ("S2", "S2")):
        with pytest.raises(ValueError, match="slots must be"):
            pp.refill_name_slots(data, bad)
    with pytest.raises(ValueError, match="corruption must be one of"):
        pp.make_ioi_task(tiny_llama, 4, corruption="s1")


# ------------------------------------------------------------------------------ patching a group of heads


def _naive_group_patch(model, task, corruption, metric, heads, positions):
    """Reference: one run with a hook per layer that writes the clean z through a boolean mask."""
    _, cache = model.run_with_cache(task.clean.tokens, attention_mask=task.clean.attention_mask)
    batch, width = task.clean.tokens.shape
    hooks = list(corruption.hooks)
    for layer in sorted({layer for layer, _ in heads}):
        name = f"blocks.{layer}.attn.hook_z"
        mask = torch.zeros(batch, width, model.cfg.n_heads, 1, dtype=torch.bool)
        for l_, h in heads:
            if l_ == layer:
                if positions is None:
                    mask[:, :, h] = True
                else:
                    mask[torch.arange(batch), positions, h] = True
        clean_z = cache[name]
        hooks.append((name, lambda z, hook, m=mask, c=clean_z: torch.where(m.to(z.device), c.to(z.device), z)))
    logits = model.run_with_hooks(corruption.tokens.tokens, attention_mask=corruption.tokens.attention_mask,
                                  fwd_hooks=hooks)
    return float(metric(logits))


@pytest.mark.parametrize("kind", ["STR", "GN"])
def test_patch_head_group_matches_the_toolkit_and_a_naive_run(tiny_model, kind):
    from helpers import patching

    model = tiny_model
    task = pp.make_ioi_task(model, 5, seed=1, corruption="abc")
    corruption = pp.symmetric_token_replacement(task) if kind == "STR" else pp.gaussian_noising(model, task, seed=2)
    metric = pp.patching_metrics(model, task, corruption)["logit_diff"]
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    end = task.details["dataset"].word_positions["END"]
    # one head, all positions: the toolkit's one-head-per-run sweep
    sweep = pp.head_sweep(model, task, corruption, metric, progress=False)
    for head in [(0, 0), (n_layers - 1, n_heads - 1), (n_layers // 2, 1)]:
        assert pp.patch_head_group(model, task, corruption, metric, [head]) == pytest.approx(
            float(sweep.values[head]), abs=1e-4)
    # one head at END (the same column for every left-padded prompt): the per-position sweep
    with pp.corrupted_input(model, corruption) as corrupted:
        at_end = patching.patch_heads(model, task.clean, corrupted, metric, per_position=True,
                                      positions=[int(end[0])], progress=False)
    assert pp.patch_head_group(model, task, corruption, metric, [(1, 2)], positions=end) == pytest.approx(
        float(at_end.values[1, 0, 2]), abs=1e-4)
    # several heads in two layers, at END and everywhere: a naive masked run
    group = [(0, 1), (0, 3), (n_layers - 1, 0)]
    for positions in (end, None):
        got = pp.patch_head_group(model, task, corruption, metric, group, positions=positions)
        assert got == pytest.approx(_naive_group_patch(model, task, corruption, metric, group, positions), abs=1e-5)
    # patching every head of every layer at once is not the sum of single heads (a group really is patched)
    everything = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    together = pp.patch_head_group(model, task, corruption, metric, everything)
    assert together == pytest.approx(_naive_group_patch(model, task, corruption, metric, everything, None), abs=1e-5)
    assert abs(together - float(sweep.values[0, 0])) > 1e-3


def test_patch_head_group_checks_its_input(tiny_llama):
    task = pp.make_ioi_task(tiny_llama, 3, seed=0)
    str_ = pp.symmetric_token_replacement(task)
    metric = pp.patching_metrics(tiny_llama, task, str_)["logit_diff"]
    with pytest.raises(ValueError, match="heads is empty"):
        pp.patch_head_group(tiny_llama, task, str_, metric, [])
    with pytest.raises(ValueError, match="outside the model"):
        pp.patch_head_group(tiny_llama, task, str_, metric, [(tiny_llama.cfg.n_layers, 0)])
    with pytest.raises(ValueError, match="one position per prompt"):
        pp.patch_head_group(tiny_llama, task, str_, metric, [(0, 0)], positions=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="must lie in"):
        pp.patch_head_group(tiny_llama, task, str_, metric, [(0, 0)], positions=torch.tensor([0, 1, 999]))


def test_head_group_restoration_reads_raw_logit_differences(tiny_llama):
    from helpers.metrics import logit_diff

    task = pp.make_ioi_task(tiny_llama, 4, seed=0, corruption="s2")
    str_ = pp.symmetric_token_replacement(task)
    base = pp.baselines(tiny_llama, task, str_)
    heads = [(0, 0), (1, 2)]
    end = task.details["dataset"].word_positions["END"]
    result = pp.head_group_restoration(tiny_llama, task, str_, heads, positions=end, base=base)
    raw = _naive_group_patch(tiny_llama, task, str_, lambda lg: logit_diff(lg, task.answer_tokens, batch=task.clean),
                             heads, end)
    assert result.patched == pytest.approx(raw, abs=1e-5)
    assert result.corrupted == base.corrupted["logit_diff"] and result.clean == base.clean["logit_diff"]
    assert result.restored == pytest.approx(raw - base.corrupted["logit_diff"])
    # the normalised version of the same run
    normalised = pp.patching_metrics(tiny_llama, task, str_, base=base)["logit_diff"]
    assert result.fraction == pytest.approx(pp.patch_head_group(tiny_llama, task, str_, normalised, heads, positions=end),
                                            abs=1e-4)
    hand = pp.HeadGroupRestoration(corrupted=1.0, patched=2.0, clean=5.0)
    assert hand.restored == 1.0 and hand.fraction == 0.25


# ------------------------------------------------------------------------------ agreement above a noise floor


def test_rank_agreement_above_a_noise_floor_ignores_the_near_zero_components():
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(40, generator=gen) * 1e-3
    a = torch.cat([torch.tensor([1.0, 0.6, 0.3]), noise])
    b = torch.cat([torch.tensor([0.9, 0.5, 0.2]), -noise])  # same big effects, opposite noise
    everything = pp.rank_agreement(a, b, k=3)
    assert everything.spearman < 0  # the 40 noisy components dominate the rank correlation
    assert everything.n_compared == 43 and not everything.top_sets_differ
    floor = pp.rank_agreement(a, b, k=3, noise_floor=0.05)
    assert floor.n_compared == 3 and floor.spearman == pytest.approx(1.0) and floor.pearson > 0.99
    # a component above the floor in one sweep only still counts
    b2 = b.clone()
    b2[10] = 0.4
    one_side = pp.rank_agreement(a, b2, k=3, noise_floor=0.05)
    assert one_side.n_compared == 4 and one_side.top_sets_differ and one_side.only_in_b == [(10,)]
    assert one_side.top_k_overlap == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="noise_floor"):
        pp.rank_agreement(a, b, noise_floor=-0.1)
    with pytest.raises(ValueError, match="same shape"):
        pp.rank_agreement(a, b[:5])
