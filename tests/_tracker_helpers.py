"""Readers of what the experiment trackers wrote to disk (trackio's SQLite file, tensorboard's event file,
wandb's offline run file), for tests that check a run reached them."""

from __future__ import annotations

import glob
import json
import sqlite3
import struct
from pathlib import Path


def trackio_logs(trackio_dir: Path, project: str) -> list[dict]:
    """Every `trackio.log` call of `project` (step and metrics), from its local SQLite database."""
    with sqlite3.connect(trackio_dir / f"{project}.db") as db:
        return [{"step": step, **json.loads(blob)} for step, blob in db.execute("select step, metrics from metrics")]


def tensorboard_tags(log_dir: Path) -> tuple[dict[str, list[float]], dict[str, list[str]]]:
    """(scalar tag -> values, text tag -> texts) of the event files in `log_dir`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    scalars = {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    texts = {tag: [e.tensor_proto.string_val[0].decode() for e in events.Tensors(tag)]
             for tag in events.Tags()["tensors"]}
    return scalars, texts


def wandb_history(run_dir: Path) -> list[dict]:
    """The history rows (key -> JSON value) of an offline wandb run, read from its `run-*.wandb` file: a
    7-byte header, then records in 32 KiB blocks, each chunk with a 7-byte header (checksum, length, type:
    1 full, 2 first, 3 middle, 4 last), each record a serialized `wandb_internal_pb2.Record`."""
    from wandb.proto import wandb_internal_pb2

    data = Path(glob.glob(str(run_dir / "run-*.wandb"))[0]).read_bytes()
    block, pos, pending, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        pending += data[pos:pos + length]
        pos += length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows
