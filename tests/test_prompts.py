import pytest
import torch

from helpers.prompts import chat_prompt, generate_greedy, single_token_id, tokenize

PROMPTS = ["When Mary and John went to the store, John gave a drink to", "Hi there", "One two three four"]


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batched_prompts_of_different_lengths_match_single_runs(tiny_model, padding_side):
    batch = tokenize(tiny_model, PROMPTS, padding_side=padding_side)
    with torch.no_grad():
        logits = tiny_model(batch.tokens, attention_mask=batch.attention_mask)
        for row, prompt in enumerate(PROMPTS):
            alone = tiny_model(tokenize(tiny_model, prompt).tokens)[0, -1]
            torch.testing.assert_close(logits[row, batch.last_positions[row]], alone, atol=1e-4, rtol=1e-4)



@pytest.mark.embedded
def test_pad_token_inside_chat_prompts_stays_attended(embedded_model):
    prompts = [chat_prompt(embedded_model, "Hi"), chat_prompt(embedded_model, "Tell me a long story about a dragon")]
    batch = tokenize(embedded_model, prompts, prepend_bos=False)
    pad = embedded_model.tokenizer.pad_token_id
    short = batch[0]
    real = short.tokens[short.attention_mask.bool()]
    assert (real == pad).any(), "the chat template's <|im_end|> is the pad token and must stay in the prompt"
    assert int(short.attention_mask.sum()) == len(embedded_model.tokenizer(prompts[0], add_special_tokens=False)["input_ids"])


@pytest.mark.embedded
def test_left_padding_is_exact_on_the_embedded_model(embedded_model):
    batch = tokenize(embedded_model, PROMPTS)
    with torch.no_grad():
        logits = embedded_model(batch.tokens, attention_mask=batch.attention_mask)[:, -1]
        for row, prompt in enumerate(PROMPTS):
            alone = embedded_model(tokenize(embedded_model, prompt).tokens)[0, -1]
            torch.testing.assert_close(logits[row], alone, atol=5e-4, rtol=1e-4)


def test_prepend_bos_and_lengths(tiny_llama):
    with_bos = tokenize(tiny_llama, "Hello world", prepend_bos=True)
    without = tokenize(tiny_llama, "Hello world", prepend_bos=False)
    assert with_bos.tokens.shape[1] == without.tokens.shape[1] + 1
    assert with_bos.tokens[0, 0].item() == tiny_llama.tokenizer.bos_token_id
    assert with_bos.lengths.tolist() == [with_bos.tokens.shape[1]]


def test_bad_inputs_are_clear_errors(tiny_llama):
    with pytest.raises(ValueError, match="non-empty"):
        tokenize(tiny_llama, [])
    with pytest.raises(ValueError, match="padding_side"):
        tokenize(tiny_llama, "x", padding_side="middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="exactly one"):
        single_token_id(tiny_llama, " Mary Johnson-Smithers")
    with pytest.raises(ValueError, match="left-padded"):
        generate_greedy(tiny_llama, tokenize(tiny_llama, "x", padding_side="right"))


def test_single_token_id_round_trips(tiny_llama):
    token = single_token_id(tiny_llama, " Mary")
    assert tiny_llama.tokenizer.decode([token]) == " Mary"


def test_generate_greedy_matches_a_naive_argmax_loop_per_prompt(tiny_llama):
    prompts = ["Once upon a time", "The"]
    texts = generate_greedy(tiny_llama, tokenize(tiny_llama, prompts), max_new_tokens=5)
    stop = {tiny_llama.tokenizer.eos_token_id, tiny_llama.tokenizer.pad_token_id}
    for prompt, text in zip(prompts, texts):
        tokens = tokenize(tiny_llama, prompt).tokens
        new = []
        with torch.no_grad():
            for _ in range(5):
                token = tiny_llama(tokens)[0, -1].argmax().item()
                if token in stop:
                    break
                new.append(token)
                tokens = torch.cat([tokens, torch.tensor([[token]])], dim=1)
        assert text == tiny_llama.tokenizer.decode(new, skip_special_tokens=True)


def test_chat_prompt_uses_the_template(tiny_llama):
    text = chat_prompt(tiny_llama, "Hello?")
    assert "Hello?" in text and text.rstrip().endswith("assistant")
