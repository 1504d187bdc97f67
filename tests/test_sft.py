"""sft.py and the policy wrapper: the loss mask, LoRA and full training, save/load, resume, and
the real-model path with tiny random Qwen3-VL and Qwen2.5-VL models built from config."""
import json
import re
import subprocess
import sys
import types
import time

import numpy as np
import pytest
import torch

import tools
from conftest import ROOT, run_script, run_torchrun

CONVERSATION = [
    {"role": "system", "content": "You are a test."},
    {"role": "user", "content": [{"type": "image", "image": np.full((64, 64, 3), 90, np.uint8)},
                                 {"type": "text", "text": "Item: nut. Anomaly type: scratch."}]},
    {"role": "assistant", "content": '<thinking>call</thinking>\n<tool_call>{"name": "mask_gen", '
                                     '"arguments": {"anomaly_image": 2}}</tool_call>'},
    {"role": "tool", "name": "mask_gen", "content": [{"type": "text", "text": '{"mask_index": 3}'},
                                                      {"type": "image", "image": np.zeros((64, 64), np.uint8)}]},
    {"role": "assistant", "content": '<thinking>done</thinking>\n<answer>{"final_image_index": 2}</answer>'},
]


@pytest.fixture(scope="module")
def policy():
    texts = [tools.message_text(m) for m in CONVERSATION] * 20
    return tools.tiny_policy(texts, image_side=64, max_new_tokens=8)


def test_only_assistant_tokens_are_trained(policy):
    batch = policy.encode([CONVERSATION])
    text = policy.tokenizer.decode(batch["input_ids"][0][batch["assistant_mask"][0] == 1])
    assert text == "".join(m["content"] + "<|im_end|>" for m in CONVERSATION if m["role"] == "assistant")
    logp, mask = policy.token_logprobs(batch, temperature=0.7)
    assert torch.equal(mask, batch["assistant_mask"][:, 1:].float())
    # against every position's logits: position t predicts token t + 1
    logits = policy.model(**policy._model_inputs(batch)).logits
    full = torch.log_softmax(logits[:, :-1] / 0.7, -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    assert torch.allclose(logp[mask == 1], full[mask == 1], atol=1e-5)
    assert (logp[mask == 0] == 0).all()             # context tokens: no logits, no gradient
    policy.model.zero_grad()
    (-(logp * mask).sum() / mask.sum()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.model.parameters())
    policy.model.zero_grad()


def test_images_become_image_tokens_and_batches_pad_on_the_right(policy):
    short = CONVERSATION[:3]
    batch = policy.encode([CONVERSATION, short])
    n_pad = int((batch["input_ids"][0] == policy.ids["<|image_pad|>"]).sum())
    assert n_pad == 2 * 4                            # two 64-px images, 16-px patches merged 2x2
    assert batch["pixel_values"].shape[0] == 3 * 16   # 3 images of 4x4 patches
    assert batch["attention_mask"][1, 0] == 1 and batch["attention_mask"][1, -1] == 0


def test_a_padded_row_scores_as_it_does_alone(policy):
    """token_logprobs drops the padding mask (right padding is never attended to causally): a short
    conversation batched with a long one gets the log-probabilities it gets alone."""
    short = CONVERSATION[:3]
    with torch.no_grad():
        together, mask = policy.token_logprobs(policy.encode([CONVERSATION, short]))
        alone, alone_mask = policy.token_logprobs(policy.encode([short]))
    n = alone.shape[1]
    assert torch.equal(mask[1, :n], alone_mask[0]) and not mask[1, n:].any()
    written = alone_mask[0] == 1
    assert torch.allclose(together[1, :n][written], alone[0][written], atol=1e-5)


def test_act_returns_one_reply_per_conversation(policy):
    replies = policy.act([CONVERSATION[:2], CONVERSATION[:4]])
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)


# ---- act(): its sampling loop against model.generate on the freshly rendered conversation ----------

@pytest.fixture(scope="module", params=["tiny", "qwen2_5_vl"])
def sharp_policy(request, tmp_path_factory):
    """The tiny policy, and a tiny random Qwen2.5-VL, with their weight matrices scaled up: a fresh
    random model writes the same token whatever it reads, a sharpened one answers every token and
    image differently, so a reply shows what the model was given."""
    if request.param == "tiny":
        policy = tools.tiny_policy([tools.message_text(m) for m in CONVERSATION] * 20, image_side=64)
    else:
        policy = tools.load_policy(str(tiny_real_model(tmp_path_factory.mktemp("m") / "m", request.param)))
    with torch.no_grad():
        for weight in policy.model.parameters():
            if weight.ndim == 2:
                weight.mul_(3)
    policy.temperature, policy.max_new_tokens = 0.0, 10
    policy.ROOM = 3   # the decoding batch's cache fills up and is rebuilt every few tokens
    return policy


def generated(policy, messages) -> str:
    """The straightforward path: model.generate on the whole conversation, rendered afresh, decoded
    as the wrapper decodes a reply."""
    inputs = policy._model_inputs(policy.encode([messages], add_generation_prompt=True))
    sampling = dict(do_sample=False) if policy.temperature == 0 else \
        dict(do_sample=True, temperature=policy.temperature, top_k=0, top_p=1.0)
    with torch.no_grad():
        out = policy.model.generate(**inputs, max_new_tokens=policy.max_new_tokens, eos_token_id=policy.ids["<|im_end|>"],
                                    pad_token_id=policy.ids["<|endoftext|>"], **sampling)
    new, end = out[0, inputs["input_ids"].shape[1]:].tolist(), policy.ids["<|im_end|>"]
    return policy.tokenizer.decode(new[:new.index(end)] if end in new else new, skip_special_tokens=True)


def tool_turn(k):
    """An observation with a new image (a mask-like one of its own shade)."""
    return {"role": "tool", "name": "image_gen", "content": [{"type": "text", "text": f'{{"image_index": {k}}}'},
                                                             {"type": "image", "image": np.full((64, 64), 30 * k % 256, np.uint8)}]}


def test_cascade_attention_is_full_attention_over_each_row():
    """The decoding step's attention with the shared first tokens kept once (batch of one) gives
    each row what full attention over its whole conversation gives: grouped-query heads, rows of
    different lengths (left padding masked), a prefix of 5 tokens."""
    torch.manual_seed(0)
    batch, heads, kv_heads, dim, n_prefix, own = 3, 4, 2, 8, 5, 7
    prefix_keys, prefix_values = torch.randn(1, kv_heads, n_prefix, dim), torch.randn(1, kv_heads, n_prefix, dim)
    query = torch.randn(batch, heads, 1, dim)
    keys, values = torch.randn(batch, kv_heads, own, dim), torch.randn(batch, kv_heads, own, dim)
    mask = torch.ones(batch, 1, 1, own, dtype=torch.bool)
    mask[1, ..., :3] = False   # row 1 is 3 tokens shorter: left padding
    layer = types.SimpleNamespace(layer_idx=0)
    out, _ = tools.cascade_attention(layer, query, keys, values, mask, dim ** -0.5,
                                     shared_prefix=[(prefix_keys, prefix_values)])
    full_keys = torch.cat([prefix_keys.expand(batch, -1, -1, -1), keys], dim=2).repeat_interleave(heads // kv_heads, 1)
    full_values = torch.cat([prefix_values.expand(batch, -1, -1, -1), values], dim=2).repeat_interleave(heads // kv_heads, 1)
    full_mask = torch.cat([torch.ones(batch, 1, 1, n_prefix, dtype=torch.bool), mask], dim=-1)
    expected = torch.nn.functional.scaled_dot_product_attention(query, full_keys, full_values, attn_mask=full_mask)
    assert out.shape == (batch, 1, heads, dim)
    assert torch.allclose(out, expected.transpose(1, 2), atol=1e-5)
    out_no_mask, _ = tools.cascade_attention(layer, query, keys, values, None, dim ** -0.5,
                                             shared_prefix=[(prefix_keys, prefix_values)])
    assert torch.allclose(out_no_mask[0], out[0], atol=1e-6) and not torch.allclose(out_no_mask[1], out[1], atol=1e-3)


def test_packed_attention_keeps_each_prompt_to_its_own_past():
    """Two prompts packed into one sequence, one with 6 past tokens and one without: each new token's
    output is what causal attention over its own prompt's whole sequence gives, and each prompt's
    keys and values (past + new) are handed back for its cache."""
    torch.manual_seed(0)
    heads, kv_heads, dim, lengths = 4, 2, 8, [3, 5]
    past_keys, past_values = torch.randn(1, kv_heads, 6, dim), torch.randn(1, kv_heads, 6, dim)
    query = torch.randn(1, heads, sum(lengths), dim)
    key, value = torch.randn(1, kv_heads, sum(lengths), dim), torch.randn(1, kv_heads, sum(lengths), dim)
    packing = tools.Packing(lengths, [[(past_keys, past_values)], None])
    out, _ = tools.packed_attention(types.SimpleNamespace(layer_idx=0), query, key, value, None, dim ** -0.5,
                                    packing=packing)
    assert out.shape == (1, sum(lengths), heads, dim)
    whole = [(torch.cat([past_keys, key[:, :, :3]], 2), torch.cat([past_values, value[:, :, :3]], 2)),
             (key[:, :, 3:], value[:, :, 3:])]
    for (keys, values), (cached_keys, cached_values) in zip(whole, [cache[0] for cache in packing.caches]):
        assert torch.equal(keys, cached_keys) and torch.equal(values, cached_values)
    for (keys, values), rows, queries in zip(whole, (slice(0, 3), slice(3, 8)), (query[:, :, :3], query[:, :, 3:])):
        n_past = keys.shape[2] - queries.shape[2]   # queries for the past positions: their outputs are not kept
        full = torch.cat([torch.randn(1, heads, n_past, dim), queries], 2)
        expected = torch.nn.functional.scaled_dot_product_attention(
            full, keys.repeat_interleave(2, 1), values.repeat_interleave(2, 1), is_causal=True)[:, :, n_past:]
        assert torch.allclose(out[:, rows], expected.transpose(1, 2), atol=1e-5)


def test_greedy_act_writes_what_generate_writes_turn_after_turn(sharp_policy):
    """Three conversations of different lengths, played together for four turns as the runner
    plays them (each grows by a reply and an observation with an image; the third by a reply the
    policy did not write): every reply is model.generate's on the freshly rendered conversation,
    and a later turn prefills only what was appended. Kept keys are not used for another image:
    with its first image swapped, a conversation is prefilled again from that image on."""
    policy = sharp_policy
    conversations = [list(c) for c in (CONVERSATION[:2], CONVERSATION[:4],
                                       CONVERSATION[:4] + [CONVERSATION[2], tool_turn(4)])]
    prefilled = []   # the tokens each conversation feeds in act()'s packed prefill passes, in order
    hook = policy.model.register_forward_pre_hook(
        lambda _, __, kw: prefilled.extend(kw["packing"].lengths) if "packing" in kw else None, with_kwargs=True)
    try:
        before = None
        for turn in range(4):
            if turn == 3:
                first = conversations[0][1]
                swapped = {**first, "content": [{"type": "image", "image": np.full((64, 64, 3), 200, np.uint8)},
                                                first["content"][1]]}
                assert generated(policy, conversations[0]) != generated(policy, [conversations[0][0], swapped,
                                                                                 *conversations[0][2:]])
                conversations[0][1] = swapped
            prefilled.clear()
            replies = policy.act(conversations)
            rendered = [policy.encode([c], add_generation_prompt=True)["input_ids"][0].tolist() for c in conversations]
            assert replies == [generated(policy, c) for c in conversations], turn
            if before:
                for k in (1, 2) if turn == 3 else (0, 1, 2):
                    assert prefilled[k] <= len(rendered[k]) - len(before[k]), (turn, k)
            if turn == 3:
                assert prefilled[0] == len(rendered[0]) - rendered[0].index(policy.ids["<|image_pad|>"])
            before = rendered
            for k, (conversation, reply) in enumerate(zip(conversations, replies)):
                conversation += [{"role": "assistant", "content": CONVERSATION[2]["content"] if k == 2 else reply},
                                 tool_turn(turn + 5)]
    finally:
        hook.remove()
    assert len(set(replies)) == 3


def test_sampling_draws_what_generate_draws_and_is_seeded(sharp_policy):
    """One conversation, at temperature 1: act() consumes the random generator as model.generate
    does (one draw from softmax(logits / T) a token), so with the same seed both write the same
    reply, turn after turn; several conversations at once are deterministic for a seed."""
    policy = sharp_policy
    policy.temperature = 1.0
    try:
        conversation = list(CONVERSATION[:4])
        for turn in range(3):
            torch.manual_seed(turn)
            reply = policy.act([conversation])[0]
            torch.manual_seed(turn)
            assert reply == generated(policy, conversation)
            conversation += [{"role": "assistant", "content": reply}, tool_turn(turn + 5)]
        runs = []
        for _ in range(2):
            torch.manual_seed(0)
            runs.append(policy.act([list(CONVERSATION[:2]), list(CONVERSATION[:4])]))
        assert runs[0] == runs[1]
    finally:
        policy.temperature = 0.0


def test_sampling_follows_the_tempered_softmax(policy):
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(20000, 1)
    torch.manual_seed(0)
    for temperature in (0.7, 1.0):
        policy.temperature = temperature
        counts = torch.bincount(policy._sample(logits), minlength=4).float() / len(logits)
        assert torch.allclose(counts, torch.softmax(logits[0] / temperature, -1), atol=0.01)
    policy.temperature = 0.0
    assert (policy._sample(logits[:3]) == 0).all()
    policy.temperature = 1.0


def test_save_and_load_round_trip(policy, tmp_path):
    policy.save(tmp_path / "m")
    again = tools.VLMPolicy.load(tmp_path / "m")
    batch = policy.encode([CONVERSATION])
    with torch.no_grad():
        a, _ = policy.token_logprobs(batch)
        b, _ = again.token_logprobs(again.encode([CONVERSATION]))
    assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(tools.UserError, match="is not a model"):
        tools.VLMPolicy.load(tmp_path)


# ---- the chat template: what other tools render -------------------------------------------------

# CONVERSATION in ChatML, written out: tool observations are user turns inside <tool_response>
CHATML = ("<|im_start|>system\nYou are a test.<|im_end|>\n"
          "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Item: nut. Anomaly type: scratch.<|im_end|>\n"
          "<|im_start|>assistant\n" + CONVERSATION[2]["content"] + "<|im_end|>\n"
          "<|im_start|>user\n<tool_response>\n{\"mask_index\": 3}<|vision_start|><|image_pad|><|vision_end|>\n"
          "</tool_response><|im_end|>\n"
          "<|im_start|>assistant\n" + CONVERSATION[4]["content"] + "<|im_end|>\n")


def expand_images(ids, counts, pad, values=None):
    """Each <|image_pad|> repeated once per image token, as Qwen's processor does (and with it the
    entry of values, a per-token list, when given)."""
    counts = iter(counts)
    return [v for token, value in zip(ids, values or ids) for v in [value] * (next(counts) if token == pad else 1)]


def test_the_saved_chat_template_gives_the_tokens_the_policy_trains_on(trajectories, tmp_path):
    """Trajectories as stored (images, tool observations) through the saved tokenizer's
    apply_chat_template: the very token ids and assistant mask the wrapper trains on; and
    transformers alone generates from a templated prompt what the wrapper generates."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer
    rows = [json.loads(line) for line in (trajectories / "train.jsonl").read_text().splitlines()][:4]
    live = [tools.live_conversation(r["messages"], r["images"]) for r in rows]
    policy = tools.tiny_policy([tools.message_text(m) for c in live for m in c], image_side=64,
                               temperature=0.0, max_new_tokens=12)
    policy.image_root = trajectories
    policy.save(tmp_path / "m")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    processor = AutoImageProcessor.from_pretrained(tmp_path / "m")
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == CHATML
    for row, messages in zip(rows, live):
        images = [Image.open(trajectories / path).convert("RGB") for path in row["images"]]
        counts = [int(g.prod()) // 4 for g in processor(images=images, return_tensors="pt")["image_grid_thw"]]
        rendered = tokenizer.apply_chat_template(row["messages"], return_dict=True, return_assistant_tokens_mask=True)
        batch = policy.encode([messages])
        assert expand_images(rendered["input_ids"], counts, pad) == batch["input_ids"][0].tolist()
        mask = expand_images(rendered["input_ids"], counts, pad, rendered["assistant_masks"])
        assert mask == batch["assistant_mask"][0].tolist() and sum(mask) > 0
        # the seams of the template are token boundaries: one string tokenizes as its pieces do
        text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        pieces = re.split(r"(<\|[a-z_]+\|>)", text)
        assert rendered["input_ids"] == [t for piece in pieces for t in tokenizer(piece, add_special_tokens=False)["input_ids"]]

    # generation with transformers alone, from the templated prompt of a conversation's first turn
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "m").eval()
    prompt = rows[0]["messages"][:2]
    images = [Image.open(trajectories / rows[0]["images"][0]).convert("RGB")]
    pixels = processor(images=images, return_tensors="pt")
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)["input_ids"]
    ids = torch.tensor([expand_images(ids, [int(pixels["image_grid_thw"][0].prod()) // 4], pad)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=(ids == pad).long(),
                             pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"],
                             max_new_tokens=12, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    # decoded as the wrapper decodes a reply: up to the turn's end, special tokens dropped
    reply = tokenizer.decode(new[:new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new,
                             skip_special_tokens=True)
    assert reply == policy.act([live[0][:2]])[0]


def test_the_processor_loads_with_torchvision(policy, tmp_path):
    pytest.importorskip("torchvision")
    from transformers import AutoProcessor
    policy.save(tmp_path / "m")
    processor = AutoProcessor.from_pretrained(tmp_path / "m")
    batch = policy.encode([CONVERSATION])
    stored = tools.stored_conversation(CONVERSATION)
    text = processor.apply_chat_template(stored[0], tokenize=False)
    rgb = [np.repeat(i[..., None], 3, 2) if i.ndim == 2 else i for i in stored[1]]
    ids = processor(text=[text], images=rgb, return_tensors="pt")["input_ids"][0].tolist()
    assert ids == batch["input_ids"][0].tolist()


# ---- the real architectures, tiny and random ---------------------------------------------------

def tiny_real_model(path, arch):
    """A Qwen3-VL or Qwen2.5-VL built from config with random weights, saved like a hub model."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen3VLConfig,
                              Qwen3VLForConditionalGeneration)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    tokenizer = tools.train_tokenizer([tools.message_text(m) for m in CONVERSATION] * 5, vocab_size=500)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tools.SPECIAL_TOKENS}
    special = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                   vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    if arch == "qwen3_vl":
        config = Qwen3VLConfig(
            text_config=dict(text, head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                                  "mrope_section": [4, 6, 6], "mrope_interleaved": True}),
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                               patch_size=16, num_position_embeddings=64, deepstack_visual_indexes=[1]), **special)
        model, patch = Qwen3VLForConditionalGeneration(config), 16
    else:
        config = Qwen2_5_VLConfig(
            text_config=dict(text, rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 6, 6]}),
            vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                               patch_size=14, fullatt_block_indexes=[0], window_size=56), **special)
        model, patch = Qwen2_5_VLForConditionalGeneration(config), 14
    processor = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, min_pixels=(4 * patch) ** 2,
                                         max_pixels=(4 * patch) ** 2)
    tools.VLMPolicy(model, tokenizer, processor).save(path)
    return path


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen2_5_vl"])
def test_real_model_path_loads_acts_and_trains(arch, tmp_path):
    path = tiny_real_model(tmp_path / arch, arch)
    policy = tools.load_policy(str(path), max_new_tokens=6)
    assert len(policy.act([CONVERSATION[:2]])) == 1
    logp, mask = policy.token_logprobs(policy.encode([CONVERSATION]))
    assert torch.isfinite(logp).all() and mask.sum() > 0


# ---- sft.py end to end -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trajectories(toy_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "traj"
    result = run_script("build_trajectories.py", "--data-root", toy_root, "--out", out, "--limit", "12")
    assert result.returncode == 0, result.stderr
    return out


def sft_args(trajectories, toy_root, out, *extra):
    """Tiny settings; validation at the first and last step only (each one scores 8 trajectories)."""
    return ["--trajectories", trajectories, "--data-root", toy_root, "--out", out, "--batch-size", "2",
            "--micro-batch", "2", "--eval-every", "100", "--rollouts", "1", "--max-turns", "2", "--max-new-tokens", "24", *extra]


def test_renaming_uses_made_up_names_everywhere_but_the_system_prompt():
    import random
    import sft
    names = [sft.made_up_name(random.Random(7)) for _ in range(2)]
    assert names[0] == names[1]                                    # deterministic for a seed
    rng = random.Random(0)
    made_up = {sft.made_up_name(rng) for _ in range(200)}
    known = {c.replace("_", " ") for ds in tools.KnowledgeBase().data.values() for c in ds}
    assert len(made_up) > 150 and not made_up & known              # varied, and never a real object
    record = {"category": "metal_nut", "messages": [
        {"role": "system", "content": "tools for any metal nut"},
        {"role": "user", "content": [{"type": "image", "image": "1.png"},
                                     {"type": "text", "text": "Item: metal nut. Anomaly type: scratch."}]},
        {"role": "assistant", "content": '<thinking>A metal nut.</thinking>{"item_name": "metal nut"}'}]}
    renamed = sft.rename_item(record, "pufidax")["messages"]
    assert renamed[0]["content"] == "tools for any metal nut"
    assert renamed[1]["content"][1]["text"] == "Item: pufidax. Anomaly type: scratch."
    assert renamed[2]["content"] == '<thinking>A pufidax.</thinking>{"item_name": "pufidax"}'


def test_the_type_weight_multiplies_the_loss_of_the_tokens_that_spell_the_type(policy):
    import sft
    conversation = [*CONVERSATION[:2], {"role": "assistant", "content": "<thinking>a scratch on the nut</thinking>"}]
    batch = policy.encode([conversation])
    weights = sft.type_weights(policy, batch, [{"anomaly_type": "scratch"}], 5.0)
    assert set(weights.unique().tolist()) == {1.0, 5.0}
    written = batch["assistant_mask"][0, 1:] == 1
    heavy = batch["input_ids"][0, 1:][(weights[0] == 5) & written]
    assert policy.tokenizer.decode(heavy).strip() == "scratch"        # the type, and only it, in the reply
    with torch.no_grad():
        plain, n = sft.assistant_loss(policy, batch)
        weighted, n_weighted = sft.assistant_loss(policy, batch, weights)
        logp, mask = policy.token_logprobs(batch)
    type_loss = -(logp * mask)[weights == 5].sum()
    assert type_loss > 0 and n == n_weighted
    assert torch.allclose(weighted, plain + 4 * type_loss)


def test_task_words_are_one_and_the_same_token_wherever_they_stand():
    """The type asked for in the task is the token the policy writes in its thinking, its tool
    calls and its prompts: copying it is then looking it up, not a learned association between a
    dozen glued variants (without `words`, BPE glues "cut" to its neighbours differently in each)."""
    texts = ["Item: fabric. Anomaly type: cut. Synthesize a realistic cut on image 1.",
             '<thinking>I need a local-edit prompt for a cut, so I call prompt_gen.</thinking>',
             '{"item_name": "fabric", "anomaly_type": "cut"}',
             "change only the woven surface to introduce a cut: a dark narrow slit. A cutter slipped."] * 50
    pieces = lambda tokenizer, text: [tokenizer.decode([i]) for i in tokenizer(text)["input_ids"]]  # noqa: E731
    glued = tools.train_tokenizer(texts, vocab_size=400)
    assert not all("cut" in pieces(glued, t) for t in texts[:4])
    whole = tools.train_tokenizer(texts, vocab_size=400, words={"cut", "fabric"})
    for text in texts[:4]:
        assert "cut" in pieces(whole, text), pieces(whole, text)
    assert "fabric" in pieces(whole, texts[2])
    assert "cut" not in pieces(whole, "A cutter slipped.")   # a word, not any run of its letters
    assert whole.decode(whole(texts[3])["input_ids"]) == texts[3]


def test_sft_smoke_full_and_lora(trajectories, toy_root, tmp_path):
    for mode in ("off", "on"):
        out = tmp_path / mode
        result = run_script("sft.py", *sft_args(trajectories, toy_root, out, "--epochs", "0.4", "--lora", mode))
        assert result.returncode == 0, result.stderr
        assert ("(LoRA)" in result.stdout) == (mode == "on")
        assert "Rollout evaluation" in result.stdout and "well-formed turns" in result.stdout
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert metrics[0]["step"] == 0 and "val_loss" in metrics[-1]
        policy = tools.VLMPolicy.load(out)    # a plain model, LoRA merged in
        assert not any("lora" in n for n, _ in policy.model.named_parameters())
        first = json.loads((trajectories / "train.jsonl").read_text().splitlines()[0])   # its task words stay whole
        task = f"Item: {first['category']}. Anomaly type: {first['anomaly_type']}. Synthesize it."
        pieces = [policy.tokenizer.decode([i]) for i in policy.tokenizer(task)["input_ids"]]
        assert first["category"] in pieces and first["anomaly_type"] in pieces, pieces
    result = run_script("synthesize.py", "--policy", tmp_path / "on", "--data-root", toy_root, "--out",
                        tmp_path / "synth", "--categories", "washer", "--types", "crack", "--per-type", "1",
                        "--max-turns", "2")
    assert result.returncode == 0, result.stderr
    assert "well-formed turns" in result.stdout


def test_sft_resume_after_a_kill_is_exact(trajectories, toy_root, tmp_path):
    """SIGKILL after the first checkpoint, then --resume: the same log, each step once, and the same
    weights as a run never stopped. Other settings and a finished run are refused."""
    def args(out, *extra):
        return sft_args(trajectories, toy_root, out, "--epochs", "0.8", "--save-every", "2", "--rollouts", "0",
                        *extra)

    def metrics(out):   # the seconds are wall time; everything else must match
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (out / "metrics.jsonl").read_text().splitlines()]

    whole = tmp_path / "whole"
    # what a kill before the first checkpoint leaves (settings, some steps' lines, one cut short):
    # a plain rerun starts over and logs each step once
    whole.mkdir()
    (whole / "run_config.json").write_text("{}")
    (whole / "metrics.jsonl").write_text('{"step": 0, "val_loss": 1.0}\n{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    result = run_script("sft.py", *args(whole))
    assert result.returncode == 0, result.stderr
    assert "starting over" in result.stdout

    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, str(ROOT / "sft.py"), *map(str, args(out))], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoint" / "training_state.pt").exists() and time.time() < deadline:
        time.sleep(0.1)
    process.kill()
    process.wait()
    saved = torch.load(out / "checkpoint" / "training_state.pt", weights_only=False)["step"]
    for flags, message in [(["--batch-size", "1"], "--batch-size 2 -> 1"), (["--lr", "5e-4"], "--lr 0.001 -> 0.0005")]:
        refused = run_script("sft.py", *args(out, "--resume", *flags))
        assert refused.returncode != 0 and message in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
    result = run_script("sft.py", *args(out, "--resume"))
    assert result.returncode == 0, result.stderr
    total = metrics(whole)[-1]["step"]
    assert f"resuming from step {saved} of {total}" in result.stdout and saved < total
    assert metrics(out) == metrics(whole) and [m["step"] for m in metrics(out)] == list(range(total + 1))
    a, b = tools.VLMPolicy.load(whole).model.state_dict(), tools.VLMPolicy.load(out).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (out / "checkpoint").exists()          # the model supersedes it
    finished = run_script("sft.py", *args(out, "--resume"))
    assert finished.returncode != 0 and "is finished" in finished.stderr


# ---- several processes (torchrun, gloo on CPU) ---------------------------------------------------

def two_step_args(trajectories, toy_root, out, *extra):
    """Two optimizer steps of two trajectories, validated at steps 0 and 2. One trajectory per
    micro-batch in every run: batching two pads them, which moves the floats by rounding, and Adam's
    first step (about lr times the gradient's sign) turned that into 4e-5 on one token's embedding
    in one process alone."""
    n_train = len((trajectories / "train.jsonl").read_text().splitlines())
    return sft_args(trajectories, toy_root, out, "--micro-batch", "1", "--rollouts", "0",
                    "--epochs", 3.5 / n_train, *extra)


@pytest.fixture(scope="module")
def one_process(trajectories, toy_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft-one") / "out"
    result = run_script("sft.py", *two_step_args(trajectories, toy_root, out))
    assert result.returncode == 0, result.stderr
    return out


def assert_same_training(out, reference):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for row, want in zip(rows, expected):   # the global loss, gradient norm (DDP's scale) and val loss
        assert set(row) == set(want)
        for key in {"loss", "grad_norm", "val_loss"} & set(want):
            assert row[key] == pytest.approx(want[key], rel=1e-6), (row["step"], key)
    # Adam's first steps move a weight with a near-zero gradient by about lr (1e-3) times its sign,
    # so rounding in such a gradient shows as a few 1e-5 on single weights; a wrong loss scale or a
    # missing rank would move the weights by about lr everywhere
    a, b = tools.VLMPolicy.load(out).model.state_dict(), tools.VLMPolicy.load(reference).model.state_dict()
    differences = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert differences.max() <= 5e-5 and (differences > 1e-6).sum() <= 1e-4 * differences.numel()


def test_sft_under_torchrun_makes_the_updates_of_one_process(trajectories, toy_root, tmp_path, one_process):
    out = tmp_path / "two"
    result = run_torchrun("sft.py", 2, *two_step_args(trajectories, toy_root, out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("step 0: validation loss") == 1   # rank 0 speaks for the run
    assert_same_training(out, one_process)
    assert not list(out.glob("checkpoint*")) and not list(out.glob("*.tmp"))


def test_sft_under_torchrun_resumes_a_killed_run(trajectories, toy_root, tmp_path, one_process):
    """Both ranks killed right after the first checkpoint; the same torchrun command with --resume
    (every rank loads the checkpoint) ends where one process that never stopped ends."""
    out = tmp_path / "two"
    killer = tmp_path / "sft_killed_after_checkpoint.py"
    killer.write_text(f"""import os, sys
sys.path.insert(0, {str(ROOT)!r})
import sft
save = sft.save_checkpoint
def save_and_die(*args):
    save(*args)
    os._exit(1)
sft.save_checkpoint = save_and_die
sft.main(sys.argv[1:])
""")
    args = two_step_args(trajectories, toy_root, out, "--save-every", "1")
    killed = run_torchrun(killer, 2, *args)
    assert killed.returncode != 0
    assert torch.load(out / "checkpoint" / "training_state.pt", weights_only=False)["step"] == 1
    result = run_torchrun("sft.py", 2, *args, "--resume")
    assert result.returncode == 0, result.stderr
    assert "resuming from step 1 of 2" in result.stdout
    assert_same_training(out, one_process)


def test_a_batch_the_ranks_cannot_split_evenly_is_refused(monkeypatch):
    import sft
    args = sft.get_args(["--batch-size", "3"])
    sft.check_batch(args, 14)                       # one process: any batch up to the training set
    with pytest.raises(tools.UserError, match="--batch-size must be at most 2 .*, not 3"):
        sft.check_batch(args, 2)
    monkeypatch.setattr(tools, "world_size", lambda: 2)
    with pytest.raises(tools.UserError, match="--batch-size must be a multiple of the 2 processes, not 3"):
        sft.check_batch(args, 14)


@pytest.mark.parametrize("flags, message", [
    (["--eval-every", "0"], "--eval-every must be at least 1, not 0"),
    (["--save-every", "0"], "--save-every must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--max-turns", "0"], "--max-turns must be at least 1"),
    (["--rollouts", "-1"], "--rollouts must be at least 0"),
    (["--epochs", "0"], "--epochs must be above 0"),
    (["--lr", "nan"], "--lr must be above 0, not nan"),
    (["--warmup", "1.5"], "--warmup must be between 0 and 1"),
    (["--type-weight", "0"], "--type-weight must be above 0"),
])
def test_numeric_flags_are_checked_when_parsed(flags, message):
    import sft
    with pytest.raises(tools.UserError, match=re.escape(message)):
        sft.get_args(flags)


def test_sft_bad_input(tmp_path, trajectories, toy_root):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "train.jsonl").write_text("")
    for args, message in [(["--trajectories", tmp_path / "empty"], "has no manifest.json"),
                          (["--trajectories", tmp_path / "none"], "no trajectories in"),
                          (["--trajectories", trajectories, "--data-root", toy_root, "--policy", tmp_path],
                           "is not a model")]:
        result = run_script("sft.py", *args, "--out", tmp_path / "o")
        assert result.returncode != 0 and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_sft_trains_only_on_trajectories_of_the_named_data(tmp_path, trajectories, toy_root):
    """--data and --data-root name the training data: another dataset's trajectories, or none, stop
    sft.py at once with the command that builds the right ones (nothing is trained or written)."""
    mvtec = tmp_path / "mvtec" / "bottle" / "train" / "good"
    mvtec.mkdir(parents=True)
    tools.save_png(np.zeros((32, 32, 3), np.uint8), mvtec / "000.png")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "train.jsonl").write_text((trajectories / "train.jsonl").read_text())
    manifest = json.loads((trajectories / "manifest.json").read_text())
    assert manifest["dataset"] == "toy" and manifest["root"] == str(toy_root.resolve())
    (elsewhere / "manifest.json").write_text(json.dumps({**manifest, "root": "/another/toy/world"}))
    build = f"python build_trajectories.py --data mvtec --data-root {tmp_path / 'mvtec'} --out runs/trajectories/mvtec"
    for args, message in [
            (["--data", "mvtec", "--data-root", tmp_path / "mvtec"], f"no trajectories in runs/trajectories/mvtec: build them first with: {build}"),
            (["--data", "mvtec", "--data-root", tmp_path / "mvtec", "--trajectories", trajectories],
             f"holds trajectories of toy, not of --data mvtec; build those with: {build}"),
            (["--data-root", toy_root, "--trajectories", elsewhere], "was built from /another/toy/world"),
            (["--data", "mvtec", "--data-root", tmp_path / "nowhere", "--trajectories", trajectories],
             "holds trajectories of toy")]:
        result = run_script("sft.py", *args, "--out", tmp_path / "o", cwd=tmp_path)
        assert result.returncode != 0 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "o").exists()
