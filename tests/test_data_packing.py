"""Packing (best-fit decreasing), collators, and attention isolation of padding-free packed rows on the
eager and SDPA CPU paths of a real transformers Llama."""

import random

import datasets
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from posttrain.data import PaddingCollator, PaddingFreeCollator, pack_bfd, pack_dataset, packed_attention_mask


def first_fit(lengths, max_length):
    room = []
    for n in lengths:
        for b, r in enumerate(room):
            if r >= n:
                room[b] -= n
                break
        else:
            room.append(max_length - n)
    return len(room)


@pytest.mark.parametrize("seed", range(20))
def test_bfd_properties(seed):
    rng = random.Random(seed)
    max_length = rng.choice([16, 64, 100, 512])
    lengths = [rng.randint(1, max_length) for _ in range(rng.randint(1, 300))]
    bins = pack_bfd(lengths, max_length)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))  # every index exactly once
    assert all(sum(lengths[i] for i in b) <= max_length for b in bins)
    assert len(bins) <= first_fit(lengths, max_length)
    assert len(bins) >= -(-sum(lengths) // max_length)


def test_bfd_picks_the_tightest_bin():
    # Decreasing order 7, 4, 4, 1: bins [7] (room 3) and [4, 4] (room 2); the 1 goes to the tighter second
    # bin, where first fit would put it into the first.
    assert pack_bfd([4, 1, 7, 4], 10) == [[2], [0, 3, 1]]
    assert pack_bfd([5, 5, 5], 5) == [[0], [1], [2]]
    assert pack_bfd([], 8) == []
    with pytest.raises(AssertionError, match="sequence 1 has length 9"):
        pack_bfd([3, 9], 8)


def test_pack_dataset():
    rows = {
        "input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]],
        "assistant_mask": [[0, 1, 1], [0, 1], [0, 0, 1, 1], [1]],
        "prompt": ["a", "b", "c", "d"],
    }
    packed = pack_dataset(datasets.Dataset.from_dict(rows), max_length=5)
    assert packed.column_names == ["input_ids", "assistant_mask", "position_ids", "seq_lens"]
    out = packed.to_list()
    assert [r["seq_lens"] for r in out] == [[4, 1], [3, 2]]
    assert out[0]["input_ids"] == [6, 7, 8, 9, 10] and out[1]["input_ids"] == [1, 2, 3, 4, 5]
    assert out[0]["assistant_mask"] == [0, 0, 1, 1, 1] and out[1]["position_ids"] == [0, 1, 2, 0, 1]
    with pytest.raises(ValueError, match=r"row 2, field 'input_ids': expected 1..3 tokens, got 4"):
        pack_dataset(datasets.Dataset.from_dict(rows), max_length=3)


ROWS = [
    {"input_ids": [5, 6, 7], "labels": [5, 6, 7], "assistant_mask": [1, 1, 1], "logps": [0.5, 0.25, 0.125], "score": 1.5, "id": "a"},
    {"input_ids": [8], "labels": [8], "assistant_mask": [0], "logps": [1.0], "score": 2.0, "id": "b"},
]


def test_padding_collator_right_and_left():
    batch = PaddingCollator(pad_token_id=0, pad_to_multiple_of=4)(ROWS)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [-100, -100, -100, -100]]  # t=0 never predicted
    assert batch["assistant_mask"].tolist() == [[0, 1, 1, 0], [0, 0, 0, 0]]
    assert batch["logps"].dtype == torch.float32 and batch["logps"].tolist() == [[0.5, 0.25, 0.125, 0], [1.0, 0, 0, 0]]
    assert batch["score"].tolist() == [1.5, 2.0] and batch["id"] == ["a", "b"]

    left = PaddingCollator(pad_token_id=0, padding_side="left")(ROWS)
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    with pytest.raises(ValueError, match="padding_side"):
        PaddingCollator(0, padding_side="middle")
    with pytest.raises(KeyError, match="batch row 0 has no 'input_ids'"):
        PaddingCollator(0)([{"ids": [1]}])


def test_padding_free_collator_flattens_plain_and_packed_rows():
    batch = PaddingFreeCollator()(ROWS)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0]] and batch["seq_lens"] == [3, 1]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100]]
    assert batch["assistant_mask"].tolist() == [[0, 1, 1, 0]] and "attention_mask" not in batch
    assert batch["logps"].shape == (1, 4) and batch["id"] == ["a", "b"]

    packed = pack_dataset(datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9]]}), 5).to_list()
    batch = PaddingFreeCollator()(packed)
    assert batch["seq_lens"] == [4, 3, 2]
    assert batch["input_ids"].tolist() == [[6, 7, 8, 9, 1, 2, 3, 4, 5]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1]]


def test_packed_attention_mask():
    mask = packed_attention_mask([2, 1])[0, 0]
    allowed = (mask == 0).int().tolist()
    assert allowed == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]


def tiny_llama(attn_implementation):
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        head_dim=32, vocab_size=300, max_position_embeddings=128, attn_implementation=attn_implementation,
    )
    return LlamaForCausalLM(config).float().eval()


def token_logps(logits, input_ids):
    """logps[t] = log p(input_ids[t] | input_ids[:t]), logps[0] = 0 (the internals convention)."""
    lp = torch.log_softmax(logits[0, :-1].float(), -1).gather(-1, input_ids[0, 1:, None])[:, 0]
    return torch.cat([lp.new_zeros(1), lp])


SEQ_LENS = [7, 1, 12, 5]


def packed_batch(block_mask=False):
    gen = torch.Generator().manual_seed(1)
    rows = [{"input_ids": torch.randint(0, 300, (n,), generator=gen).tolist()} for n in SEQ_LENS]
    for r in rows:
        r["labels"] = list(r["input_ids"])
    return rows, PaddingFreeCollator(block_mask=block_mask)(rows)


def split(tensor, seq_lens):
    return list(torch.split(tensor[0], seq_lens))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_rows_are_isolated(attn):
    model = tiny_llama(attn)
    rows, batch = packed_batch()
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        alone = [token_logps(model(input_ids=torch.tensor([r["input_ids"]])).logits, torch.tensor([r["input_ids"]]))
                 for r in rows]
    packed_logps = token_logps(packed, batch["input_ids"])
    starts = torch.tensor([0] + SEQ_LENS[:-1]).cumsum(0)
    packed_logps[starts] = 0  # each sequence's first token has no prediction
    for got, want in zip(split(packed_logps[None], SEQ_LENS), alone):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_cross_entropy_matches_unpacked(attn):
    model = tiny_llama(attn)
    rows, batch = packed_batch()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        packed_ce = F.cross_entropy(logits[0, :-1], batch["labels"][0, 1:], ignore_index=-100, reduction="none")
        padded = PaddingCollator(pad_token_id=0)(rows)
        logits_pad = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        pad_ce = F.cross_entropy(logits_pad[:, :-1].transpose(1, 2), padded["labels"][:, 1:], ignore_index=-100, reduction="none")
    want = torch.cat([pad_ce[b, : n - 1] for b, n in enumerate(SEQ_LENS)])
    got = packed_ce[batch["labels"][0, 1:] != -100]  # the -100 at each sequence start drops cross-sequence targets
    assert got.shape == want.shape == (sum(SEQ_LENS) - len(SEQ_LENS),)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(model(**{k: batch[k] for k in ("input_ids", "position_ids", "labels")}, use_cache=False).loss,
                               want.mean(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_default_use_cache_leaks_and_block_mask_fixes_it(attn):
    """transformers skips packed-sequence detection when a cache exists, and Llama creates one whenever
    use_cache is true (the config default): the reason a padding-free forward passes use_cache=False, and
    the block_mask fallback for forwards that cannot."""
    model = tiny_llama(attn)
    rows, batch = packed_batch()
    _, masked = packed_batch(block_mask=True)
    with torch.no_grad():
        isolated = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        blocked = model(input_ids=masked["input_ids"], position_ids=masked["position_ids"],
                        attention_mask=masked["attention_mask"]).logits
    assert (leaky - isolated).abs().max() > 1e-2
    torch.testing.assert_close(blocked, isolated, atol=1e-5, rtol=0)
