"""Tests of helpers.studies.ioi: the IOI dataset generator (tiny models share the embedded tokenizer) and
the IOI-specific analysis."""

from __future__ import annotations

import pytest
import torch

from helpers.studies import ioi
from helpers.studies.ioi import ABBA_TEMPLATES, BABA_TEMPLATES, make_ioi_dataset
from helpers.models import load_model


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama", seed=0)


@pytest.fixture(scope="module")
def data(tiny):
    return make_ioi_dataset(tiny, 24, seed=3, templates="mixed")


def _decode(model, token_id) -> str:
    return model.tokenizer.decode([int(token_id)])


# ------------------------------------------------------------------------------------------- templates


def test_paper_templates_and_abba_versions():
    assert len(BABA_TEMPLATES) == 15 and len(ABBA_TEMPLATES) == 15
    baba, abba = BABA_TEMPLATES[0], ABBA_TEMPLATES[0]
    assert baba == "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to"
    assert abba == "Then, [A] and [B] went to the [PLACE]. [B] gave a [OBJECT] to"
    for b, a in zip(BABA_TEMPLATES, ABBA_TEMPLATES):
        # only the first clause changes; the second [B] (S2) stays
        assert b.replace("[A]", "[X]").replace("[B]", "[X]") == a.replace("[A]", "[X]").replace("[B]", "[X]")
        assert b.count("[B]") == 2 and b.count("[A]") == 1 and a.index("[A]") < a.index("[B]")


def test_names_are_single_tokens_with_leading_space(tiny, data):
    tok = tiny.tokenizer
    assert len(data.name_pool) >= 50
    for name in data.name_pool:
        assert len(tok(" " + name, add_special_tokens=False)["input_ids"]) == 1
    kept = ioi.single_token_words(tok, ["Mary", "Xzqvbrt"])
    assert kept == ["Mary"]


# ------------------------------------------------------------------------------------------- dataset


def test_dataset_shapes_answers_and_seed(tiny, data):
    n = len(data)
    assert n == 24 and data.batch.tokens.shape[0] == n and data.answer_tokens.shape == (n, 2)
    for i in range(n):
        assert _decode(tiny, data.answer_tokens[i, 0]) == " " + data.io_names[i]
        assert _decode(tiny, data.answer_tokens[i, 1]) == " " + data.s_names[i]
        assert data.io_names[i] != data.s_names[i]
        assert not data.prompts[i].endswith(data.io_names[i])
    again = make_ioi_dataset(tiny, 24, seed=3, templates="mixed")
    other = make_ioi_dataset(tiny, 24, seed=4, templates="mixed")
    assert again.prompts == data.prompts
    assert other.prompts != data.prompts
    assert sorted(set(data.orders)) == ["ABBA", "BABA"] and data.orders.count("BABA") == 12


@pytest.mark.parametrize("order", ["BABA", "ABBA"])
def test_word_positions_point_at_the_names(tiny, order):
    d = make_ioi_dataset(tiny, 16, seed=0, templates=order)
    toks = d.batch.tokens
    width = toks.shape[1]
    assert len({len(p) for p in d.prompts}) > 1  # prompts of different lengths: left padding is exercised
    for i in range(len(d)):
        io, s1, s2, s1p1, end = (int(d.word_positions[k][i]) for k in ("IO", "S1", "S2", "S1+1", "END"))
        assert _decode(tiny, toks[i, io]) == " " + d.io_names[i]
        assert _decode(tiny, toks[i, s1]) == " " + d.s_names[i]
        assert _decode(tiny, toks[i, s2]) == " " + d.s_names[i]
        assert s1p1 == s1 + 1 and s1 < s2 < end
        assert end == width - 1 and _decode(tiny, toks[i, end]) == " to"
        assert bool(d.batch.attention_mask[i, min(io, s1):].all())
        assert (io < s1) == (order == "ABBA")
        assert d.orders[i] == order


def test_abc_corruption_is_aligned_with_fresh_names(tiny, data):
    abc = data.abc()
    assert abc.kind == "ABC" and abc.batch.tokens.shape == data.batch.tokens.shape
    assert torch.equal(abc.batch.attention_mask, data.batch.attention_mask)
    for k in ioi.WORD_POSITION_KEYS:
        assert torch.equal(abc.word_positions[k], data.word_positions[k])
    differs = abc.batch.tokens != data.batch.tokens
    name_cols = torch.stack([data.word_positions[k] for k in ("IO", "S1", "S2")], 1)
    for i in range(len(data)):
        names = {abc.io_names[i], abc.s_names[i], abc.s2_names[i]}
        assert len(names) == 3 and not names & {data.io_names[i], data.s_names[i]}
        # only the three name tokens change; template, place and object stay
        assert set(differs[i].nonzero().flatten().tolist()) == set(name_cols[i].tolist())
        assert abc.templates[i] == data.templates[i]
        assert _decode(tiny, abc.batch.tokens[i, data.word_positions["S2"][i]]) == " " + abc.s2_names[i]
    assert data.abc().prompts == abc.prompts and data.abc(seed=99).prompts != abc.prompts


def test_swap_names_exchanges_io_and_s(tiny, data):
    swapped = data.swap_names()
    assert swapped.io_names == data.s_names and swapped.s_names == data.io_names
    assert torch.equal(swapped.answer_tokens, data.answer_tokens.flip(-1))
    i = 0
    assert swapped.prompts[i].count(data.io_names[i]) == 2 and swapped.prompts[i].count(data.s_names[i]) == 1


def test_template_groups_are_position_aligned(data):
    for g in data.template_groups.unique():
        rows = (data.template_groups == g).nonzero().flatten()
        assert len({data.templates[int(r)] for r in rows}) == 1
        assert len({int(data.batch.lengths[r]) for r in rows}) == 1


def test_names_at_sentence_start_use_the_bare_token(tiny):
    template = "[B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to"
    d = make_ioi_dataset(tiny, 8, seed=1, templates=[template])
    tok = tiny.tokenizer
    for name in d.name_pool:  # every kept name is one token with and without the space
        assert len(tok(name, add_special_tokens=False)["input_ids"]) == 1
    for i in range(len(d)):
        assert d.prompts[i].startswith(d.s_names[i] + " and ")
        assert _decode(tiny, d.batch.tokens[i, d.word_positions["S1"][i]]) == d.s_names[i]  # no space
        assert _decode(tiny, d.batch.tokens[i, d.word_positions["S2"][i]]) == " " + d.s_names[i]
        assert _decode(tiny, d.batch.tokens[i, d.word_positions["IO"][i]]) == " " + d.io_names[i]
    abc = d.abc()
    assert torch.equal(abc.word_positions["S1"], d.word_positions["S1"])


def test_subset_keeps_everything_consistent(tiny, data):
    sub = data[[2, 5]]
    assert sub.prompts == [data.prompts[2], data.prompts[5]]
    assert torch.equal(sub.answer_tokens, data.answer_tokens[[2, 5]])
    assert torch.equal(sub.word_positions["S2"], data.word_positions["S2"][[2, 5]])
    assert len(data[:4]) == 4


def test_bad_arguments_raise_clear_errors(tiny):
    with pytest.raises(ValueError, match="n_prompts"):
        make_ioi_dataset(tiny, 0)
    with pytest.raises(ValueError, match="templates must be"):
        make_ioi_dataset(tiny, 4, templates="BAAB")
    with pytest.raises(ValueError, match="exactly one \\[A\\]"):
        make_ioi_dataset(tiny, 4, templates=["[A] gave a [OBJECT] to"])
    with pytest.raises(ValueError, match="single tokens"):
        make_ioi_dataset(tiny, 4, names=["Mary", "John", "Xzqvbrtplk"])
    with pytest.raises(ValueError, match="one token"):
        make_ioi_dataset(tiny, 4, places=["Xzqvbrtplk"])


def test_works_on_the_gpt2_layout_model():
    model = load_model("tiny-gpt2", seed=0)
    d = make_ioi_dataset(model, 6, seed=0, templates="BABA")
    logits = model(d.batch.tokens, attention_mask=d.batch.attention_mask)
    assert logits.shape[:2] == d.batch.tokens.shape


# ------------------------------------------------------------------------------------------- analysis


def test_baseline_matches_metrics(tiny, data):
    from helpers.metrics import logit_diff

    base = ioi.ioi_baseline(tiny, data)
    logits = tiny(data.batch.tokens, attention_mask=data.batch.attention_mask)
    assert base["logit_diff"] == pytest.approx(logit_diff(logits, data.answer_tokens, batch=data.batch).item(), abs=1e-5)
    last = logits[:, -1].softmax(-1)
    assert base["p_io"] == pytest.approx(last.gather(1, data.answer_tokens[:, :1]).mean().item(), abs=1e-6)
    assert base["p_s"] == pytest.approx(last.gather(1, data.answer_tokens[:, 1:]).mean().item(), abs=1e-6)
    # the fraction of prompts whose IO logit beats the S logit, counted one prompt at a time
    above = [float(logits[i, -1, data.answer_tokens[i, 0]] > logits[i, -1, data.answer_tokens[i, 1]])
             for i in range(len(data))]
    assert base["frac_io_above_s"] == pytest.approx(sum(above) / len(above), abs=1e-6)  # float32 mean
    assert 0 < sum(above) < len(above)  # a random model: some prompts each way, so a wrong count shows


def test_attention_scores_match_the_cache(tiny, data):
    scores = ioi.attention_scores(tiny, data)
    assert set(scores) == set(ioi.ATTENTION_SCORE_KEYS)
    _, cache = tiny.run_with_cache(data.batch.tokens, attention_mask=data.batch.attention_mask)
    layer, head = 1, 2
    pattern = cache[f"blocks.{layer}.attn.hook_pattern"][:, head]
    pos = data.word_positions
    manual = torch.stack([pattern[b, pos["S2"][b], pos["S1+1"][b]] for b in range(len(data))]).mean()
    assert scores["S2->S1+1"][layer, head] == pytest.approx(manual.item(), abs=1e-6)
    assert torch.allclose(scores["END->S"], scores["END->S1"] + scores["END->S2"])
    # previous-token score: attention t -> t-1 over the real positions from the 3rd real token on
    total, count = 0.0, 0
    for b in range(len(data)):
        first = data.batch.tokens.shape[1] - int(data.batch.lengths[b])
        for q in range(first + 2, data.batch.tokens.shape[1]):
            total, count = total + float(pattern[b, q, q - 1]), count + 1
    assert float(scores["previous token"][layer, head]) == pytest.approx(total / count, abs=1e-5)


def _naive_copy_logits(model, layer, head, names, negative=False):
    """The copy score's logits ``[name, d_vocab]`` written out from the Hugging Face weights (not the bridge's
    W_V/W_O): the name's residual after the embedding and block 0's MLP (block 0's attention off), the
    head's input norm, value and output projections — query head ``h`` of a grouped-query model reads
    value head ``h // (n_heads / n_kv_heads)`` — then the final norm and the unembedding."""
    import math

    cfg, hf = model.cfg, model.original_model
    d_head, n_heads = cfg.d_head, cfg.n_heads
    ids = torch.tensor([model.tokenizer(" " + n, add_special_tokens=False)["input_ids"][0] for n in names])
    if hasattr(hf, "transformer"):  # GPT-2: LayerNorm, Conv1D weights [in, out], learned positions
        t, eps = hf.transformer, hf.config.layer_norm_epsilon

        def ln(x, module):
            return torch.nn.functional.layer_norm(x, (cfg.d_model,), module.weight, module.bias, eps)

        def gelu_new(x):
            return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

        x = t.wte.weight[ids] + t.wpe.weight[1]  # BOS at position 0, the name at position 1
        block0 = t.h[0]
        x = x + gelu_new(ln(x, block0.ln_2) @ block0.mlp.c_fc.weight + block0.mlp.c_fc.bias) @ block0.mlp.c_proj.weight \
            + block0.mlp.c_proj.bias
        attn = t.h[layer].attn
        value_cols = slice(2 * cfg.d_model + head * d_head, 2 * cfg.d_model + (head + 1) * d_head)
        v = ln(x, t.h[layer].ln_1) @ attn.c_attn.weight[:, value_cols] + attn.c_attn.bias[value_cols]
        out = v @ attn.c_proj.weight[head * d_head:(head + 1) * d_head]
        final = ln(-out if negative else out, t.ln_f)
        return final @ t.wte.weight.T, ids
    m, eps = hf.model, hf.config.rms_norm_eps

    def rms(x, module):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * module.weight

    x = m.embed_tokens.weight[ids]  # rotary positions only touch attention, which is off in block 0
    mlp = m.layers[0].mlp
    h0 = rms(x, m.layers[0].post_attention_layernorm)
    x = x + (torch.nn.functional.silu(h0 @ mlp.gate_proj.weight.T) * (h0 @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    attn = m.layers[layer].self_attn
    kv = head // (n_heads // cfg.n_key_value_heads)
    v = rms(x, m.layers[layer].input_layernorm) @ attn.v_proj.weight[kv * d_head:(kv + 1) * d_head].T
    out = v @ attn.o_proj.weight[:, head * d_head:(head + 1) * d_head].T
    final = rms(-out if negative else out, m.norm)
    return final @ hf.lm_head.weight.T, ids


def _naive_copy_score_bounds(model, layer, head, names, top_k, negative=False):
    """(lowest, highest) score the naive logits allow: a name whose logit is within float noise of the
    k-th largest could fall on either side of the top-k cut, and counts as in for the upper bound only."""
    with torch.no_grad():
        logits, ids = _naive_copy_logits(model, layer, head, names, negative)
    own = logits.gather(1, ids[:, None])[:, 0]
    cut = logits.topk(top_k, dim=-1).values[:, -1]
    noise = 1e-4 * logits.abs().amax(-1).clamp(min=1e-6)
    surely_in, maybe_in = own > cut + noise, own >= cut - noise
    return surely_in.float().mean().item(), maybe_in.float().mean().item()


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-gpt2"])
def test_copy_scores_match_a_naive_implementation(model_name, data):
    """Every head, both signs, against the definition written out from the HF weights (random weights
    scaled up so that the logits spread, and random norm weights and biases so that the norms and b_V
    matter; a top_k in the tail, where the scores vary between heads)."""
    model = load_model(model_name, seed=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.original_model.named_parameters():
            if param.ndim == 2 and ("attn" in name or "mlp" in name):
                param.mul_(4.0)
            elif param.ndim == 1:  # norm weights around 1, biases around 0
                noise = torch.randn(param.shape, generator=generator)
                param.copy_(0.2 * noise if name.endswith("bias") else 1.0 + 0.5 * noise)
    names = data.name_pool[:20]
    heads = [(layer, head) for layer in range(model.cfg.n_layers) for head in range(model.cfg.n_heads)]
    top_k = 5000
    seen = set()
    for negative in (False, True):
        scores = ioi.copy_scores(model, heads, names, top_k=top_k, negative=negative)
        assert list(scores) == heads
        for layer, head in heads:
            low, high = _naive_copy_score_bounds(model, layer, head, names, top_k, negative)
            assert low <= scores[(layer, head)] <= high, (layer, head, negative, low, high)
            assert high - low <= 0.05 + 1e-6  # at most one of the 20 names is ambiguous
            seen.add(round(low, 3))
    assert len(seen) >= 4, f"the scores should differ between heads so that the comparison can fail: {seen}"


def test_in_context_copy_scores_match_a_naive_implementation_on_the_hf_hidden_states(data):
    """Every head of tiny-llama (weights scaled so the logits spread, random norm gains), both signs: the
    input is the Hugging Face model's own hidden state entering the head's layer at each prompt's IO token
    (``output_hidden_states``), sent through the head's value/output rows, the final RMSNorm and lm_head.
    Reading resid_post, another position, or another value head gives other scores."""
    model = load_model("tiny-llama", seed=0)
    cfg, hf = model.cfg, model.original_model
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if param.ndim == 2 and ("self_attn" in name or "mlp" in name):
                param.mul_(4.0)
            elif param.ndim == 1:
                param.copy_(1.0 + 0.5 * torch.randn(param.shape, generator=generator))
    m, eps, d_head = hf.model, hf.config.rms_norm_eps, cfg.d_head
    group = cfg.n_heads // cfg.n_key_value_heads

    def rms(x, module):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * module.weight

    tokens, where = data.batch.tokens, data.word_positions["IO"]
    rows = torch.arange(tokens.shape[0])
    ids = tokens[rows, where]
    with torch.no_grad():
        hidden = hf(input_ids=tokens, attention_mask=data.batch.attention_mask, output_hidden_states=True).hidden_states
    heads = [(layer, head) for layer in range(cfg.n_layers) for head in range(cfg.n_heads)]
    top_k, seen = 3000, set()
    for negative in (False, True):
        scores = ioi.in_context_copy_scores(model, heads, data, top_k=top_k, negative=negative)
        assert list(scores) == heads
        for layer, head in heads:
            attn, kv = m.layers[layer].self_attn, head // group
            with torch.no_grad():
                x = hidden[layer][rows, where]
                v = rms(x, m.layers[layer].input_layernorm) @ attn.v_proj.weight[kv * d_head:(kv + 1) * d_head].T
                out = v @ attn.o_proj.weight[:, head * d_head:(head + 1) * d_head].T
                logits = rms(-out if negative else out, m.norm) @ hf.lm_head.weight.T
            own, cut = logits.gather(1, ids[:, None])[:, 0], logits.topk(top_k, dim=-1).values[:, -1]
            noise = 1e-4 * logits.abs().amax(-1)
            low, high = (own > cut + noise).float().mean().item(), (own >= cut - noise).float().mean().item()
            assert low <= scores[(layer, head)] <= high, (layer, head, negative, low, high)
            seen.add(round(low, 3))
    assert len(seen) >= 4, f"the scores should differ between heads so that the comparison can fail: {seen}"
    with pytest.raises(ValueError, match="position must be one of"):
        ioi.in_context_copy_scores(model, heads[:1], data, position="nowhere")
    with pytest.raises(ValueError, match="top_k must be"):
        ioi.in_context_copy_scores(model, heads[:1], data, top_k=0)
    with pytest.raises(ValueError, match="outside the model"):
        ioi.in_context_copy_scores(model, [(cfg.n_layers, 0)], data)


def test_copy_scores_read_each_query_heads_own_value_head_in_grouped_query_attention(data):
    """A hand-built layer of tiny-llama (4 query heads, 2 key/value heads): value head 0 and value head 1
    carry opposite OV circuits that copy (resp. anti-copy) 16 names exactly; query heads 0, 1 read value
    head 0 and 2, 3 read value head 1. So heads 0, 1 copy every name (score 1, negative score 0) and heads
    2, 3 write minus every name (score 0, negative score 1). Reading value head ``h`` or ``h % 2`` instead
    of ``h // 2`` gives other scores."""
    model = load_model("tiny-llama", seed=0)
    cfg, hf = model.cfg, model.original_model
    layer, d_head = 1, cfg.d_head
    assert (cfg.n_heads, cfg.n_key_value_heads) == (4, 2)
    names = data.name_pool[:d_head]
    resid, ids = ioi.name_token_residuals(model, names)
    with torch.no_grad():
        normed = model.blocks[layer].ln1(resid[None])[0]                     # [name, d_model]
        targets = hf.lm_head.weight[ids] / hf.model.norm.weight              # after the final norm: W_U[name]
        gram = normed @ normed.T                                             # [name, name], invertible
        values = normed.T                                                    # W_V: v = Gram row of the name
        outputs = torch.linalg.solve(gram, targets)                          # W_O: Gram row -> target
        attn = hf.model.layers[layer].self_attn
        attn.v_proj.weight[:d_head] = values.T                               # value head 0
        attn.v_proj.weight[d_head:2 * d_head] = -values.T                    # value head 1: the opposite
        for head in range(cfg.n_heads):
            attn.o_proj.weight[:, head * d_head:(head + 1) * d_head] = outputs.T
    heads = [(layer, h) for h in range(cfg.n_heads)]
    assert ioi.copy_scores(model, heads, names, top_k=1) == {(layer, 0): 1.0, (layer, 1): 1.0, (layer, 2): 0.0,
                                                             (layer, 3): 0.0}
    assert ioi.copy_scores(model, heads, names, top_k=1, negative=True) == {(layer, 0): 0.0, (layer, 1): 0.0,
                                                                             (layer, 2): 1.0, (layer, 3): 1.0}
    # top_k = vocabulary size: every name is always in the top k
    assert ioi.copy_scores(model, heads[:1], names[:3], top_k=cfg.d_vocab)[heads[0]] == 1.0


def test_copy_scores_on_the_gemma3_layout_go_through_the_post_attention_norm():
    model = load_model("tiny-gemma3", seed=0)
    names = make_ioi_dataset(model, 8, seed=3).name_pool[:6]
    resid, ids = ioi.name_token_residuals(model, names)
    block = model.blocks[1]
    out = block.ln1(resid[None])[0] @ model.W_V[1, 0] @ model.W_O[1, 2]  # one key/value head serves all four query heads

    def ranks(head_out):
        logits = model.unembed(model.ln_final(head_out[None]))[0]
        return (logits > logits.gather(-1, ids[:, None])).sum(-1)

    with torch.no_grad():
        with_norm, without_norm = ranks(block.ln1_post(out[None])[0]), ranks(out)
    assert not torch.equal(with_norm, without_norm), "the post-attention norm should matter here"
    for k in (1, 10, 100, 1000, 10000):
        expected = (with_norm < k).float().mean().item()
        assert ioi.copy_scores(model, [(1, 2)], names, top_k=k)[(1, 2)] == pytest.approx(expected), k


def test_mean_ablation_keeps_and_replaces_exactly(tiny, data):
    abc = data.abc()
    means = ioi.template_mean_z(tiny, abc)
    circuit = {(2, 1): ("END",), (1, 3): ("S2", "S1+1")}
    hooks = ioi.mean_ablation_hooks(tiny, data, abc, keep=circuit, means=means)
    seen = {}

    def recorder(layer):
        def hook(z, hook):
            seen[layer] = z.detach().clone()
        return hook

    record = [(f"blocks.{l}.attn.hook_z", recorder(l)) for l in range(tiny.cfg.n_layers)]
    tiny.run_with_hooks(data.batch.tokens, attention_mask=data.batch.attention_mask, fwd_hooks=hooks + record)
    _, abc_cache = tiny.run_with_cache(abc.batch.tokens, attention_mask=abc.batch.attention_mask)
    abc_z2 = abc_cache["blocks.2.attn.hook_z"]
    # an ablated head (2.0) at every position = mean of its z over the ABC prompts of the same template
    for row in range(len(data)):
        same = (abc.template_groups == data.template_groups[row]).nonzero().flatten()
        assert torch.allclose(seen[2][row, :, 0], abc_z2[same, :, 0].mean(0), atol=1e-5)
    # the kept head 2.1 is ablated everywhere except END, where it is its own (recomputed) output
    end = int(data.word_positions["END"][0])
    same0 = (abc.template_groups == data.template_groups[0]).nonzero().flatten()
    assert torch.allclose(seen[2][0, :end, 1], abc_z2[same0, :end, 1].mean(0), atol=1e-5)
    assert not torch.allclose(seen[2][0, end, 1], abc_z2[same0, end, 1].mean(0), atol=1e-4)
    # no circuit and no knock-out: nothing is ablated, F(M) is the clean logit difference
    assert ioi.mean_ablation_hooks(tiny, data, abc, keep=None, means=means) == []
    base = ioi.ioi_baseline(tiny, data)["logit_diff"]
    assert ioi.ablated_logit_diff(tiny, data, abc, keep=None, means=means) == pytest.approx(base, abs=1e-5)
    with pytest.raises(ValueError, match="unknown position"):
        ioi.mean_ablation_hooks(tiny, data, abc, keep={(0, 0): ("S3",)}, means=means)
    with pytest.raises(ValueError, match="reference"):
        ioi.mean_ablation_hooks(tiny, data, make_ioi_dataset(tiny, 4, seed=0, templates="BABA").abc(), keep=circuit)


def _naive_circuit_logit_diff(model, data, reference, circuit=None, knock_out=()):
    """F written out: every head's z at a position where it is not kept is replaced by its mean over the
    reference prompts of the same template string at that position. ``circuit=None``: all heads kept
    except ``knock_out`` (M \\ K); else only the circuit's heads at their word positions, minus
    ``knock_out`` (C \\ K). Mean logit(IO) - logit(S) at the last position (the batch is left-padded)."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    batch, width = data.batch.tokens.shape
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(n_layers)]
    with torch.no_grad():
        _, ref_cache = model.run_with_cache(reference.batch.tokens, attention_mask=reference.batch.attention_mask,
                                            names_filter=names)
    removed = {tuple(h) for h in knock_out}
    hooks = []
    for layer, name in enumerate(names):
        kept = torch.zeros(batch, width, n_heads, dtype=torch.bool)
        if circuit is None:
            kept[:] = True
            for l_, h in removed:
                if l_ == layer:
                    kept[:, :, h] = False
        else:
            for (l_, h), keys in circuit.items():
                if l_ == layer and (l_, h) not in removed:
                    for key in keys:
                        for row in range(batch):
                            kept[row, int(data.word_positions[key][row]), h] = True
        means = torch.stack([ref_cache[name][[j for j, t in enumerate(reference.templates) if t == template]].mean(0)
                             for template in data.templates])  # [batch, pos, head, d_head]

        def hook(z, hook, kept=kept, means=means):
            return torch.where(kept[..., None], z, means)

        hooks.append((name, hook))
    with torch.no_grad():
        logits = model.run_with_hooks(data.batch.tokens, attention_mask=data.batch.attention_mask, fwd_hooks=hooks)
    last = logits[:, -1]
    rows = torch.arange(batch)
    return (last[rows, data.answer_tokens[:, 0]] - last[rows, data.answer_tokens[:, 1]]).mean().item()


@pytest.fixture(scope="module")
def sharp():
    """tiny-llama with larger attention/MLP weights: ablation effects well above float noise."""
    model = load_model("tiny-llama", seed=0)
    with torch.no_grad():
        for name, param in model.original_model.named_parameters():
            if param.ndim == 2 and ("attn" in name or "mlp" in name):
                param.mul_(4.0)
    return model


CLASSES = {"name mover": [(2, 1), (2, 0)], "s-inhibition": [(1, 0), (1, 2)], "induction": [(1, 3)]}


def test_faithfulness_matches_a_naive_mean_ablation(sharp):
    data = make_ioi_dataset(sharp, 24, seed=3, templates="mixed")
    abc = data.abc()
    circuit = ioi.circuit_from_classes(CLASSES)
    assert circuit == {(1, 0): ("END",), (1, 2): ("END",), (1, 3): ("S2",), (2, 0): ("END",), (2, 1): ("END",)}
    report = ioi.faithfulness(sharp, data, abc, circuit)
    assert report.full_model == pytest.approx(ioi.ioi_baseline(sharp, data)["logit_diff"], abs=1e-6)
    assert report.full_model == pytest.approx(_naive_circuit_logit_diff(sharp, data, abc), abs=1e-6)
    assert report.circuit == pytest.approx(_naive_circuit_logit_diff(sharp, data, abc, circuit), abs=1e-6)
    assert report.everything_ablated == pytest.approx(_naive_circuit_logit_diff(sharp, data, abc, {}), abs=1e-6)
    assert report.fraction_recovered == pytest.approx(report.circuit / report.full_model)
    assert abs(report.circuit - report.full_model) > 5e-4 and abs(report.circuit - report.everything_ablated) > 5e-4


def test_minimality_scores_match_a_naive_recomputation(sharp):
    """For each circuit head v: max over K in {∅, v's other class members} of |F(C \\ (K ∪ {v})) - F(C \\ K)|,
    with F written out (:func:`_naive_circuit_logit_diff`)."""
    data = make_ioi_dataset(sharp, 24, seed=3, templates="mixed")
    abc = data.abc()
    circuit = ioi.circuit_from_classes(CLASSES)
    head_class = {head: cls for cls, heads in CLASSES.items() for head in heads}
    f_model = _naive_circuit_logit_diff(sharp, data, abc)
    mini = ioi.minimality_scores(sharp, data, abc, circuit, CLASSES, progress=False).set_index("head")
    assert list(mini.index) == [f"{l}.{h}" for l, h in circuit]
    chose_class = 0
    for head in circuit:
        others = [h for h in CLASSES[head_class[head]] if h != head]
        by_k = {"∅": abs(_naive_circuit_logit_diff(sharp, data, abc, circuit, [head])
                        - _naive_circuit_logit_diff(sharp, data, abc, circuit))}
        if others:
            by_k["same class"] = abs(_naive_circuit_logit_diff(sharp, data, abc, circuit, [head, *others])
                                     - _naive_circuit_logit_diff(sharp, data, abc, circuit, others))
        best = max(by_k, key=by_k.get)
        row = mini.loc[f"{head[0]}.{head[1]}"]
        assert row["class"] == head_class[head]
        assert row["score"] == pytest.approx(by_k[best], abs=1e-6), (head, by_k)
        assert row["K"] == best, (head, by_k)
        assert row["fraction_of_F(M)"] == pytest.approx(by_k[best] / f_model, rel=1e-4)
        assert row["score"] > 2e-5  # every head matters a little, so a wrong F shows
        chose_class += best == "same class"
    assert 0 < chose_class < len(circuit), "both choices of K should occur, so that a wrong choice shows"


def test_completeness_scores_match_a_naive_recomputation(sharp):
    """|F(C \\ K) - F(M \\ K)| for K = ∅, each class, and seeded random halves of the circuit (each head in
    with probability 1/2, drawn from random.Random(seed) in circuit order)."""
    import random

    data = make_ioi_dataset(sharp, 24, seed=3, templates="mixed")
    abc = data.abc()
    circuit = ioi.circuit_from_classes(CLASSES)
    comp = ioi.completeness_scores(sharp, data, abc, circuit, CLASSES, n_random=3, seed=5, progress=False)
    rng = random.Random(5)
    sets = [("∅", [])] + [(cls, heads) for cls, heads in CLASSES.items()]
    sets += [(f"random half {i + 1}", [h for h in circuit if rng.random() < 0.5]) for i in range(3)]
    assert list(comp["K"]) == [label for label, _ in sets]
    for (label, knock), (_, row) in zip(sets, comp.iterrows()):
        f_c = _naive_circuit_logit_diff(sharp, data, abc, circuit, knock)
        f_m = _naive_circuit_logit_diff(sharp, data, abc, None, knock)
        assert row["size"] == len(knock), label
        assert row["F(C\\K)"] == pytest.approx(f_c, abs=1e-6), label
        assert row["F(M\\K)"] == pytest.approx(f_m, abs=1e-6), label
        assert row["incompleteness"] == pytest.approx(abs(f_c - f_m), abs=1e-6), label
    assert comp["incompleteness"].max() > 1e-3
    assert len({tuple(k) for _, k in sets[-3:]}) > 1  # the random halves differ


def test_class_rules_follow_the_thresholds():
    de = torch.zeros(3, 4)
    de[2, 1], de[2, 2], de[2, 3], de[1, 0] = 1.0, -0.5, 0.8, 0.01
    attention = {k: torch.zeros(3, 4) for k in ioi.ATTENTION_SCORE_KEYS}
    attention["END->IO"][2, 1] = attention["END->IO"][2, 2] = 0.6
    attention["END->S"][2, 3] = 0.7  # attends S: not a name mover
    classes = ioi.direct_effect_classes(de, attention, clean_logit_diff=3.0)
    assert classes == {"name mover": [(2, 1)], "negative name mover": [(2, 2)], "other direct effect": [(2, 3)]}
    strict = ioi.direct_effect_classes(de, attention, 3.0, copy={(2, 1): 0.3})
    assert strict["name mover"] == []
    path = torch.full((3, 4), float("nan"))
    path[1, 2], path[1, 3], path[0, 0] = 0.7, 0.99, 0.9
    assert ioi.s_inhibition_heads(path, exclude=[(0, 0)]) == [(1, 2)]
    attention["S2->S1+1"][1, 1] = 0.8
    attention["S2->S1"][0, 2] = 0.5
    attention["previous token"][0, 3] = 0.9
    attention["previous token"][1, 3] = 0.9  # same layer as the induction head: cannot feed it
    found = ioi.pattern_classes(attention, before_layer=2)
    assert found == {"induction": [(1, 1)], "duplicate token": [(0, 2)], "previous token": [(0, 3)]}
    assert ioi.pattern_classes(attention, before_layer=1)["induction"] == []  # must precede S-inhibition
    patching = torch.full((3, 4), 0.1)
    patching[1, 1] = 0.0
    strict = ioi.HeadClassRules(pattern_causal_effect=0.05)
    assert ioi.pattern_classes(attention, patching, before_layer=2, rules=strict)["induction"] == []
    assert ioi.pattern_classes(attention, patching, before_layer=2)["induction"] == [(1, 1)]


def test_analysis_runs_on_the_gpt2_layout():
    """The paper profile's model layout (LayerNorm, biases, learned positions): every analysis step runs."""
    model = load_model("tiny-gpt2", seed=0)
    d = make_ioi_dataset(model, 8, seed=0, templates="mixed")
    abc = d.abc()
    scores = ioi.attention_scores(model, d)
    assert scores["END->IO"].shape == (model.cfg.n_layers, model.cfg.n_heads)
    copy = ioi.copy_scores(model, [(0, 0), (2, 1)], d.name_pool[:10])
    assert set(copy) == {(0, 0), (2, 1)}  # values: test_copy_scores_match_a_naive_implementation[tiny-gpt2]
    report = ioi.faithfulness(model, d, abc, {(2, 1): ("END",)})
    assert report.full_model == pytest.approx(ioi.ioi_baseline(model, d)["logit_diff"], abs=1e-4)
    assert report.everything_ablated == pytest.approx(ioi.ablated_logit_diff(model, d, abc, keep={}), abs=1e-6)


@pytest.mark.embedded
def test_embedded_model_solves_ioi_and_abc_removes_the_signal():
    model = load_model("embedded")
    d = make_ioi_dataset(model, 16, seed=0, templates="mixed")
    clean = ioi.ioi_baseline(model, d)
    corrupted = ioi.ioi_baseline(model, d.abc(), answer_tokens=d.answer_tokens)
    swapped = ioi.ioi_baseline(model, d.swap_names(), answer_tokens=d.answer_tokens)
    assert clean["logit_diff"] > 2.0 and clean["frac_io_above_s"] >= 0.75
    assert abs(corrupted["logit_diff"]) < 1.0
    assert swapped["logit_diff"] < -1.0


def test_head_class_table_adds_extra_score_columns():
    classes = {"name mover": [(1, 2), (0, 1)]}
    table = ioi.head_class_table(classes, copy={(1, 2): 0.9, (0, 1): 0.4}, scores={"copy score (paper)": {(1, 2): 0.0}})
    assert list(table["head"]) == ["1.2", "0.1"]
    assert list(table["copy score"]) == [0.9, 0.4]
    assert table.loc[0, "copy score (paper)"] == 0.0 and table["copy score (paper)"].isna().tolist() == [False, True]
