"""TRL's DPOTrainer on what `dpo_bench.py --peer trl` exported: the peer figure, measured in the same run.

Runs in the peer's virtual environment (`bash benchmarks/peers/make_venv.sh`; posttrain never imports trl):

    benchmarks/peers/.venv-trl/bin/python benchmarks/peers/trl_dpo.py FOLDER [--threads N]

Same model folder (and LoRA adapter, when posttrain's side trained one), preference pairs, batch size and max length as posttrain's side, one epoch; everything else
is TRL's default (sigmoid loss, a reference copy of the model; on a CPU its `bf16=True` default runs as CPU
autocast, which needs `use_cpu=True`). Tokens count prompt+chosen and prompt+rejected once each, as
dpo_bench.py does. Prints real (non-pad) tokens/s over the epoch and peak RSS as JSON.
"""

from __future__ import annotations

import tempfile

from _peer import exported, peft_config, time_epoch


def main() -> None:
    _, settings, rows, model, tokenizer = exported(__doc__.split("\n\n")[0])
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    config = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-dpo-"), per_device_train_batch_size=settings["batch_size"],
        max_length=settings["max_length"], num_train_epochs=1, save_strategy="no", report_to="none",
        logging_steps=1000, disable_tqdm=True, use_cpu=True,
        **({} if settings.get("peer_bf16") is None else {"bf16": bool(settings["peer_bf16"])}),
    )
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=peft_config(settings))
    data = trainer.train_dataset
    tokens = sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(data["prompt_ids"], data["chosen_ids"],
                                                                   data["rejected_ids"]))
    time_epoch(trainer, tokens, config)


if __name__ == "__main__":
    main()
