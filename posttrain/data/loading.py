"""`load_any`: one entry point that turns whatever the user points at into a `datasets.Dataset`.

Accepted: a `Dataset`; a `DatasetDict` (the split is picked); a list of row dicts or a dict of columns; a local
.json/.jsonl/.parquet/.csv file, a list of such files, or a folder holding them (or a folder written by
`Dataset.save_to_disk`); anything else is treated as a hub name and goes to `datasets.load_dataset`.
CSV columns load as pandas infers them, except the text fields (`text`, `prompt`, `completion`, `chosen`,
`rejected`), which stay strings; an empty cell is None (and fails validation with its row).

Splits of local data are the ones `datasets.load_dataset(<builder>, data_dir=folder)` finds: in a folder, files
named by the split conventions (`train.jsonl`, `test-00000-of-00001.parquet`, `data/validation/part0.csv`,
`dev.jsonl`, `eval.json`, ...) form the splits `train`, `validation`, `test` (datasets' own patterns, so `eval`
is `test` and `dev` is `validation`); a folder of files with no split names is one `train` split. A single
file, or a list of files, is one `train` split, whatever its name (as with `load_dataset(..., data_files=)`).
Held-out rows are therefore never loaded as training rows, and asking for a split the data lacks is an error
that names the splits it has. `load_held_out` picks the evaluation rows of a source.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets

__all__ = ["held_out_split", "load_any", "load_held_out", "split_names"]

logger = logging.getLogger(__name__)

_TEXT_COLUMNS = ("text", "prompt", "completion", "chosen", "rejected")
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def _builder(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".xz", ".zst"):
        suffixes = suffixes[:-1]
    if not suffixes or suffixes[-1] not in _BUILDERS:
        raise ValueError(f"cannot load '{path}': expected a file ending in one of {sorted(_BUILDERS)}")
    return _BUILDERS[suffixes[-1]]


def _load_files(files: Sequence[Path], **kwargs: Any) -> datasets.Dataset:
    builders = {_builder(f) for f in files}
    if len(builders) != 1:
        raise ValueError(f"cannot load files of different types together: {[str(f) for f in files]}")
    builder = builders.pop()
    if builder == "csv":  # keep text cells text: pandas would read a completion " 4" as the integer 4
        kwargs.setdefault("converters", {c: str for c in _TEXT_COLUMNS})
    return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **kwargs)


def _is_data_file(path: Path) -> bool:
    try:
        _builder(path)
    except ValueError:
        return False
    return True


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "state.json").exists() or (folder / "dataset_dict.json").exists()


def _folder_split_files(folder: Path) -> dict[str, list[Path]]:
    """The data files of each split of `folder`, found by `datasets`' own split-name patterns (what
    `load_dataset(<builder>, data_dir=folder)` uses). Data files that match no split are reported, not used."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    every = sorted(p for p in folder.rglob("*") if p.is_file() and _is_data_file(p)
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not every:
        raise ValueError(f"folder '{folder}' holds no {sorted(_BUILDERS)} files")
    patterns = get_data_patterns(str(folder))
    resolved = DataFilesDict.from_patterns(patterns, base_path=str(folder))
    splits: dict[str, list[Path]] = {}
    for split, files in resolved.items():
        data_files = sorted(Path(f) for f in files if _is_data_file(Path(f)))
        if data_files:
            splits[str(split)] = data_files
    if not splits:
        raise ValueError(f"folder '{folder}' holds no {sorted(_BUILDERS)} files in any split")
    used = {f.resolve() for files in splits.values() for f in files}
    unused = [str(p.relative_to(folder)) for p in every if p.resolve() not in used]
    if unused:
        logger.warning(
            "%s: %d data file(s) match no split and are not loaded: %s (the splits are %s, named from the files "
            "as datasets.load_dataset does)", folder, len(unused), ", ".join(unused[:10]), sorted(splits))
    return splits


def _pick_split(data: datasets.DatasetDict, split: str) -> datasets.Dataset:
    if split not in data:
        raise ValueError(f"split '{split}' not found; the dataset has splits {sorted(data.keys())}")
    return data[split]


def _only_train(data: Any, split: str, what: str) -> None:
    if split != "train":
        raise ValueError(f"split '{split}' not found: {what} is one split, 'train' (only a folder of files "
                         "named by split, e.g. train.jsonl + test.jsonl, or a DatasetDict has others)")


def split_names(data: Any) -> list[str] | None:
    """The split names `load_any(data, split=...)` accepts, without loading the rows; None for a hub name (its
    splits are only known after asking the hub)."""
    if isinstance(data, datasets.DatasetDict):
        return sorted(data.keys())
    if isinstance(data, (str, os.PathLike)):
        path = Path(data).expanduser()
        if path.is_dir():
            if (path / "dataset_dict.json").exists():
                return sorted(json.loads((path / "dataset_dict.json").read_text())["splits"])
            if _is_saved_dataset(path):
                return ["train"]
            return sorted(_folder_split_files(path))
        if path.is_file() or _is_data_file(path):
            return ["train"]
        return None
    return ["train"]


def held_out_split(data: Any, split: str | None = None) -> str:
    """The split `load_held_out` takes from `data`: `split` when given, else `test`, else the only split of a
    source that has one; a source with several splits and no `test` one is a ValueError naming them."""
    if split is not None:
        return split
    names = split_names(data)
    if names is None or "test" in names:
        return "test"
    if len(names) == 1:
        return names[0]
    raise ValueError(f"'{data}' has splits {names} and none is 'test': name the evaluation split")


def load_held_out(data: Any, split: str | None = None, **kwargs: Any) -> datasets.Dataset:
    """The evaluation rows of `data`: its `split` when given, else its `test` split, else the whole of a source
    that has one split only (an eval file such as `eval.jsonl` or `held_out.jsonl`). A source with several splits
    and no `test` one is an error that names them, rather than a guess."""
    return load_any(data, split=held_out_split(data, split), **kwargs)


def load_any(data: Any, split: str = "train", **kwargs: Any) -> datasets.Dataset:
    """Load `data` as a `datasets.Dataset`.

    `split` picks the split of a `DatasetDict`, a hub dataset or a local folder whose files are named by split
    (train.jsonl, test.jsonl, ...); a single file, a list of files or a folder without split names is the one
    split `train`. A split the data lacks is a ValueError naming the ones it has. Extra keyword arguments go to
    `datasets.load_dataset` (e.g. `name=` for a hub config).
    """
    if isinstance(data, datasets.Dataset):
        return data
    if isinstance(data, datasets.DatasetDict):
        return _pick_split(data, split)
    if isinstance(data, Mapping):
        return datasets.Dataset.from_dict(dict(data))
    if isinstance(data, (str, os.PathLike)):
        path = Path(data).expanduser()
        if path.is_dir():
            if _is_saved_dataset(path):
                loaded = datasets.load_from_disk(str(path))
                if isinstance(loaded, datasets.DatasetDict):
                    return _pick_split(loaded, split)
                _only_train(loaded, split, f"the saved dataset '{path}'")
                return loaded
            splits = _folder_split_files(path)
            if split not in splits:
                raise ValueError(f"split '{split}' not found in folder '{path}': its files form the splits "
                                 f"{sorted(splits)} (named as datasets.load_dataset names them)")
            return _load_files(splits[split], **kwargs)
        if path.is_file():
            _only_train(path, split, f"the file '{path}'")
            return _load_files([path], **kwargs)
        if _is_data_file(path):
            raise FileNotFoundError(f"no such data file: '{path}'")
        return datasets.load_dataset(str(data), split=split, **kwargs)
    if isinstance(data, Sequence) and data:
        if all(isinstance(row, Mapping) for row in data):
            return datasets.Dataset.from_list([dict(row) for row in data])
        if all(isinstance(p, (str, os.PathLike)) for p in data):
            paths = [Path(p).expanduser() for p in data]
            missing = [str(p) for p in paths if not p.is_file()]
            if missing:
                raise FileNotFoundError(f"no such data files: {missing}")
            _only_train(paths, split, "a list of files")
            return _load_files(paths, **kwargs)
    raise TypeError(
        "expected a Dataset, a DatasetDict, rows, a local .json/.jsonl/.parquet/.csv path (or list of them, or a "
        f"folder) or a hub name, got {type(data).__name__}"
    )
