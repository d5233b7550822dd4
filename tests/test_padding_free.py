"""The padding-free row builder (data/padding_free.py), the one home of the layout that packing, the
padding-free collator, the preference collator and the online log-probs all produce."""

from __future__ import annotations

import pytest
import torch

from posttrain.data import PaddingFreeCollator, pack_dataset
from posttrain.data.padding_free import packed_position_ids, padding_free_row


def written_out(prompts, completions, width=None, pad=0):
    """The contract spelled out token by token with plain loops."""
    ids, pos, comp, seq = [], [], [], []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        for j, t in enumerate(list(p) + list(c)):
            ids.append(t)
            pos.append(j)
            comp.append(j >= len(p))
            seq.append(i)
    tail = (width or len(ids)) - len(ids)
    return ids + [pad] * tail, pos + list(range(tail)), comp + [False] * tail, seq + [-1] * tail


@pytest.mark.parametrize("width", [None, 16])
def test_padding_free_row_matches_the_written_out_layout(width):
    prompts, completions = [[5, 6, 7], [8], [9, 10]], [[1, 2], [3, 4, 4, 4], []]
    row = padding_free_row(prompts, completions, width=width, pad_token_id=99)
    ids, pos, comp, seq = written_out(prompts, completions, width, pad=99)
    assert row.input_ids.tolist() == [ids] and row.input_ids.dtype == torch.long
    assert row.position_ids.tolist() == [pos] and row.position_ids.dtype == torch.long
    assert row.completion_mask.tolist() == [comp] and row.completion_mask.dtype == torch.bool
    assert row.seq_index.tolist() == [seq]
    assert row.seq_lens == [5, 5, 2]
    with pytest.raises(ValueError, match="width=11 is shorter than the 12 tokens"):
        padding_free_row(prompts, completions, width=11)
    with pytest.raises(ValueError, match="2 prompts for 3 completions"):
        padding_free_row(prompts[:2], completions)


def test_every_padding_free_producer_uses_the_same_positions():
    lens = [3, 1, 4]
    assert packed_position_ids(lens) == [0, 1, 2, 0, 0, 1, 2, 3]
    rows = [{"input_ids": list(range(n))} for n in lens]
    assert PaddingFreeCollator()(rows)["position_ids"].tolist() == [packed_position_ids(lens)]
    import datasets

    packed = pack_dataset(datasets.Dataset.from_list(rows), max_length=8)
    assert sorted(packed[0]["seq_lens"], reverse=True) == packed[0]["seq_lens"]  # best-fit decreasing order
    assert packed[0]["position_ids"] == packed_position_ids(packed[0]["seq_lens"])


def test_preference_collator_rows_are_padding_free_rows():
    from posttrain.trainers._preference import SequenceCollator

    features = [{"prompt_ids": [5, 6], "chosen_ids": [1, 2, 3], "rejected_ids": [4]},
                {"prompt_ids": [7], "chosen_ids": [8], "rejected_ids": [9, 9]}]
    collate = SequenceCollator(0, [("prompt_ids", "chosen_ids"), ("prompt_ids", "rejected_ids")], pad_to_multiple_of=8)
    batch = collate(features)
    prompts = [[5, 6], [7], [5, 6], [7]]
    completions = [[1, 2, 3], [8], [4], [9, 9]]
    ids, pos, comp, seq = written_out(prompts, completions, width=16)
    assert batch["input_ids"].tolist() == [ids] and batch["position_ids"].tolist() == [pos]
    assert batch["completion_mask"].tolist() == [comp] and batch["seq_index"].tolist() == [seq]
    assert batch["num_sequences"] == 4
