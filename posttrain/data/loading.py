"""`load_any`: one entry point that turns whatever the user points at into a `datasets.Dataset`.

Accepted: a `Dataset`; a `DatasetDict` (the split is picked); a list of row dicts or a dict of columns; a local
.json/.jsonl/.parquet/.csv file, a list of such files, or a folder holding them (or a folder written by
`Dataset.save_to_disk`); anything else is treated as a hub name and goes to `datasets.load_dataset`.
CSV columns load as pandas infers them, except the text fields (`text`, `prompt`, `completion`, `chosen`,
`rejected`), which stay strings; an empty cell is None (and fails validation with its row).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets

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


def _load_folder(folder: Path, **kwargs: Any) -> datasets.Dataset | datasets.DatasetDict:
    if (folder / "state.json").exists() or (folder / "dataset_dict.json").exists():
        return datasets.load_from_disk(str(folder))
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".") and _is_data_file(p)
    )
    if not files:
        raise ValueError(f"folder '{folder}' holds no {sorted(_BUILDERS)} files")
    return _load_files(files, **kwargs)


def _is_data_file(path: Path) -> bool:
    try:
        _builder(path)
    except ValueError:
        return False
    return True


def _pick_split(data: datasets.DatasetDict, split: str) -> datasets.Dataset:
    if split not in data:
        raise ValueError(f"split '{split}' not found; the dataset has splits {sorted(data.keys())}")
    return data[split]


def load_any(data: Any, split: str = "train", **kwargs: Any) -> datasets.Dataset:
    """Load `data` as a `datasets.Dataset`.

    `split` picks the split of a `DatasetDict` or hub dataset (local files always form one split). Extra
    keyword arguments go to `datasets.load_dataset` (e.g. `name=` for a hub config).
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
            loaded = _load_folder(path, **kwargs)
            return _pick_split(loaded, split) if isinstance(loaded, datasets.DatasetDict) else loaded
        if path.is_file():
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
            return _load_files(paths, **kwargs)
    raise TypeError(
        "expected a Dataset, a DatasetDict, rows, a local .json/.jsonl/.parquet/.csv path (or list of them, or a "
        f"folder) or a hub name, got {type(data).__name__}"
    )
