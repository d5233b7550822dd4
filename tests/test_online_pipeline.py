"""The online pipeline: RolloutBatch's named tensors and group-keeping split, dynamic sampling, the stages,
resume, and the online loop's former silent wrong results (issue 26, items 13-17)."""

from __future__ import annotations

import logging

import pytest
import torch
from datasets import Dataset

from posttrain.losses import group_relative_advantages
from posttrain.losses.advantages import rloo_advantages
from posttrain.models import build_tiny
from posttrain.online.engine_hf import HFEngine
from posttrain.online.pipeline import PromptStream
from posttrain.online.rollout_batch import RolloutBatch
from posttrain.tasks import ArithmeticTask
from posttrain.trainers._online import OnlineTrainer
from posttrain.trainers.grpo import GRPOConfig, GRPOTrainer
from posttrain.trainers.rloo import RLOOConfig, RLOOTrainer

from _online_helpers import _one_thread, history, text_length  # noqa: F401  (_one_thread: autouse)


def _config(cls=GRPOConfig, **kw):
    base = dict(output_dir="/tmp/posttrain-test-pipeline", num_generations=4, per_device_train_batch_size=8,
                max_completion_length=6, max_steps=2, logging_steps=1, report_to="none", learning_rate=1e-2,
                log_completions=False, save_strategy="no", disable_tqdm=True, lr_scheduler_type="constant")
    base.update(kw)
    return cls(**base)


def _data(n=64):
    return ArithmeticTask(digits=2).prompt_only(n)


# ------------------------------------------------------------------------------------ RolloutBatch
def _batch(groups=6, g=4):
    n = groups * g
    lengths = [1 + (i * 7) % 5 for i in range(n)]
    mask = torch.zeros(n, 5)
    for i, length in enumerate(lengths):
        mask[i, :length] = 1
    return RolloutBatch([[i] for i in range(n)], [[i] * length for i, length in enumerate(lengths)], mask,
                        torch.arange(n, dtype=torch.float32), group_ids=torch.arange(n) // g,
                        values=torch.randn(n, 5), extra={"tag": list(range(n))})


def test_rollout_batch_named_tensors_are_sliced_generically():
    batch = _batch()
    batch.per_token_advantages = torch.ones(len(batch), 5)
    part = batch.select([3, 0])
    assert part.advantages.tolist() == [3.0, 0.0] and part.extra["tag"] == [3, 0]
    assert part.values.shape == (2, max(len(batch.completion_ids[3]), len(batch.completion_ids[0])))
    assert part.per_token_advantages.shape == part.values.shape and part.group_ids.tolist() == [0, 0]
    assert batch.get("old_logps") is None and "values" in batch and "old_logps" not in batch
    with pytest.raises(AttributeError, match="no tensor 'old_logps'"):
        batch.old_logps
    with pytest.raises(ValueError, match="expected a tensor"):
        batch.values = torch.zeros(3)


@pytest.mark.parametrize("chunks", [1, 2, 3, 6])
def test_split_keeps_every_group_whole_and_shuffles_whole_groups(chunks):
    batch = _batch(groups=6, g=4)
    parts = batch.split(chunks, torch.Generator().manual_seed(0))
    assert len(parts) == chunks and sum(len(p) for p in parts) == len(batch)
    owner = {}
    for k, part in enumerate(parts):
        for gid in part.group_ids.tolist():
            assert owner.setdefault(gid, k) == k, f"group {gid} split across micro-batches"
        # every completion arrives with its own values, in group order
        assert all(batch.completion_ids[t] == c for t, c in zip(part.extra["tag"], part.completion_ids))
    again = batch.split(chunks, torch.Generator().manual_seed(0))
    assert [p.extra["tag"] for p in parts] == [p.extra["tag"] for p in again]
    if chunks > 1:
        other = batch.split(chunks, torch.Generator().manual_seed(1))
        assert [p.extra["tag"] for p in parts] != [p.extra["tag"] for p in other]


def test_a_group_larger_than_a_micro_batch_fills_consecutive_micro_batches():
    parts = _batch(groups=2, g=4).split(4, torch.Generator().manual_seed(0))
    assert [len(p) for p in parts] == [2, 2, 2, 2]
    assert [p.group_ids.unique().numel() for p in parts] == [1, 1, 1, 1]
    assert parts[0].group_ids[0] == parts[1].group_ids[0] and parts[2].group_ids[0] == parts[3].group_ids[0]


def test_concat_renumbers_groups_and_pads_token_tensors():
    a, b = _batch(groups=2), _batch(groups=1)
    b.values = torch.randn(len(b), 3)
    b.completion_mask = b.completion_mask[:, :3]
    both = RolloutBatch.concat([a, b])
    assert len(both) == 12 and both.num_groups == 3 and both.values.shape == (12, 5)
    assert torch.equal(both.values[8:, 3:], torch.zeros(4, 2))


def test_prompt_stream_shards_processes_and_resumes():
    data = list(range(10))
    p0, p1 = PromptStream(data, 2, 2, 0, seed=1), PromptStream(data, 2, 2, 1, seed=1)
    first = [p0.next_indices() + p1.next_indices() for _ in range(2)]
    assert all(len(set(c)) == 4 for c in first)  # the two processes take disjoint prompts
    state = p0.state_dict()
    rest = [p0.next_indices() for _ in range(3)]  # crosses into the next epoch (2 chunks of 4 per epoch)
    p0.load_state_dict(state)
    assert [p0.next_indices() for _ in range(3)] == rest and p0.epoch == 2


# --------------------------------------------------------------------------- micro-batches in training
class _SpyGRPO(GRPOTrainer):
    def compute_loss(self, model, inputs, *a, **kw):
        if model.training:
            self.seen.append((self.state.global_step, inputs.group_ids.tolist(), [p[0] for p in inputs.prompt_ids],
                              inputs.num_items_in_batch))
        return super().compute_loss(model, inputs, *a, **kw)


def test_groups_never_split_across_the_micro_batches_of_training():
    model, tok = build_tiny("nano")
    args = _config(gradient_accumulation_steps=2, steps_per_generation=4, max_steps=4, num_iterations=2)
    trainer = _SpyGRPO(model, text_length, args, train_dataset=_data(), processing_class=tok)
    trainer.seen = []
    trainer.train()
    # one generation of 32 completions (8 prompts): 4 micro-batches, trained twice, 2 per optimizer step
    assert [s[0] for s in trainer.seen] == [0, 0, 1, 1, 2, 2, 3, 3]
    owner = {}
    for k, (_, gids, _, _) in enumerate(trainer.seen[:4]):
        assert len(gids) == 8
        for gid in gids:
            assert owner.setdefault(gid, k) == k, f"group {gid} split across micro-batches"
    assert len(owner) == 8
    assert [s[1] for s in trainer.seen[4:]] == [s[1] for s in trainer.seen[:4]]  # the second pass, same micro-batches


def test_rewards_are_optional_at_the_base_but_grpo_and_rloo_need_one():
    class Scoreless(OnlineTrainer):
        pass

    Scoreless("tiny:nano", args=_config(), train_dataset=_data())
    with pytest.raises(ValueError, match="GRPOTrainer needs at least one reward function"):
        GRPOTrainer("tiny:nano", None, _config(), train_dataset=_data())
    with pytest.raises(ValueError, match="RLOOTrainer needs at least one reward function"):
        RLOOTrainer("tiny:nano", [], _config(RLOOConfig), train_dataset=_data())


# ------------------------------------------------------------------------------------ dynamic sampling
def _half_constant(prompts, completions, answer, **kw):
    """Constant reward for prompts whose answer is even (no signal), the text length for the others."""
    return [1.0 if int(a) % 2 == 0 else len(c) / 10 for a, c in zip(answer, completions)]


@pytest.mark.parametrize("cls", [GRPOConfig, RLOOConfig])
def test_dynamic_sampling_drops_zero_variance_groups_and_refills(cls):
    model, tok = build_tiny("nano")
    trainer_cls = GRPOTrainer if cls is GRPOConfig else RLOOTrainer
    args = _config(cls, dynamic_sampling=True, max_resample_rounds=4, max_steps=2, per_device_train_batch_size=16)
    trainer = trainer_cls(model, _half_constant, args, train_dataset=_data(200), processing_class=tok)
    batches = []
    original = trainer.compute_loss

    def spy(model, inputs, *a, **kw):
        batches.append(inputs)
        return original(model, inputs, *a, **kw)

    trainer.compute_loss = spy
    trainer.train()
    dropped = history(trainer, "dynamic_sampling/dropped_groups")
    rounds = history(trainer, "dynamic_sampling/refill_rounds")
    kept = history(trainer, "dynamic_sampling/kept_groups")
    assert all(d > 0 for d in dropped) and all(r >= 1 for r in rounds) and kept == [4.0, 4.0]
    assert trainer.counts["dropped_groups"] == sum(dropped)
    for batch in batches:  # only informative groups were trained on, and as many as without dynamic sampling
        assert len(batch) == 16
        for idx in batch.groups():
            assert batch.advantages[idx].abs().sum() > 0


def test_skip_zero_variance_groups_only_drops():
    model, tok = build_tiny("nano")
    trainer = GRPOTrainer(model, _half_constant, _config(skip_zero_variance_groups=True, max_steps=1,
                                                         per_device_train_batch_size=16),
                          train_dataset=_data(200), processing_class=tok)
    trainer.train()
    assert history(trainer, "dynamic_sampling/refill_rounds") == [0.0]
    kept, dropped = history(trainer, "dynamic_sampling/kept_groups")[0], history(trainer, "dynamic_sampling/dropped_groups")[0]
    assert kept + dropped == 4 and dropped > 0


# ---------------------------------------------------------------------- issue 26, items 13-17 and habits
def test_completions_without_any_reward_get_advantage_zero_and_stay_out_of_the_baseline():
    rewards = torch.tensor([0.0, 1.0, 1.0, 1.0, 2.0, 0.0, 4.0, 2.0])
    valid = torch.tensor([False, True, True, True, True, True, True, True])
    adv, _ = group_relative_advantages(rewards, 4, "none", valid=valid)
    assert adv.tolist() == [0.0, 0.0, 0.0, 0.0, 0.0, -2.0, 2.0, 0.0]  # TRL 1.16; before: [-0.75, 0.25, 0.25, 0.25, ...]
    adv, _ = group_relative_advantages(rewards, 4, "group", valid=valid)
    assert adv[:4].tolist() == [0.0, 0.0, 0.0, 0.0]
    loo = rloo_advantages(rewards, 4, valid=valid)
    assert loo[:4].tolist() == [0.0, 0.0, 0.0, 0.0] and loo[4].item() == pytest.approx(2.0 - 2.0)


def test_a_none_reward_in_training_gets_advantage_zero():
    model, tok = build_tiny("nano")

    def first_is_none(prompts, completions, **kw):
        return [None if i % 4 == 0 else len(c) / 10 for i, c in enumerate(completions)]

    trainer = GRPOTrainer(model, first_is_none, _config(max_steps=1), train_dataset=_data(), processing_class=tok)
    prepared = []
    original = trainer.prepare
    trainer.prepare = lambda scored, mode: prepared.append(original(scored, mode)) or prepared[-1]
    trainer.train()
    adv = prepared[0].advantages
    assert adv[0::4].tolist() == [0.0, 0.0] and bool((adv.view(2, 4)[:, 1:] != 0).any())
    assert adv.view(2, 4)[:, 1:].sum(1).abs().max() < 1e-5  # centred over the three scored completions
    assert history(trainer, "rewards/all_none") == [2.0]


def test_completion_format_follows_each_rows_prompt_not_the_last_dataset():
    model, tok = build_tiny("nano")
    seen = []

    def record(prompts, completions, **kw):
        seen.extend(type(c).__name__ for c in completions)
        return [len(str(c)) / 10 for c in completions]

    chat = ArithmeticTask(digits=2, conversational=True).prompt_only(32)
    plain = _data(8)
    trainer = GRPOTrainer(model, record, _config(max_steps=1, per_device_eval_batch_size=8), train_dataset=chat,
                          eval_dataset=plain, processing_class=tok)
    trainer.train()
    assert set(seen) == {"list"}  # conversational prompts: the completion as messages
    seen.clear()
    trainer.evaluate()
    assert seen and set(seen) == {"str"}  # plain prompts: text, although the training set is conversational


class _CountingEngine(HFEngine):
    def __init__(self, model, tokenizer):
        super().__init__(model, tokenizer)
        self.samples_from_policy = False
        self.pushes = 0

    def _push_weights(self, model):
        self.pushes += 1


def test_evaluate_syncs_the_engine_first_even_with_vllm_sync_every():
    model, tok = build_tiny("nano")
    trainer = GRPOTrainer(model, text_length, _config(max_steps=1, vllm_sync_every=3, per_device_eval_batch_size=8),
                          train_dataset=_data(), eval_dataset=_data(8), processing_class=tok)
    trainer._engine = _CountingEngine(trainer.model, tok)
    trainer.train()
    assert trainer._engine.pushes == 1 and trainer._engine.weights_version == 0  # the adoption push only
    trainer.evaluate()
    assert trainer._engine.pushes == 2 and trainer._engine.weights_version == 1


def test_prompts_are_not_cut_by_default_and_cuts_are_counted(caplog):
    model, tok = build_tiny("nano")
    rows = [{"prompt": "1 + 1 = " * 200, "answer": "2"}] + _data(15).to_list()
    trainer = GRPOTrainer(model, text_length, _config(), train_dataset=Dataset.from_list(rows), processing_class=tok)
    assert len(trainer.train_dataset[0]["prompt_ids"]) > 512
    with caplog.at_level(logging.WARNING):
        trainer = GRPOTrainer(model, text_length, _config(max_prompt_length=64, max_steps=1),
                              train_dataset=Dataset.from_list(rows), processing_class=tok)
    assert "max_prompt_length=64 cuts 1 of 16 training prompts" in caplog.text
    trainer.train()
    assert history(trainer, "data/truncated_prompts")[0] == 1.0


def test_top_k_turns_importance_sampling_on_for_every_engine():
    model, tok = build_tiny("nano")
    plain = GRPOTrainer(model, text_length, _config(max_steps=1), train_dataset=_data(), processing_class=tok)
    assert not plain.importance_sampling
    trainer = GRPOTrainer(model, text_length, _config(max_steps=1, top_k=5), train_dataset=_data(),
                          processing_class=tok)
    assert trainer.importance_sampling  # HF samples from the top-5 distribution, not the policy's
    trainer.train()
    ratio = history(trainer, "sampling/importance_sampling_ratio/mean")
    assert len(ratio) == 1 and ratio[0] < 0.9  # pi/q < 1 on the sampled tokens, as vLLM and the server report


def test_trl_habits_of_the_online_config():
    args = _config(top_k=None, min_p=None)
    assert args.top_k == 0 and args.min_p == 0.0
    args = _config(generation_batch_size=32)
    assert args.steps_per_generation == 4
    assert _config(scale_rewards=True).scale_rewards == "group" and _config(scale_rewards=False).scale_rewards == "none"
    model, tok = build_tiny("nano")
    trainer = GRPOTrainer(model, text_length, _config(max_completion_length=None), train_dataset=_data(),
                          processing_class=tok)
    longest = max(len(p) for p in trainer.train_dataset["prompt_ids"])
    assert trainer.args.max_completion_length == model.config.max_position_embeddings - longest


def test_evaluate_takes_a_raw_dataset_and_reward_functions_get_trls_extras():
    model, tok = build_tiny("nano")
    got = {}

    def extras(prompts, completions, trainer_state, log_metric, log_extra, **kw):
        got["step"] = trainer_state.global_step
        log_metric("custom/score", 0.5)
        log_extra("golden", ["yes"] * len(completions))
        return [len(c) / 10 for c in completions]

    trainer = GRPOTrainer(model, extras, _config(max_steps=1, per_device_eval_batch_size=8), train_dataset=_data(),
                          processing_class=tok)
    trainer.train()
    assert got["step"] == 0 and history(trainer, "custom/score") == [0.5]
    assert trainer._table_extras["golden"][0] == "yes"
    metrics = trainer.evaluate(eval_dataset=_data(8))
    assert "eval_reward" in metrics and got["step"] == 1


# ----------------------------------------------------------------------------------------- resume
def test_a_resumed_run_matches_the_uninterrupted_one(tmp_path):
    def run(out, max_steps, resume=None):
        model, tok = build_tiny("nano")
        args = _config(output_dir=str(out), max_steps=max_steps, save_strategy="steps", save_steps=2, seed=5,
                       num_iterations=2)
        trainer = GRPOTrainer(model, text_length, args, train_dataset=_data(), processing_class=tok)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full", 4)
    run(tmp_path / "part", 2)
    resumed = run(tmp_path / "part", 4, resume=str(tmp_path / "part" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    # the counts go on from the checkpoint's; the one generation after it is made once (8 completions feed
    # 2 steps with num_iterations=2), none is made again
    assert resumed.counts["completions"] == full.counts["completions"] == 16
    tail = [h for h in full.state.log_history if h.get("step", 0) > 2 and "loss" in h]
    again = [h for h in resumed.state.log_history if h.get("step", 0) > 2 and "loss" in h]
    assert [h["step"] for h in tail] == [h["step"] for h in again] == [3, 4]
    for a, b in zip(tail, again):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
        assert ("reward" in a) == ("reward" in b)
        if "reward" in a:
            assert a["reward"] == pytest.approx(b["reward"], rel=1e-5)


def test_logged_metrics_average_except_min_and_max_keys():
    trainer = GRPOTrainer("tiny:nano", text_length, _config(), train_dataset=_data())
    for low, high in ((0.1, 0.2), (0.3, 0.9), (float("nan"), 0.4)):
        trainer.store_metrics({"clip_ratio/low_mean": low, "clip_ratio/low_min": low, "clip_ratio/high_max": high,
                               "sampling/importance_sampling_ratio/min": high}, "train")
    logged = trainer._flush_metrics("train")
    assert logged["clip_ratio/low_mean"] == pytest.approx(0.2) and logged["clip_ratio/low_min"] == 0.1
    assert logged["clip_ratio/high_max"] == 0.9 and logged["sampling/importance_sampling_ratio/min"] == 0.2
