"""Tests of helpers.studies.patching_practices: the factual-recall prompt set, STR/GN corruptions, the
common-scale metrics and the comparisons between sweeps. Tiny models share the embedded tokenizer,
so tokenization facts checked on them hold for the embedded model too."""

from __future__ import annotations

import random

import pytest
import torch

from helpers.studies import patching_practices as pp
from helpers.studies.patching_practices import Fact, FactCheck


def _fake_known_checks(model, facts):
    """FactChecks that declare every single-token-answer fact known (a random model knows nothing;
    this lets the pairing/tokenization logic be tested on a tiny model)."""
    real = pp.check_facts(model, facts)
    return [
        FactCheck(c.fact, c.answer_id, 0, 1.0, " " + c.fact.answer, c.subject_span) for c in real
    ]


@pytest.fixture(scope="module")
def capital_facts():
    return pp.load_facts("capital")


@pytest.fixture(scope="module")
def fact_task(tiny_llama, capital_facts):
    checks = _fake_known_checks(tiny_llama, capital_facts)
    return pp.make_factual_recall_task(tiny_llama, 12, relations=("capital",), seed=0, checks=checks)


# ------------------------------------------------------------------------------------------- prompt set


def test_prompt_set_is_well_formed():
    facts = pp.load_facts()
    relations = {f.relation for f in facts}
    assert relations == {"capital", "official_language", "city_country", "landmark_city", "company_country"}
    for rel in relations:
        subjects = [f.subject for f in facts if f.relation == rel]
        assert len(subjects) >= 20 and len(set(subjects)) == len(subjects)
    for f in facts:
        assert f.template.count("{subject}") == 1 and not f.template.endswith(" ")
        assert f.answer == f.answer.strip() and f.answer
    assert Fact("capital", "The capital of {subject} is the city of", "France", "Paris").prompt == (
        "The capital of France is the city of"
    )
    with pytest.raises(ValueError, match="Unknown relation"):
        pp.load_facts(["capitals"])


def test_subject_span_covers_exactly_the_subject(tiny_llama):
    tok = tiny_llama.tokenizer
    facts = [
        Fact("capital", "The capital of {subject} is the city of", "Czech Republic", "Prague"),
        Fact("landmark_city", "{subject} is located in the city of", "The Eiffel Tower", "Paris"),
    ]
    for check in pp.check_facts(tiny_llama, facts):
        start, stop = check.subject_span
        ids = tok(check.fact.prompt, add_special_tokens=False)["input_ids"]
        offset = 1 if tiny_llama.cfg.default_prepend_bos else 0
        assert tok.decode(ids[start - offset : stop - offset]).strip() == check.fact.subject
        assert check.n_subject_tokens >= 2


def test_check_facts_rank_and_probability_agree(tiny_llama, capital_facts):
    checks = pp.check_facts(tiny_llama, capital_facts[:10], batch_size=4)
    assert [c.fact for c in checks] == capital_facts[:10]
    for c in checks:
        # reference: the prompt alone (no batch, no padding), the HF model's own forward, softmax at the end
        ids = tiny_llama.tokenizer(c.fact.prompt, return_tensors="pt")["input_ids"]
        if tiny_llama.cfg.default_prepend_bos and ids[0, 0] != tiny_llama.tokenizer.bos_token_id:
            ids = torch.cat([torch.tensor([[tiny_llama.tokenizer.bos_token_id]]), ids], 1)
        with torch.no_grad():
            logits = tiny_llama.original_model(ids).logits[0, -1].float()
        first = tiny_llama.tokenizer(" " + c.fact.answer, add_special_tokens=False)["input_ids"][0]
        assert c.prob == pytest.approx(logits.softmax(-1)[first].item(), rel=1e-4, abs=1e-7)
        assert c.rank == int((logits > logits[first]).sum())
        if c.answer_id is not None:
            assert (c.rank == 0) == (c.top_token == tiny_llama.tokenizer.decode([c.answer_id]))
    table = pp.facts_table(checks)
    assert len(table) == 10 and {"rank", "known", "p(answer)"} <= set(table.columns)


def test_multi_token_answers_are_never_known(tiny_llama):
    fact = Fact("capital", "The capital of {subject} is the city of", "Mongolia", "Ulaanbaatar")
    (check,) = pp.check_facts(tiny_llama, [fact])
    assert check.answer_id is None and not check.known


# ------------------------------------------------------------------------------------------- tasks


def test_factual_task_pairs_are_str_counterparts(tiny_llama, fact_task):
    task = fact_task
    tok = tiny_llama.tokenizer
    assert len(task) == 12 and task.answer_tokens.shape == (12, 2)
    differs = task.clean.tokens != task.corrupted.tokens
    # only subject tokens differ, and every prompt's subject is swapped
    assert not bool((differs & ~task.key_mask).any())
    assert bool(differs.any(dim=1).all())
    for row, (clean_answer, corrupt_answer) in enumerate(task.answers):
        assert clean_answer != corrupt_answer
        assert tok.decode([int(task.answer_tokens[row, 0])]) == " " + clean_answer
        assert tok.decode([int(task.answer_tokens[row, 1])]) == " " + corrupt_answer
        assert task.clean_prompts[row] != task.corrupted_prompts[row]
    assert task.position_labels is not None and len(task.position_labels) == task.clean.tokens.shape[1]
    assert sum("subject" in label for label in task.position_labels) == int(task.key_mask[0].sum())


def test_factual_task_is_seeded_and_counts_what_it_can_build(tiny_llama, capital_facts):
    checks = _fake_known_checks(tiny_llama, capital_facts)
    a = pp.make_factual_recall_task(tiny_llama, 8, seed=1, checks=checks)
    b = pp.make_factual_recall_task(tiny_llama, 8, seed=1, checks=checks)
    c = pp.make_factual_recall_task(tiny_llama, 8, seed=2, checks=checks)
    assert a.clean_prompts == b.clean_prompts and a.corrupted_prompts == b.corrupted_prompts
    assert a.clean_prompts != c.clean_prompts
    with pytest.raises(ValueError, match="Only .* STR pairs"):
        pp.make_factual_recall_task(tiny_llama, 500, checks=checks)


def test_pairing_never_pairs_equal_answers():
    facts = [Fact("l", "{subject} speaks", s, a) for s, a in
             [("Spain", "Spanish"), ("Mexico", "Spanish"), ("Peru", "Spanish"), ("France", "French"), ("Italy", "Italian")]]
    checks = [FactCheck(f, 1, 0, 1.0, "", (0, 1)) for f in facts]
    pairs = pp._pair_within_groups({("l", 1): checks}, random.Random(0))
    assert pairs and all(a.fact.answer != b.fact.answer for a, b in pairs)
    assert all(a is not b for a, b in pairs)


def test_ioi_task_key_tokens_are_the_names(tiny_llama):
    task = pp.make_ioi_task(tiny_llama, 8, seed=0, corruption="abc")
    assert bool((task.key_mask.sum(1) == 3).all())
    differs = task.clean.tokens != task.corrupted.tokens
    assert not bool((differs & ~task.key_mask).any())
    swapped = pp.make_ioi_task(tiny_llama, 8, seed=0, corruption="swap")
    assert torch.equal(swapped.answer_tokens, task.answer_tokens)
    with pytest.raises(ValueError, match="corruption"):
        pp.make_ioi_task(tiny_llama, 8, corruption="noise")


# ------------------------------------------------------------------------------------------- corruptions


def test_gaussian_noise_only_touches_key_token_embeddings(tiny_model):
    task = pp.make_ioi_task(tiny_model, 6, seed=0)
    gn = pp.gaussian_noising(tiny_model, task, scale=3.0, seed=0)
    assert [name for name, _ in gn.hooks] == ["embed.hook_in", "hook_embed"]
    # the corrupted tokens are marked exactly at the key positions (so patching knows where they differ)
    assert torch.equal(gn.tokens.tokens != task.clean.tokens, task.key_mask)
    assert torch.equal(gn.tokens.attention_mask, task.clean.attention_mask)
    batch = task.clean

    def embeds(tokens):
        with tiny_model.hooks(fwd_hooks=gn.hooks):
            _, cache = tiny_model.run_with_cache(tokens, attention_mask=batch.attention_mask, names_filter="hook_embed")
        return cache["hook_embed"]

    _, plain_cache = tiny_model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask, names_filter="hook_embed")
    clean_embed = plain_cache["hook_embed"]
    noisy = embeds(gn.tokens.tokens)
    changed = (noisy - clean_embed).abs().amax(-1) > 0
    assert torch.equal(changed, task.key_mask)
    # the noise added is the hook's fixed noise, on the *clean* tokens' embeddings
    assert torch.allclose(noisy - clean_embed, gn.hooks[1][1].noise, atol=1e-5)
    # with the hooks active, the clean input stays clean
    assert torch.equal(embeds(batch.tokens), clean_embed)
    plain = tiny_model(batch.tokens, attention_mask=batch.attention_mask)
    assert torch.allclose(plain, pp.run_logits(tiny_model, batch, gn.hooks), atol=1e-5)
    assert not torch.allclose(plain, pp.run_logits(tiny_model, gn.tokens, gn.hooks), atol=1e-3)


def test_gaussian_noise_scale_seed_and_shape_checks(tiny_llama):
    mask = torch.zeros(64, 32, dtype=torch.bool)
    mask[:, ::2] = True
    (name, hook), = pp.gaussian_noise_hooks(tiny_llama, mask, scale=3.0, seed=0)
    noise = hook.noise
    expected = 3.0 * float(tiny_llama.W_E.std())
    assert hook.std == pytest.approx(expected)
    assert float(noise[mask].std()) == pytest.approx(expected, rel=0.02)
    assert float(noise[~mask].abs().max()) == 0.0
    (_, same), = pp.gaussian_noise_hooks(tiny_llama, mask, scale=3.0, seed=0)
    (_, other), = pp.gaussian_noise_hooks(tiny_llama, mask, scale=3.0, seed=1)
    assert torch.equal(same.noise, noise) and not torch.equal(other.noise, noise)
    (_, doubled), = pp.gaussian_noise_hooks(tiny_llama, mask, scale=6.0, seed=0)
    assert torch.allclose(doubled.noise, 2 * noise, atol=1e-6)
    embed = torch.zeros(64, 32, tiny_llama.cfg.d_model)
    assert torch.equal(hook(embed), noise)
    with pytest.raises(RuntimeError, match="shape"):
        hook(torch.zeros(2, 32, tiny_llama.cfg.d_model))
    with pytest.raises(ValueError, match="no position"):
        pp.gaussian_noise_hooks(tiny_llama, torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="positive"):
        pp.embedding_noise_std(tiny_llama, scale=0)


def test_common_scale_metrics_read_0_on_corrupted_and_1_on_clean(tiny_model):
    task = pp.make_ioi_task(tiny_model, 6, seed=1)
    for corruption in (pp.symmetric_token_replacement(task), pp.gaussian_noising(tiny_model, task)):
        metrics = pp.patching_metrics(tiny_model, task, corruption)
        clean_logits = pp.run_logits(tiny_model, task.clean)
        corrupted_logits = pp.run_logits(tiny_model, corruption.tokens, corruption.hooks)
        for name in pp.METRIC_NAMES:
            assert float(metrics[name](clean_logits)) == pytest.approx(1.0, abs=1e-4), name
            assert float(metrics[name](corrupted_logits)) == pytest.approx(0.0, abs=1e-4), name
        # in between, each metric is its formula written out on the last position (the batch is left-padded)
        between = 0.3 * clean_logits + 0.7 * corrupted_logits
        rows = torch.arange(len(task.answer_tokens))
        io, s = task.answer_tokens[:, 0], task.answer_tokens[:, 1]

        # (in float32 like the metrics: the random model's clean/corrupted gaps in probability and KL are
        # tiny — a KL of ~4e-5 nats on tiny-gpt2 — and the normalisation divides by them, so float64 here
        # would differ from any float32 implementation by up to 1e-2)
        def ld(logits):
            return (logits[rows, -1, io] - logits[rows, -1, s]).mean().item()

        def prob(logits):
            return logits[:, -1].softmax(-1)[rows, io].mean().item()

        def kl_from_clean(logits):
            p, q = clean_logits[:, -1].log_softmax(-1), logits[:, -1].log_softmax(-1)
            return (p.exp() * (p - q)).sum(-1).mean().item()

        by_hand = {
            "logit_diff": (ld(between) - ld(corrupted_logits)) / (ld(clean_logits) - ld(corrupted_logits)),
            "prob": (prob(between) - prob(corrupted_logits)) / (prob(clean_logits) - prob(corrupted_logits)),
            "kl": 1 - kl_from_clean(between) / kl_from_clean(corrupted_logits),
        }
        for name, value in by_hand.items():
            assert float(metrics[name](between)) == pytest.approx(value, abs=1e-4), (corruption.name, name)
            assert 0.05 < value < 0.95, (corruption.name, name)  # strictly between the baselines: informative
        logits = clean_logits.clone().requires_grad_(True)
        metrics["kl"](logits).backward()
        assert logits.grad is not None and float(logits.grad.abs().sum()) > 0


# ------------------------------------------------------------------------------------------- embedded model


@pytest.mark.embedded
def test_embedded_model_knows_capitals_and_str_flips_the_answer(embedded_model):
    checks = pp.check_facts(embedded_model, pp.load_facts("capital"))
    known = [c for c in checks if c.known]
    assert len(known) >= 20, f"the embedded model knows only {len(known)} capitals"
    task = pp.make_factual_recall_task(embedded_model, 16, seed=0, checks=checks)
    for corruption in (pp.symmetric_token_replacement(task), pp.gaussian_noising(embedded_model, task)):
        base = pp.baselines(embedded_model, task, corruption)
        assert base.clean["logit_diff"] > 3
        assert base.corrupted["logit_diff"] < base.clean["logit_diff"] - 3, corruption.name
    str_base = pp.baselines(embedded_model, task, pp.symmetric_token_replacement(task))
    assert str_base.corrupted["logit_diff"] < 0  # STR prompts have the other answer


# ------------------------------------------------------------------------------------------- the GN adapter


def _naive_layer_patch(model, task, corruption, metric, layer, component, direction):
    """One forward per patch, written out by hand: the reference for the adapter."""
    name = f"blocks.{layer}.hook_{component}_out"
    batch = task.clean
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask, names_filter=name)
        with model.hooks(fwd_hooks=corruption.hooks):
            _, corrupt_cache = model.run_with_cache(corruption.tokens.tokens, attention_mask=batch.attention_mask,
                                                    names_filter=name)
        source = clean_cache[name] if direction == "denoise" else corrupt_cache[name]
        input_hooks = corruption.hooks if direction == "denoise" else []
        tokens = corruption.tokens.tokens if direction == "denoise" else batch.tokens
        logits = model.run_with_hooks(tokens, attention_mask=batch.attention_mask,
                                      fwd_hooks=[*input_hooks, (name, lambda act, hook: source)])
    return float(metric(logits))


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_gn_through_the_toolkit_matches_a_naive_loop(tiny_model, direction):
    task = pp.make_ioi_task(tiny_model, 5, seed=2)
    gn = pp.gaussian_noising(tiny_model, task, seed=3)
    metric = pp.patching_metrics(tiny_model, task, gn)["logit_diff"]
    sweeps = pp.layer_sweeps(tiny_model, task, gn, metric, direction=direction)
    for component in ("attn", "mlp"):
        sweep = sweeps[component]
        assert sweep.meta["clean_value"] == pytest.approx(1.0, abs=1e-4)
        assert sweep.meta["corrupted_value"] == pytest.approx(0.0, abs=1e-4)  # the noise was applied
        for layer in range(tiny_model.cfg.n_layers):
            expected = _naive_layer_patch(tiny_model, task, gn, metric, layer, component, direction)
            assert float(sweep.values[layer]) == pytest.approx(expected, abs=1e-4)
    # after the context, no hook is left behind
    assert torch.allclose(pp.run_logits(tiny_model, task.clean),
                          tiny_model(task.clean.tokens, attention_mask=task.clean.attention_mask), atol=1e-5)


def test_gn_with_the_toolkit_restricts_nothing_it_should_not(tiny_llama):
    """The toolkit may skip positions where clean and corrupted tokens agree; with GN those are the
    positions before the first key token, which the noise cannot affect: patching there is a no-op."""
    from helpers import patching

    task = pp.make_ioi_task(tiny_llama, 4, seed=5)
    gn = pp.gaussian_noising(tiny_llama, task, seed=0)
    metric = pp.patching_metrics(tiny_llama, task, gn)["logit_diff"]
    with pp.corrupted_input(tiny_llama, gn) as corrupted:
        sweep = patching.patch_mlp_out(tiny_llama, task.clean, corrupted, metric, progress=False)
    first_key = int(task.key_mask.any(0).nonzero()[0])
    assert torch.allclose(sweep.values[:, :first_key], torch.zeros(1), atol=1e-5)
    assert float(sweep.values[:, first_key:].abs().max()) > 1e-3


def test_str_corrupted_input_is_the_counterpart_batch(tiny_llama):
    task = pp.make_ioi_task(tiny_llama, 4, seed=0)
    str_ = pp.symmetric_token_replacement(task)
    with pp.corrupted_input(tiny_llama, str_) as corrupted:
        assert corrupted is task.corrupted


# ------------------------------------------------------------------------------------------- comparisons


def test_rank_agreement_and_correlations():
    a = torch.tensor([[5.0, 1.0, 0.0], [3.0, -2.0, 4.0]])
    same = pp.rank_agreement(a, a * 2 + 1, k=2)
    assert same.spearman == pytest.approx(1.0) and same.pearson == pytest.approx(1.0)
    assert same.top_k_overlap == 1.0 and same.only_in_a == [] and same.only_in_b == []
    flipped = pp.rank_agreement(a, -a, k=2)
    assert flipped.spearman == pytest.approx(-1.0) and flipped.top_k_overlap == 0.0
    assert pp.top_indices(a, 2) == [(0, 0), (1, 2)]
    assert pp.top_indices(a, 1, by="-value") == [(1, 1)]
    assert pp.top_indices(a, 1, by="abs") == [(0, 0)]
    with pytest.raises(ValueError, match="same shape"):
        pp.spearman(a, a.flatten()[:4])
    with pytest.raises(ValueError, match="k must be"):
        pp.top_indices(a, 7)
    # ties get their average rank
    assert pp.spearman(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([0.0, 0.0, 5.0])) == pytest.approx(1.0)


def test_window_inflation_reads_the_windows_from_the_sweep():
    from helpers.patching import LabelledTensor

    single = LabelledTensor(torch.tensor([0.0, 0.1, 0.3, 0.2, 0.0]), ("layer",))
    windows = [[0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4]]
    window = LabelledTensor(torch.tensor([0.1, 0.5, 0.9, 0.6, 0.2]), ("layer",), meta={"windows": windows})
    result = pp.window_inflation(window, single)
    assert result.peak_layers == (1, 2, 3) and result.window == 3
    assert result.window_effect == pytest.approx(0.9) and result.summed_single == pytest.approx(0.6)
    assert result.ratio == pytest.approx(1.5) and result.largest_single == pytest.approx(0.3)
    assert result.ratio_to_largest_single == pytest.approx(3.0)
    skipped = pp.window_inflation(window, single, exclude_layers=[2])
    assert skipped.peak_layers == (3, 4) and skipped.window_effect == pytest.approx(0.2)
    with pytest.raises(ValueError, match="every window"):
        pp.window_inflation(window, single, exclude_layers=[0, 3])
    with pytest.raises(ValueError, match="windows"):
        pp.window_inflation(single, single)


def test_most_negative_component_and_layer_restriction():
    from helpers.patching import LabelledTensor

    ld = LabelledTensor(torch.tensor([[0.1, -0.4], [0.6, 0.0]]), ("layer", "head"), {"layer": [3, 7]})
    prob = LabelledTensor(torch.tensor([[0.05, -0.01], [0.5, 0.0]]), ("layer", "head"), {"layer": [3, 7]})
    spot = pp.most_negative_component(ld, prob)
    assert spot.index == (0, 1) and spot.effect_a == pytest.approx(-0.4) and spot.ratio == pytest.approx(0.025)
    sub = pp.restrict_layers(ld, [7])
    assert sub.labels["layer"] == [7] and torch.equal(sub.values, ld.values[1:])
    with pytest.raises(ValueError, match="different components"):
        pp.most_negative_component(ld, sub)


def _patterns_by_hand(model, tokens, hooks=()):
    """Attention patterns of a GPT-2-layout model ``{layer: [batch, head, query, key]}`` from its queries and
    keys: softmax over the allowed keys (causal, not padding) of q·k / sqrt(d_head)."""
    names = [f"blocks.{l}.attn.hook_{x}" for l in range(model.cfg.n_layers) for x in ("q", "k")]
    with torch.no_grad(), model.hooks(fwd_hooks=list(hooks)):
        _, cache = model.run_with_cache(tokens.tokens, attention_mask=tokens.attention_mask, names_filter=names)
    n = tokens.tokens.shape[1]
    allowed = torch.ones(n, n).tril().bool()[None, None] & tokens.attention_mask.bool()[:, None, None, :]
    out = {}
    for layer in range(model.cfg.n_layers):
        q, k = cache[f"blocks.{layer}.attn.hook_q"], cache[f"blocks.{layer}.attn.hook_k"]
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / model.cfg.d_head ** 0.5
        out[layer] = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return out


def test_attention_to_key_matches_patterns_computed_from_queries_and_keys(tiny_gpt2):
    """Replaces '0 <= attention <= 1': the mean END -> IO (and END -> S1) attention of each head, with
    per-prompt positions, against patterns computed by hand from q and k — on the padded batch, on each
    prompt alone without padding, and on the GN-corrupted input with its hooks active."""
    model = tiny_gpt2
    task = pp.make_ioi_task(model, 6, seed=0)
    data = task.details["dataset"]
    gn = pp.gaussian_noising(model, task)
    heads = [(2, 0), (1, 3), (2, 3), (0, 1)]
    end = data.word_positions["END"]
    rows = torch.arange(len(data))
    assert not bool(task.clean.attention_mask.all()), "the batch should be left-padded"
    clean_patterns = _patterns_by_hand(model, task.clean)
    noisy_patterns = _patterns_by_hand(model, gn.tokens, gn.hooks)
    for key_name in ("IO", "S1"):
        key = data.word_positions[key_name]
        assert len(set(key.tolist())) > 1  # the templates put the key at different positions
        clean = pp.attention_to_key(model, task.clean, heads, query_positions=end, key_positions=key)
        noisy = pp.attention_to_key(model, gn.tokens, heads, query_positions=end, key_positions=key, hooks=gn.hooks)
        for i, (layer, head) in enumerate(heads):
            expected = clean_patterns[layer][rows, head, end, key].mean().item()
            assert clean[i].item() == pytest.approx(expected, rel=1e-4, abs=1e-6), (key_name, layer, head)
            expected = noisy_patterns[layer][rows, head, end, key].mean().item()
            assert noisy[i].item() == pytest.approx(expected, rel=1e-4, abs=1e-6), (key_name, layer, head)
            # each prompt alone, without padding: the same attention at the shifted positions
            alone = []
            for b in range(len(data)):
                start = int((task.clean.attention_mask[b] == 0).sum())
                one = task.clean[b:b + 1, start:]
                pattern = _patterns_by_hand(model, one)[layer]
                alone.append(pattern[0, head, int(end[b]) - start, int(key[b]) - start].item())
            assert clean[i].item() == pytest.approx(sum(alone) / len(alone), rel=1e-3, abs=1e-5), (key_name, layer, head)
        assert float((clean - noisy).abs().max()) > 2e-4  # GN changes the attention (>> the tolerance): hooks used
        assert len({round(v, 4) for v in clean.tolist()}) == len(heads)  # heads differ: a mix-up would show
    with pytest.raises(ValueError, match="heads is empty"):
        pp.attention_to_key(model, task.clean, [], query_positions=end, key_positions=end)


def test_noise_is_sized_on_the_embeddings_that_enter_the_model(tiny_model):
    """ν is 3 × the std of hook_embed's output over the vocabulary: std(W_E) for GPT-2 / Llama layouts,
    √d_model × that for Gemma's scaled embeddings (the noise must be as large as what it corrupts)."""
    from helpers.effects import StopForward

    rows = []

    def grab(activation, hook):
        rows.append(activation.detach().double())
        raise StopForward  # the reference needs only hook_embed (the full model made this test ~25 s per model)

    for start in range(0, tiny_model.cfg.d_vocab, 4096):  # every token once, as its own 1-token prompt
        ids = torch.arange(start, min(start + 4096, tiny_model.cfg.d_vocab))[:, None]
        with pytest.raises(StopForward):
            tiny_model.run_with_hooks(ids, fwd_hooks=[("hook_embed", grab)])
    expected = 3.0 * float(torch.cat(rows).std())
    assert pp.embedding_noise_std(tiny_model) == pytest.approx(expected, rel=1e-6)
    assert pp.embedding_noise_std(tiny_model, chunk=1000) == pytest.approx(expected, rel=1e-6)  # chunking is exact
    w_e = 3.0 * float(tiny_model.W_E.detach().double().std())
    if "gemma" in tiny_model.cfg.model_name.lower():
        assert pp.embedding_noise_std(tiny_model) == pytest.approx(w_e * tiny_model.cfg.d_model ** 0.5, rel=1e-4)
    else:
        assert pp.embedding_noise_std(tiny_model) == pytest.approx(w_e, rel=1e-4)


def test_check_facts_is_the_same_at_any_batch_size(tiny_llama, capital_facts):
    default = pp.check_facts(tiny_llama, capital_facts)  # rows from helpers.batching's memory budget
    single = pp.check_facts(tiny_llama, capital_facts, batch_size=1)
    assert [c.rank for c in default] == [c.rank for c in single]
    assert [c.prob for c in default] == pytest.approx([c.prob for c in single], rel=1e-4, abs=1e-7)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        pp.check_facts(tiny_llama, capital_facts, batch_size=0)
