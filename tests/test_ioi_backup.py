"""Tests of the backup-name-mover knock-out (paper §3.4, App. F) and the adversarial duplicated-IO prompts
(paper §4.4, App. L) in helpers.studies.ioi, against naive recomputations on the tiny models."""

from __future__ import annotations

import pytest
import torch

from helpers.models import norm_gain, post_sublayer_norm, post_sublayer_norm_hook
from helpers.studies import ioi
from helpers.studies.ioi import make_ioi_dataset


def _ld(logits, data):
    last = logits[:, -1]  # left padded: END is the last column
    rows = torch.arange(len(data))
    return last[rows, data.answer_tokens[:, 0]] - last[rows, data.answer_tokens[:, 1]]


def _naive_means(model, data, reference):
    """{layer: [batch, pos, head, d_head]}: each prompt's mean z over the reference prompts of its template string."""
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(reference.batch.tokens, attention_mask=reference.batch.attention_mask,
                                        names_filter=names)
    return {layer: torch.stack([cache[name][[j for j, t in enumerate(reference.templates) if t == template]].mean(0)
                                for template in data.templates])
            for layer, name in enumerate(names)}


def _naive_knockout_hooks(means, heads):
    hooks = []
    for layer in sorted({l for l, _ in heads}):
        cols = [h for l, h in heads if l == layer]

        def hook(z, hook, layer=layer, cols=cols):
            z = z.clone()
            z[:, :, cols] = means[layer][:, :, cols]
            return z

        hooks.append((f"blocks.{layer}.attn.hook_z", hook))
    return hooks


def _naive_direct(model, data, hooks, removals):
    """For each entry of ``removals`` ({head: z to subtract at END, or None for the head's own z}): the mean
    drop of the logit difference when the heads' outputs (through their layer's post-norm with this run's
    scale, where the layout has one) are taken out of the *final* residual stream at END only, with the
    final norm's scale frozen at the run's own. One forward per entry; the final norm and unembedding
    are the model's."""
    n_layers, end = model.cfg.n_layers, -1
    store = {}

    def keep(name):
        def hook(act, hook):
            store[name] = act.detach().clone()
        return hook

    names = [f"blocks.{l}.attn.hook_z" for l in range(n_layers)] + ["ln_final.hook_scale"]
    names += [f"blocks.{l}.{post_sublayer_norm_hook('attn')}.hook_scale" for l in range(n_layers)
              if post_sublayer_norm(model, l, "attn") is not None]
    tokens, mask = data.batch.tokens, data.batch.attention_mask
    with torch.no_grad():
        full = _ld(model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=hooks + [(n, keep(n)) for n in names]), data)
    clean = dict(store)
    out = []
    for removal in removals:
        piece = torch.zeros(len(data), model.cfg.d_model)
        for (l, h), z_other in removal.items():
            z = clean[f"blocks.{l}.attn.hook_z"][:, end, h]
            if z_other is not None:
                z = z - z_other
            part = z @ model.W_O[l, h]
            norm = post_sublayer_norm(model, l, "attn")
            if norm is not None:
                part = part * norm_gain(norm) / clean[f"blocks.{l}.{post_sublayer_norm_hook('attn')}.hook_scale"][:, end]
            piece = piece + part

        def remove(resid, hook, piece=piece):
            resid = resid.clone()
            resid[:, end] = resid[:, end] - piece
            return resid

        def frozen(scale, hook):
            return clean["ln_final.hook_scale"]

        edit = [(f"blocks.{n_layers - 1}.hook_resid_post", remove), ("ln_final.hook_scale", frozen)]
        with torch.no_grad():
            edited = _ld(model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=hooks + edit), data)
        out.append((full - edited).mean().item())
    return full.mean().item(), out


def test_backup_name_movers_match_a_naive_computation(tiny_model):
    model = tiny_model
    data = make_ioi_dataset(model, 12, seed=3, templates="mixed")
    abc = data.abc()
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    knock = [(n_layers - 1, 0), (n_layers - 2, 2), (n_layers - 1, 3)]
    result = ioi.backup_name_movers(model, data, abc, knock)
    every = [(l, h) for l in range(n_layers) for h in range(n_heads)]
    means = _naive_means(model, data, abc)

    ld_clean, dla_before = _naive_direct(model, data, [], [{head: None} for head in every])
    hooks = _naive_knockout_hooks(means, knock)
    ld_knocked, dla_after = _naive_direct(model, data, hooks, [{head: None} for head in every])
    _, (drop,) = _naive_direct(model, data, [], [{(l, h): means[l][:, -1, h] for l, h in knock}])

    assert result.knocked_out == knock
    assert result.ld_before == pytest.approx(ld_clean, abs=1e-5)
    assert result.ld_after == pytest.approx(ld_knocked, abs=1e-5)
    assert abs(result.ld_after - result.ld_before) > 1e-4  # the knock-out does something, so a no-op shows
    assert result.dla_before.shape == result.dla_after.shape == (n_layers, n_heads)
    for head, before, after in zip(every, dla_before, dla_after):
        assert float(result.dla_before[head]) == pytest.approx(before, abs=1e-5), head
        assert float(result.dla_after[head]) == pytest.approx(after, abs=1e-5), head
    assert result.naive_expected_drop == pytest.approx(drop, abs=1e-5)
    assert result.knocked_out_dla == pytest.approx(sum(dla_before[every.index(h)] for h in knock), abs=1e-5)
    # the knocked-out heads' DLA after is that of their means, not their own output
    assert max(abs(float(result.dla_after[h]) - float(result.dla_before[h])) for h in knock) > 1e-4
    rise = torch.tensor(dla_after) - torch.tensor(dla_before)
    assert rise.abs().max() > 1e-4
    expected = [every[i] for i in rise.argsort(descending=True).tolist() if every[i] not in knock][:4]
    assert result.risers(4) == expected
    assert result.actual_drop == pytest.approx(ld_clean - ld_knocked, abs=1e-5)
    assert result.compensation == pytest.approx(1 - (ld_clean - ld_knocked) / drop, rel=1e-3, abs=1e-4)


def test_backup_name_mover_summaries_on_a_hand_built_case():
    before = torch.tensor([[0.0, 0.1, 0.05], [2.0, -1.0, 0.05]])
    after = torch.tensor([[0.0, 0.3, 0.2], [0.1, 0.25, 0.07]])
    result = ioi.BackupNameMovers([(1, 0)], ld_before=3.0, ld_after=2.5, dla_before=before, dla_after=after,
                                  naive_expected_drop=1.9)
    # rises: (0,1) +0.2, (0,2) +0.15, (1,1) +1.25, (1,2) +0.02, (0,0) 0; (1,0) is knocked out (-1.9)
    assert result.risers(2) == [(1, 1), (0, 1)]
    assert result.risers(3, exclude=[(1, 1)]) == [(0, 1), (0, 2), (1, 2)]
    assert result.actual_drop == pytest.approx(0.5)
    assert result.naive_expected_ld == pytest.approx(1.1)
    assert result.compensation == pytest.approx(1 - 0.5 / 1.9)
    assert result.knocked_out_dla == pytest.approx(2.0)
    # the paper's rule: DLA after >= 2% of 3.0 = 0.06, not knocked out, not in another class
    assert result.backup_heads() == [(0, 1), (1, 1), (0, 2), (1, 2)]
    assert result.backup_heads(exclude=[(0, 1)], threshold=0.05, max_heads=1) == [(1, 1)]
    frame = result.table([(1, 1)])
    assert frame.iloc[0].to_dict() == pytest.approx({"head": "1.1", "DLA before": -1.0, "DLA after": 0.25, "rise": 1.25})
    fig = result.plot()
    assert {t.name for t in fig.data} == {"other heads", "knocked out", "risers", "y = x"}
    with pytest.raises(ValueError, match="no direct effect"):
        _ = ioi.BackupNameMovers([(1, 0)], 3.0, 3.0, before, before, 0.0).compensation


def test_backup_name_movers_reject_bad_heads(tiny_model):
    data = make_ioi_dataset(tiny_model, 4, seed=0, templates="BABA")
    with pytest.raises(ValueError, match="empty"):
        ioi.backup_name_movers(tiny_model, data, data.abc(), [])
    with pytest.raises(ValueError, match="does not exist"):
        ioi.backup_name_movers(tiny_model, data, data.abc(), [(tiny_model.cfg.n_layers, 0)])


# ------------------------------------------------------------------------------ adversarial prompts


@pytest.fixture(scope="module")
def tiny():
    from helpers.models import load_model

    return load_model("tiny-llama", seed=0)


def test_sentence_insertion_follows_the_papers_example(tiny):
    template = ioi.BABA_TEMPLATES[0]  # "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to"
    data = make_ioi_dataset(tiny, 6, seed=1, templates=[template])
    adv = ioi.add_name_sentence(data, "IO", sentences=["[A] had a good day."])
    ctl = ioi.add_name_sentence(data, "S", sentences=["[A] had a good day."])
    for row in range(len(data)):
        io, s, place, obj = data.io_names[row], data.s_names[row], data.places[row], data.objects[row]
        assert adv.prompts[row] == f"Then, {s} and {io} went to the {place}. {io} had a good day. {s} gave a {obj} to"
        assert ctl.prompts[row] == f"Then, {s} and {io} went to the {place}. {s} had a good day. {s} gave a {obj} to"
    assert torch.equal(adv.answer_tokens, data.answer_tokens) and torch.equal(ctl.answer_tokens, data.answer_tokens)
    assert adv.kind != data.kind and adv.io_names == data.io_names


@pytest.mark.parametrize("who", ["IO", "S"])
def test_name_sentence_positions_point_at_the_names(tiny, who):
    data = make_ioi_dataset(tiny, 40, seed=2, templates="mixed")
    data = data[[i for i, t in enumerate(data.templates) if ioi.accepts_name_sentence(t)]]
    out = ioi.add_name_sentence(data, who)
    rows = torch.arange(len(out))
    tok = out.batch.tokens
    assert torch.equal(tok[rows, out.word_positions["IO"]], out.io_tokens)
    assert torch.equal(tok[rows, out.word_positions["S1"]], out.s_tokens)
    assert torch.equal(tok[rows, out.word_positions["S2"]], out.s_tokens)
    assert torch.equal(tok[rows, out.word_positions["extra"]], out.io_tokens if who == "IO" else out.s_tokens)
    assert bool((out.word_positions["S1"] < out.word_positions["extra"]).all())
    assert bool((out.word_positions["IO"] < out.word_positions["extra"]).all())
    assert bool((out.word_positions["extra"] < out.word_positions["S2"]).all())  # inserted before the repeated S
    assert torch.equal(out.word_positions["END"], torch.full((len(out),), tok.shape[1] - 1))
    used = {s for s in ioi.NAME_SENTENCES for p in out.prompts if s.replace("[A] ", " ", 1) in p}
    assert len(used) > 1  # a seeded draw, not one sentence for all
    # one group = one template with one sentence: same length, same positions
    for group in out.template_groups.unique():
        members = (out.template_groups == group).nonzero().flatten()
        for key in ("IO", "S1", "S2", "extra"):
            assert out.word_positions[key][members].unique().numel() == 1
    # the seed decides the sentences, and both variants get the same ones
    other = ioi.add_name_sentence(data, "IO" if who == "S" else "S")
    assert [len(a) - len(b) for a, b in zip(out.prompts, other.prompts)] == [
        (len(x) - len(y)) * (1 if who == "IO" else -1) for x, y in zip(data.io_names, data.s_names)]


def test_name_sentence_rejects_what_it_cannot_do(tiny):
    data = make_ioi_dataset(tiny, 30, seed=0, templates="mixed")
    assert {ioi.accepts_name_sentence(t) for t in ioi.BABA_TEMPLATES} == {True, False}
    assert sum(ioi.accepts_name_sentence(t) for t in ioi.BABA_TEMPLATES) == 9
    with pytest.raises(ValueError, match="sentence break"):
        ioi.add_name_sentence(data, "IO")
    ok = data[[i for i, t in enumerate(data.templates) if ioi.accepts_name_sentence(t)]]
    with pytest.raises(ValueError, match="who must be"):
        ioi.add_name_sentence(ok, "S2")
    with pytest.raises(ValueError, match="exactly one"):
        ioi.add_name_sentence(ok, "IO", sentences=["[B] was tired."])
    adv = ioi.add_name_sentence(ok, "IO")
    with pytest.raises(ValueError, match="not defined"):
        adv.abc()
    with pytest.raises(ValueError, match="already"):
        ioi.add_name_sentence(adv, "IO")


def test_name_sentence_effect_matches_the_baselines(tiny):
    data = make_ioi_dataset(tiny, 30, seed=4, templates="mixed")
    effect = ioi.name_sentence_effect(tiny, data, seed=7)
    ok = data[[i for i, t in enumerate(data.templates) if ioi.accepts_name_sentence(t)]]
    variants = {"IOI": ok, "+ sentence repeating S": ioi.add_name_sentence(ok, "S", seed=7),
                "+ sentence repeating IO": ioi.add_name_sentence(ok, "IO", seed=7)}
    frame = effect.summary().set_index("distribution")
    assert list(frame.index) == list(ioi.NAME_SENTENCE_DISTRIBUTIONS)
    for name, d in variants.items():
        base = ioi.ioi_baseline(tiny, d)
        assert frame.loc[name, "prompts"] == len(ok)
        assert frame.loc[name, "logit difference"] == pytest.approx(base["logit_diff"], abs=1e-5)
        assert frame.loc[name, "P(IO)"] == pytest.approx(base["p_io"], abs=1e-6)
        assert frame.loc[name, "fraction S > IO"] == pytest.approx(1 - base["frac_io_above_s"], abs=1e-6)
    a, b = effect.logit_diffs["+ sentence repeating IO"], effect.logit_diffs["IOI"]
    mean, se = effect.paired_difference("+ sentence repeating IO", "IOI")
    assert mean == pytest.approx(float((a - b).mean()), abs=1e-6)
    assert se == pytest.approx(float((a - b).std() / len(a) ** 0.5), rel=1e-4)
    assert abs(mean) > 1e-4
