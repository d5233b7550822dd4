"""The `posttrain` command line.

    posttrain <method> [--config run.yaml] [--<any config field> value ...]
    posttrain quickstart | serve | report <run_dir> | env

Every registered method (see `posttrain.trainers.registry`) becomes a command; its config dataclass, the
shared `ScriptArguments` and the method's extra argument dataclasses are filled from the YAML file first and
then from flags, so a flag always overrides the file. `posttrain <method> --help` lists every field.
"""

from __future__ import annotations

import dataclasses
import os
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


def _load_yaml(path: str) -> dict[str, Any]:
    import yaml

    if not os.path.exists(path):
        raise SystemExit(f"error: config file {path!r} does not exist")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise SystemExit(f"error: {path} must hold a mapping of field: value, got {type(data).__name__}")
    return data


def parse_method_args(name: str, argv: Sequence[str]) -> tuple[Any, ...]:
    """Parse `[--config file.yaml] [--field value ...]` for method `name` into its dataclasses:
    (ScriptArguments, *extra_args, Config). YAML gives defaults; flags override them."""
    from transformers import HfArgumentParser

    from .script_args import ScriptArguments
    from .trainers.registry import get_method

    spec = get_method(name)
    classes = [ScriptArguments, *spec.extra_args, spec.config_class]
    parser = HfArgumentParser(classes, prog=f"posttrain {name}", description=spec.help)
    parser.add_argument("--config", default=None, help="YAML file of field: value pairs; flags override it.")
    argv = list(argv)
    config_path = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise SystemExit("error: --config needs a file path")
        config_path = argv[i + 1]
        del argv[i : i + 2]
    if config_path:
        values = _load_yaml(config_path)
        known = {f.name for c in classes for f in dataclasses.fields(c)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SystemExit(f"error: {config_path}: unknown field(s) {', '.join(unknown)}; "
                             f"see `posttrain {name} --help` for the valid ones")
        parser.set_defaults(**values)
    parsed = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=False)
    return tuple(p for p in parsed if not isinstance(p, type(None)) and dataclasses.is_dataclass(p))


def run_method(name: str, argv: Sequence[str]) -> dict[str, float]:
    """Run one registered method from command-line arguments; returns its final metrics."""
    from .script_args import load_script_datasets, peft_config_from_args
    from .trainers.registry import get_method

    spec = get_method(name)
    parsed = parse_method_args(name, argv)
    script, *extras, config = parsed
    train, test = load_script_datasets(script, default_format=spec.task_format)
    kwargs = spec.trainer_kwargs(script, *extras) if spec.trainer_kwargs else {}
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
    trainer.save_model(config.output_dir)
    trainer.save_state()
    if trainer.is_world_process_zero():
        trainer.tokenizer.save_pretrained(config.output_dir)
    metrics = dict(result.metrics)
    if test is not None:
        metrics.update(trainer.evaluate())
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
    import posttrain.trainers  # noqa: F401  (registers the methods)
    from .trainers.registry import get_method

    try:
        get_method(command)
    except KeyError as err:
        print(f"error: {err.args[0]}", file=sys.stderr)
        return 2
    run_method(command, rest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
