"""The `posttrain` command line.

    posttrain <method> [--config run.yaml] [--<any config field> value ...] [--num_processes N | --accelerate_config F]
    posttrain quickstart | serve | report <run_dir> | env

Every registered method (see `posttrain.trainers.registry`) becomes a command; its config dataclass, the
shared `ScriptArguments` and the method's extra argument dataclasses are filled from the YAML file first and
then from flags, so a flag always overrides the file. `posttrain <method> --help` lists every field. The run
file (`posttrain.cli_config`) is checked field by field against the dataclasses' types before anything runs,
and its `env:` block is set for the run. The final evaluation runs before the state and metrics are saved,
so the run folder (and `posttrain report`) holds it.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, Sequence

__all__ = ["main", "parse_method_args", "run_method"]

_BUILTIN_COMMANDS = {
    "quickstart": "SFT (and GRPO) on the built-in arithmetic task with a tiny model; reports accuracy before/after",
    "serve": "run a rollout server (vLLM where installed, else HF generate) for online methods",
    "report": "summarize a finished run folder (metrics, curves)",
    "env": "print versions and hardware for bug reports",
}


def _parse(name: str, run_file: Any, argv: Sequence[str]) -> tuple[Any, ...]:
    from transformers import HfArgumentParser

    from .cli_config import check_values
    from .script_args import ScriptArguments
    from .trainers.registry import get_method

    spec = get_method(name)
    classes = [ScriptArguments, *spec.extra_args, spec.config_class]
    parser = HfArgumentParser(classes, prog=f"posttrain {name}", description=spec.help)
    parser.add_argument("--config", default=None, help="YAML file of field: value pairs (and an env: block of "
                        "environment variables for the run); flags override it. --config=FILE works too.")
    if run_file.path:
        parser.set_defaults(**check_values(run_file.values, classes, run_file.path, name))
    parsed = parser.parse_args_into_dataclasses(args=list(argv), return_remaining_strings=False)
    return tuple(p for p in parsed if not isinstance(p, type(None)) and dataclasses.is_dataclass(p))


def parse_method_args(name: str, argv: Sequence[str]) -> tuple[Any, ...]:
    """Parse `[--config file.yaml] [--field value ...]` for method `name` into its dataclasses:
    (ScriptArguments, *extra_args, Config). YAML gives defaults, each value checked against its field's type
    (see `posttrain.cli_config`); flags override them. The file's `env:` block is read (and checked) but not
    applied: `run_method` applies it."""
    from .cli_config import read_run_file, split_config_flag

    path, rest = split_config_flag(argv)
    return _parse(name, read_run_file(path), rest)


def _read_and_apply_env(argv: Sequence[str]) -> tuple[Any, list[str]]:
    from .cli_config import apply_env, read_run_file, split_config_flag

    path, rest = split_config_flag(argv)
    run_file = read_run_file(path)
    apply_env(run_file)
    return run_file, rest


def run_method(name: str, argv: Sequence[str]) -> dict[str, float]:
    """Run one registered method from command-line arguments; returns its final metrics (with the final
    evaluation's `eval_*` when there is an evaluation set). The run file's `env:` variables are set first."""
    run_file, rest = _read_and_apply_env(argv)
    return _run(name, run_file, rest)


def _strategy(value: Any) -> str:
    return str(getattr(value, "value", value))


def _run(name: str, run_file: Any, argv: Sequence[str]) -> dict[str, float]:
    import posttrain.trainers  # noqa: F401  (registers the methods)

    from .script_args import load_script_datasets, peft_config_from_args
    from .trainers.registry import get_method

    spec = get_method(name)
    parsed = _parse(name, run_file, argv)
    script, *extras, config = parsed
    train, test = load_script_datasets(script, default_format=spec.task_format)
    if test is None and _strategy(config.eval_strategy) != "no":
        raise SystemExit(f"error: eval_strategy={_strategy(config.eval_strategy)!r} needs an evaluation set, and "
                         f"{script.dataset_name!r} gives none (dataset_test_split={script.dataset_test_split!r}); "
                         "name an existing split with dataset_test_split, give eval_dataset_name, or set "
                         "eval_strategy: 'no'")
    kwargs = spec.trainer_kwargs(script, *extras, config) if spec.trainer_kwargs else {}
    peft_task_type = kwargs.pop("peft_task_type", "CAUSAL_LM")
    processing_class = None
    if script.tokenizer_name_or_path:
        from .models import load_tokenizer

        processing_class = load_tokenizer(script.tokenizer_name_or_path)
    start = time.time()
    trainer = spec.trainer_class(
        model=kwargs.pop("model", script.model_name_or_path),
        args=config,
        train_dataset=train,
        eval_dataset=test,
        processing_class=processing_class,
        peft_config=peft_config_from_args(script, peft_task_type),
        **kwargs,
    )
    result = trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    metrics = dict(result.metrics)
    eval_metrics = trainer.evaluate() if test is not None else {}
    metrics.update(eval_metrics)
    # saved after the final evaluation, so trainer_state.json (what `posttrain report` reads) and
    # all_results.json hold it
    trainer.save_model(config.output_dir)
    trainer.save_metrics("train", dict(result.metrics))
    if eval_metrics:
        trainer.save_metrics("eval", eval_metrics)
    trainer.save_state()
    if trainer.is_world_process_zero():
        trainer.tokenizer.save_pretrained(config.output_dir)
    if script.merge_adapters:
        trainer.save_merged_model()
    if trainer.is_world_process_zero():
        shown = {k: v for k, v in metrics.items() if k in ("train_loss", "eval_loss", "train_runtime") or "accurac" in k}
        summary = "  ".join(f"{k}={v:.4g}" for k, v in shown.items())
        print(f"posttrain {name}: {trainer.state.global_step} steps in {time.time() - start:.1f}s  {summary}  "
              f"saved to {config.output_dir}", flush=True)
    return metrics


def _print_usage() -> None:
    from .trainers.registry import list_methods

    print("usage: posttrain <command> [--config run.yaml] [--field value ...]\n")
    print("training methods:")
    for spec in list_methods():
        print(f"  {spec.name:<12} {spec.help}")
    print("\nother commands:")
    for cmd, text in _BUILTIN_COMMANDS.items():
        print(f"  {cmd:<12} {text}")
    print("\n`posttrain <command> --help` lists every option of a command.")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `posttrain` executable."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        import posttrain.trainers  # noqa: F401  (registers the methods)

        _print_usage()
        return 0
    command, rest = argv[0], argv[1:]
    if command == "env":
        from .env_info import print_env

        print_env()
        return 0
    if command == "quickstart":
        from .quickstart import quickstart_main

        return quickstart_main(rest)
    if command == "serve":
        from .online.server import serve_main

        return serve_main(rest) or 0
    if command == "report":
        from .report import report_main

        return report_main(rest)
    from .launch import launch_main, split_launch_flags

    launched = launch_main(command, rest)  # --num_processes N / --accelerate_config: under accelerate launch
    if launched is not None:
        return launched
    rest = split_launch_flags(rest)[2]  # --num_processes 1 runs here
    # the run file's env: block is applied before torch and transformers are imported, so that variables
    # they read at import (OMP_NUM_THREADS, HF_HOME, HF_HUB_OFFLINE, ...) take effect
    run_file, rest = _read_and_apply_env(rest)
    import posttrain.trainers  # noqa: F401  (registers the methods)
    from .trainers.registry import get_method

    try:
        get_method(command)
    except KeyError as err:
        print(f"error: {err.args[0]}", file=sys.stderr)
        return 2
    _run(command, run_file, rest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
