"""The batched greedy loop equals transformers' own greedy generate, batched or one prompt at a time, with text
stops, stop ids and suppressed ids (transformers' equivalents: eos_token_id lists, suppress_tokens,
begin_suppress_tokens)."""

from __future__ import annotations

import pytest
import torch

from app.lm.generate import StopRule, _slot_layer, generate, generate_ids, length_sorted_batches, prefill_chunks
from app.lm.modeling import load_tokenizer
from conftest import tiny_config

PROMPTS = ["Premise: Anna is reading in the park.\nHypothesis: Anna is indoors.\nAnswer: ",
           "x", "In the kitchen, Ben is cooking. " * 3, '{"thought_process": "The', "Hugo is outdoors."]


def reference(model, tokenizer, prompt: str, n: int) -> str:
    enc = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)


def test_matches_transformers_generate_batched_and_alone(model_and_tokenizer):
    model, tok = model_and_tokenizer
    want = [reference(model, tok, p, 12) for p in PROMPTS]
    assert generate(model, tok, PROMPTS, batch_size=8, max_new_tokens=12, device="cpu", rule=StopRule()) == want
    assert generate(model, tok, PROMPTS, batch_size=1, max_new_tokens=12, device="cpu", rule=StopRule()) == want


def nli_prompts(model, tmp_path) -> list[str]:
    """Prompts of the default template: they share its instruction (>= 30 tokens)."""
    from app.tasks.nli_cot.prompts import build_prompt

    cfg = tiny_config(model.name_or_path, tmp_path)
    rows = [("In the museum, Carla is cooking.", "Carla is cooking indoors."), ("x", "y"),
            ("In the beach, Grace is waiting. " * 4, "Grace is waiting indoors."), ("", "")]
    return [build_prompt({"premise": p, "hypothesis": h}, cfg) for p, h in rows]


@pytest.mark.parametrize("prefill_tokens", [1, 40, 10_000])
@pytest.mark.parametrize("shared", [False, True])
def test_chunked_prefill_and_shared_prefix_give_the_same_generations(model_and_tokenizer, tmp_path, shared,
                                                                     prefill_tokens):
    """Chunks of every size (one row each, a few rows, the whole batch), with or without a prompt prefix common
    to the batch (prefilled once), merge into the same decoding as transformers' generate."""
    from app.lm.forward import shared_prefix_length

    model, tok = model_and_tokenizer
    prompts = nli_prompts(model, tmp_path) if shared else PROMPTS
    assert (shared_prefix_length(tok(prompts).input_ids) >= 30) == shared
    want = [reference(model, tok, p, 12) for p in prompts]
    got = generate(model, tok, prompts, batch_size=8, max_new_tokens=12, device="cpu", rule=StopRule(),
                   prefill_tokens=prefill_tokens)
    assert got == want


@pytest.mark.parametrize("prefill_tokens", [1, 100, 10_000])
def test_next_token_logits_equal_one_prompt_at_a_time(model_and_tokenizer, tmp_path, prefill_tokens):
    from app.lm.generate import next_token_logits
    from app.tasks.nli_cot.prompts import build_prompt

    model, tok = model_and_tokenizer
    cfg = tiny_config(model.name_or_path, tmp_path)
    prompts = [build_prompt({"premise": p, "hypothesis": "Anna is indoors."}, cfg) for p in
               ("Anna reads.", "In the park, Anna reads. " * 3, "", "Anna is cooking in the museum.")]
    ids = tok(prompts).input_ids
    got = next_token_logits(model, ids, tok.pad_token_id, "cpu", prefill_tokens)
    with torch.no_grad():
        want = torch.stack([model(input_ids=torch.tensor([x])).logits[0, -1] for x in ids])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_sliding_window_model_falls_back_to_one_prefill(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32, sliding_window=6).eval()
    tok = load_tokenizer(tiny_config(tiny_model_dir, tmp_path))
    want = [reference(model, tok, p, 10) for p in PROMPTS]
    assert generate(model, tok, PROMPTS, batch_size=8, max_new_tokens=10, device="cpu", rule=StopRule(),
                    prefill_tokens=30) == want


def test_prefill_chunks_respect_the_token_budget():
    lengths = [50, 40, 40, 30, 10, 10, 10, 5]
    chunks = prefill_chunks(lengths, 100)
    assert [list(c) for c in chunks] == [[0, 1], [2, 3], [4, 5, 6, 7]]
    assert prefill_chunks([500, 3], 100) == [range(0, 1), range(1, 2)]  # a row wider than the budget goes alone


def test_slot_layer_appends_selects_and_grows():
    keys, values = torch.randn(3, 2, 4, 5), torch.randn(3, 2, 4, 5)
    layer = _slot_layer(keys.clone(), values.clone(), length=2)
    new_k, new_v = torch.randn(3, 2, 1, 5), torch.randn(3, 2, 1, 5)
    k, v = layer.update(new_k, new_v)
    assert torch.equal(k, torch.cat([keys[:, :, :2], new_k], 2)) and torch.equal(v, torch.cat([values[:, :, :2], new_v], 2))
    layer.batch_select_indices(torch.tensor([2, 0]))
    more = torch.randn(2, 2, 4, 5)  # past the buffer's 4 slots: it grows
    k, _ = layer.update(more, more)
    assert k.shape == (2, 2, 7, 5) and layer.get_seq_length() == 7
    assert torch.equal(k[:, :, :3], torch.cat([keys[:, :, :2], new_k], 2)[[2, 0]]) and torch.equal(k[:, :, 3:], more)


def test_rows_stop_when_their_json_closes(model_and_tokenizer):
    model, tok = model_and_tokenizer
    seen = []

    def stop(text):
        seen.append(text)
        return True  # every row stops at its first trigger token

    out = generate(model, tok, PROMPTS, batch_size=8, max_new_tokens=30, device="cpu",
                   rule=StopRule(text=stop, text_triggers="e"))
    full = generate(model, tok, PROMPTS, batch_size=8, max_new_tokens=30, device="cpu", rule=StopRule())
    for short, long in zip(out, full):
        assert long.startswith(short)
        if "e" in long:  # cut right after the first token holding an "e"
            assert "e" in short and len(short) <= len(long)
    assert seen


def test_length_sorted_batches_cover_every_index_once():
    batches = length_sorted_batches([5, 1, 9, 3, 7, 2, 8], 3)
    assert sorted(i for b in batches for i in b) == list(range(7))
    assert batches[0] == [2, 6, 4]


# --- token-id prompts, stop ids, suppressed ids ------------------------------------------------------------------------
def reference_ids(model, tokenizer, prompt: list[int], n: int, stop_ids=(), **kwargs) -> list[int]:
    """transformers' greedy generate on one prompt, stopping at EOS or a stop id; EOS dropped, a stop id kept."""
    eos = tokenizer.eos_token_id
    out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=[eos, *stop_ids], **kwargs)[0, len(prompt):].tolist()
    return out[:-1] if out and out[-1] == eos and eos not in stop_ids else out


def test_generate_ids_in_input_order_equal_one_prompt_at_a_time(model_and_tokenizer):
    model, tok = model_and_tokenizer
    ids = tok(PROMPTS).input_ids
    assert sorted(range(len(ids)), key=lambda i: -len(ids[i])) != list(range(len(ids)))  # batches reorder them
    want = [reference_ids(model, tok, x, 12) for x in ids]
    assert generate_ids(model, tok, ids, batch_size=8, max_new_tokens=12, device="cpu") == want
    assert generate_ids(model, tok, ids, batch_size=2, max_new_tokens=12, device="cpu", prefill_tokens=1) == want
    assert [generate_ids(model, tok, [x], 1, 12, "cpu")[0] for x in ids] == want
    texts = generate(model, tok, PROMPTS, batch_size=8, max_new_tokens=12, device="cpu", rule=StopRule())
    assert texts == [tok.decode(w, skip_special_tokens=True) for w in want]  # the text entry point: the same loop


def test_stop_ids_end_a_row_and_are_kept(model_and_tokenizer):
    model, tok = model_and_tokenizer
    ids = tok(PROMPTS).input_ids
    free = generate_ids(model, tok, ids, 8, 12, "cpu")
    stop_ids = {free[0][3], free[2][5]}  # ids the rows generate mid-way when nothing stops them
    got = generate_ids(model, tok, ids, 8, 12, "cpu", StopRule(stop_ids=stop_ids))
    assert got == [reference_ids(model, tok, x, 12, sorted(stop_ids)) for x in ids]
    for row, full in zip(got, free):
        cut = next((k for k, t in enumerate(full) if t in stop_ids), None)
        assert row == (full if cut is None else full[: cut + 1])  # the prefix up to and with the first stop id
    assert sum(row[-1] in stop_ids for row in got) >= 2 and all(sum(t in stop_ids for t in row) <= 1 for row in got)


@pytest.mark.parametrize("batch_size", [1, 8])
def test_never_ids_are_never_generated_and_not_first_ids_never_first(model_and_tokenizer, batch_size):
    model, tok = model_and_tokenizer
    ids = tok(PROMPTS).input_ids
    free = generate_ids(model, tok, ids, 8, 12, "cpu")
    never = sorted({free[0][1], free[1][0], free[3][2]})  # ids the free rows generate (row 1 starts with one)
    not_first = sorted({g[0] for g in free} - set(never))
    rule = StopRule(never=never, not_first=not_first)
    got = generate_ids(model, tok, ids, batch_size, 12, "cpu", rule)
    want = [reference_ids(model, tok, x, 12, suppress_tokens=never, begin_suppress_tokens=not_first) for x in ids]
    assert got == want
    assert all(not set(g) & set(never) and g[0] not in not_first for g in got)
    assert all(g != f for g, f in zip(got, free))  # every row was steered
    assert any(set(g[1:]) & set(not_first) for g in got)  # not_first ids stay allowed after the first step


def test_confidence_rule_stops_at_a_token_never_first(model_and_tokenizer):
    """The confidence-token task's rule (app.tasks.confidence_tokens.judge.continuation_rule): stop ids, EOS and stop
    ids barred from the first step, some ids never generated, against transformers' generate with the same settings."""
    from app.tasks.confidence_tokens.judge import continuation_rule

    model, tok = model_and_tokenizer
    ids = tok(PROMPTS).input_ids
    free = generate_ids(model, tok, ids, 8, 12, "cpu")
    stop_ids = sorted({free[0][0], free[2][4], free[4][3]})  # row 0 would stop on its first token
    never = [free[3][1]]
    rule = continuation_rule(tok, stop_ids, never)
    assert rule.not_first == (tok.eos_token_id, *stop_ids) and rule.never == tuple(never)
    got = generate_ids(model, tok, ids, 8, 12, "cpu", rule)
    want = [reference_ids(model, tok, x, 12, stop_ids, suppress_tokens=never,
                          begin_suppress_tokens=[tok.eos_token_id, *stop_ids]) for x in ids]
    assert got == want and any(g[-1] in stop_ids for g in got)


def test_generic_default_rule_and_the_nli_json_stop(model_and_tokenizer, tmp_path, monkeypatch):
    """The generator knows no task: by default a row stops at EOS or max_new_tokens. The NLI predictions pass their
    rule, EOS or the JSON object closed, on every generation they make."""
    import inspect

    from app.lm import generate as generation
    from app.tasks.nli_cot import backends
    from app.tasks.nli_cot.extract import json_object_closed
    from app.tasks.nli_cot.task import NliCot

    assert inspect.signature(generation.generate_batches).parameters["rule"].default == StopRule()
    assert StopRule().eos and StopRule().text is None and not (StopRule().stop_ids or StopRule().never)
    JSON_CLOSED = backends.JSON_CLOSED
    assert JSON_CLOSED.text is json_object_closed and JSON_CLOSED.text_triggers == "}" and JSON_CLOSED.eos
    assert not (JSON_CLOSED.stop_ids or JSON_CLOSED.never or JSON_CLOSED.not_first)
    assert StopRule(stop_ids=[3, 3], never=[5, 5, 4]) == StopRule(stop_ids=frozenset({3}), never=(5, 4))

    rules = []

    def recording(*args, rule, **kwargs):
        rules.append(rule)
        return generation.generate_batches(*args, rule=rule, **kwargs)

    monkeypatch.setattr(backends, "generate_batches", recording)
    model, tok = model_and_tokenizer
    cfg = tiny_config(model.name_or_path, tmp_path, max_new_tokens=4)
    rows = [{"premise": "Anna is reading in the park.", "hypothesis": h} for h in ("Anna is indoors.", "x", "y")]
    preds = [p for _, batch in NliCot().predict_batches(model, tok, cfg, rows, "cpu", 2) for p in batch]
    assert len(preds) == 3 and all(p.label in (0, 1) for p in preds)
    assert rules == [JSON_CLOSED]  # one generator over both batches
