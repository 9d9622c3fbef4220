"""Datasets from hub names and local files, as Oumi's `data.<split>.datasets[]` describe them.

Each entry (`mlxrl.config.DatasetParams`, read by attribute) is one of:
- a local `.jsonl` / `.json` / `.parquet` file, given as `dataset_name` or as `dataset_path`
  (a folder written by `Dataset.save_to_disk` also works as `dataset_path`);
- a Hugging Face hub name, loaded with `datasets.load_dataset` (from the local cache when
  offline);
- a registered name (`mlxrl.tasks`: `yahma/alpaca-cleaned`, `oumi-ai/oumi-letter-count`, ...):
  loaded like the above, then its transform applied; `dataset_path` points the name at a local
  copy of the raw rows. Other data whose rows have a registered format's columns (a local file
  of alpaca, ShareGPT or letter-count rows) gets that format's transform too, with one note.
  `dataset_kwargs` that a transform takes (`include_system_prompt`) go to it, the rest to
  `datasets.load_dataset`.

`split` is the HF split spec and may slice (`train[:100]`, `train[10%:20%]`); for a local file
the split name before the brackets names the file's only split, so `test[:20]` reads its first 20
rows. Then, as in Oumi: `shuffle` (with `seed`), and `sample_count` takes the first N rows
(repeating the data when N is larger). Several entries are concatenated, or interleaved when
every entry has a `mixture_proportion`.

Every user-caused problem raises `DataError` with one line naming the dataset and the problem.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

import datasets

from mlxrl import tasks
from mlxrl.errors import DataError

logger = logging.getLogger(__name__)

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_split(split_params, where: str = "data") -> datasets.Dataset:
    """All of `split_params.datasets`, loaded and concatenated (or interleaved)."""
    entries = list(getattr(split_params, "datasets", None) or [])
    if not entries:
        raise DataError(f"{where}: no datasets configured")
    parts = [load_one(dp, where=f"{where}.datasets[{i}]") for i, dp in enumerate(entries)]
    if len(parts) == 1:
        return parts[0]
    proportions = [getattr(dp, "mixture_proportion", None) for dp in entries]
    try:
        if all(p is not None for p in proportions):
            strategy = getattr(split_params, "mixture_strategy", "first_exhausted")
            return datasets.interleave_datasets(
                parts, probabilities=proportions, seed=getattr(split_params, "seed", None),
                stopping_strategy=strategy)
        return datasets.concatenate_datasets(parts)
    except ValueError as e:
        columns = "; ".join(f"[{i}]: {sorted(p.column_names)}" for i, p in enumerate(parts))
        raise DataError(f"{where}: the datasets cannot be combined ({_first_line(e)}); "
                        f"columns {columns}") from e


def load_one(dataset_params, where: str = "dataset") -> datasets.Dataset:
    """One `data.<split>.datasets[i]` entry as a `datasets.Dataset`."""
    name = getattr(dataset_params, "dataset_name", None)
    path = getattr(dataset_params, "dataset_path", None)
    split = getattr(dataset_params, "split", None) or "train"
    kwargs = dict(getattr(dataset_params, "dataset_kwargs", None) or {})
    label = f"{where} ({name or path!s})"
    if not name and not path:
        raise DataError(f"{where}: dataset_name is required")
    registered = tasks.dataset_named(name)
    options = {k: kwargs.pop(k) for k in list(kwargs) if registered and k in registered.options()}

    local = _local_file(name, path, label)
    if local is not None:
        ds = _load_local(local, split, kwargs, label)
    else:
        ds = _load_hub(name, getattr(dataset_params, "subset", None), split, kwargs, label)
    if len(ds) == 0:
        raise DataError(f"{label}: no rows in split {split!r}")
    ds = _transformed(ds, registered, options, label)
    ds = _sample(ds, getattr(dataset_params, "sample_count", None),
                 bool(getattr(dataset_params, "shuffle", False)),
                 getattr(dataset_params, "seed", None))
    if len(ds) == 0:
        raise DataError(f"{label}: no rows left after sampling (sample_count=0?)")
    return ds


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# ----------------------------------------------------------------------------- local files


def _local_file(name: str | None, path: str | None, label: str) -> Path | None:
    """The local file or folder to read, or None for a hub name."""
    if path:
        p = Path(os.path.expanduser(str(path)))
        if not p.exists():
            raise DataError(f"{label}: dataset_path not found: {p}")
        return p
    p = Path(os.path.expanduser(str(name)))
    if p.suffix.lower() in LOCAL_FORMATS or p.exists():
        if not p.exists():
            raise DataError(f"{label}: file not found: {p}")
        return p
    if str(name).startswith((".", "/", "~")):
        raise DataError(f"{label}: file not found: {p}")
    return None


def _load_local(p: Path, split: str, kwargs: dict, label: str) -> datasets.Dataset:
    if p.is_dir():
        return _load_dir(p, split, kwargs, label)
    builder = LOCAL_FORMATS.get(p.suffix.lower())
    if builder is None:
        raise DataError(f"{label}: unsupported file type {p.suffix!r} for {p}; "
                        f"use one of {', '.join(LOCAL_FORMATS)}")
    if builder == "json":
        _validate_json(p, label)
    base = split.split("[", 1)[0].strip() or "train"
    try:
        return datasets.load_dataset(builder, data_files={base: str(p)}, split=split, **kwargs)
    except Exception as e:
        if "corresponds to no data" in str(e):
            raise DataError(f"{label}: split {split!r} selects no rows of {p}") from e
        raise DataError(f"{label}: cannot read {p} with split {split!r}: {_first_line(e)}") from e


def _load_dir(p: Path, split: str, kwargs: dict, label: str) -> datasets.Dataset:
    """A `save_to_disk` folder (sliced by `split`), or a folder of data files."""
    try:
        if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists():
            loaded = datasets.load_from_disk(str(p))
            return _slice_saved(loaded, split)
        return datasets.load_dataset(str(p), split=split, **kwargs)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{label}: cannot read {p} with split {split!r}: {_first_line(e)}") from e


def _slice_saved(loaded, split: str) -> datasets.Dataset:
    base = split.split("[", 1)[0].strip()
    if isinstance(loaded, datasets.DatasetDict):
        if base not in loaded:
            raise DataError(f"split {base!r} not in saved dataset (has {sorted(loaded)})")
        loaded = loaded[base]
    instr = datasets.ReadInstruction.from_spec(split).to_absolute({base: len(loaded)})
    rows = [i for ins in instr for i in range(ins.from_, ins.to)]
    return loaded.select(rows)


MAX_ROW_BYTES = 10 * 2**20  # a JSONL row this long is a mistake (1,024 tokens are ~4 KB)


def _validate_json(p: Path, label: str) -> None:
    """JSON lines (one object a line), or one JSON document; errors give file:line. Each line must
    be UTF-8 and at most MAX_ROW_BYTES long."""
    data = p.read_bytes()
    if not data.strip():
        raise DataError(f"{label}: {p} is empty")
    if p.suffix.lower() == ".json" and data.lstrip()[:1] == b"[":
        _validate_json_document(p, utf8_text(data, p))
        return
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        if len(raw) > MAX_ROW_BYTES:
            raise DataError(f"{p}:{lineno}: the row is {len(raw) / 2**20:.1f} MB, over mlxrl's limit of "
                            f"{MAX_ROW_BYTES // 2**20} MB per row; shorten or remove it")
        line = utf8_text(raw, p, lineno)
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if p.suffix.lower() == ".json" and lineno == 1 and e.msg != "Extra data":
                _validate_json_document(p, utf8_text(data, p))
                return
            raise DataError(f"{p}:{lineno}: malformed JSON line ({e.msg})") from e
        if not isinstance(row, dict):
            raise DataError(f"{p}:{lineno}: expected a JSON object, got {type(row).__name__}")


def utf8_text(raw: bytes, p: Path, lineno: int | None = None) -> str:
    """`raw` decoded, or a DataError naming the file, line and column of the first bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if lineno is None:
            lineno = raw.count(b"\n", 0, e.start) + 1
            column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        else:
            column = e.start + 1
        raise DataError(f"{p}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {column}); "
                        f"save the file as UTF-8") from None


def _validate_json_document(p: Path, text: str) -> None:
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{p}:{e.lineno}: malformed JSON ({e.msg})") from e


# ----------------------------------------------------------------------------- hub


def _hub_offline() -> bool:
    return bool(datasets.config.HF_HUB_OFFLINE)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A TCP connect to the hub endpoint within `timeout` s (DNS included)."""
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    result: list[bool] = []

    def probe():
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


class _ForcedOffline:
    """Make `datasets` and `huggingface_hub` read only the local cache for one call."""

    def __enter__(self):
        from huggingface_hub import constants

        self._saved = (datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE)
        datasets.config.HF_HUB_OFFLINE = True
        constants.HF_HUB_OFFLINE = True

    def __exit__(self, *exc):
        from huggingface_hub import constants

        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = self._saved


def _load_hub(name: str, subset, split: str, kwargs: dict, label: str) -> datasets.Dataset:
    offline = _hub_offline() or not _hub_reachable()
    try:
        if offline and not _hub_offline():
            with _ForcedOffline():
                return datasets.load_dataset(name, subset, split=split, **kwargs)
        return datasets.load_dataset(name, subset, split=split, **kwargs)
    except (ConnectionError, FileNotFoundError) as e:
        if offline:
            raise DataError(
                f"{label}: {name!r} is not in the local Hugging Face cache and the hub is "
                "offline (HF_HUB_OFFLINE=1 or no network); set dataset_path to a local "
                ".jsonl/.json/.parquet copy"
            ) from e
        raise DataError(f"{label}: cannot load {name!r} from the hub: {_first_line(e)}") from e
    except Exception as e:
        raise DataError(f"{label}: cannot load {name!r} split {split!r}: {_first_line(e)}") from e


# ----------------------------------------------------------------------------- transform, sample


def _transformed(ds: datasets.Dataset, registered, options: dict, label: str) -> datasets.Dataset:
    """The rows after their registered transform: the named dataset's, or the one format whose
    raw columns the first row has (then one note says so)."""
    first = ds[0]
    entry = registered
    if entry is None:
        found = tasks.datasets_matching(first)
        if len(found) > 1:
            raise DataError(f"{label}: rows match several registered formats "
                            f"({', '.join(d.name for d in found)}); name one as dataset_name")
        entry = found[0] if found else None
        if entry is not None:
            logger.warning(f"note: {label}: rows have the columns of {entry.name} "
                f"({', '.join(sorted(entry.columns))}); transformed as it is")
    elif not entry.is_raw(first):
        return ds  # already in the trainer's columns (e.g. a transformed local copy)
    if entry is None:
        return ds
    try:
        # fresh dicts both ways: `datasets` drops the removed columns from a row the function
        # returns as it was given (an identity transform would give no rows)
        return ds.map(lambda row: dict(entry.transform(dict(row), **options)),
                      remove_columns=ds.column_names)
    except (KeyError, TypeError, IndexError, ValueError) as e:
        raise DataError(f"{label}: rows are not in {entry.name}'s raw format (columns "
                        f"{sorted(ds.column_names)}): {type(e).__name__}: {e}") from e


def with_chat_template_kwargs(ds: datasets.Dataset, kwargs: dict | None) -> datasets.Dataset:
    """`model.chat_template_kwargs` as every row's `chat_template_kwargs` (a row's own win), which
    the encoders pass to the chat template."""
    if not kwargs:
        return ds
    own = ds["chat_template_kwargs"] if "chat_template_kwargs" in ds.column_names else [None] * len(ds)
    merged = [{**kwargs, **(row or {})} for row in own]
    if "chat_template_kwargs" in ds.column_names:
        ds = ds.remove_columns("chat_template_kwargs")
    return ds.add_column("chat_template_kwargs", merged)


def _sample(ds: datasets.Dataset, count, shuffle: bool, seed) -> datasets.Dataset:
    """Oumi's `_sample_dataset`: shuffle, then the first `count` rows, repeating if short."""
    if count is None:
        return ds.shuffle(seed=seed) if shuffle else ds
    count = int(count)
    if len(ds) >= count:
        if shuffle:
            ds = ds.shuffle(seed=seed).flatten_indices()
        return ds.select(range(count))
    copies, rest = divmod(count, len(ds))
    parts = [ds] * copies
    if rest:
        parts.append((ds.shuffle(seed=seed) if shuffle else ds).select(range(rest)))
    out = datasets.concatenate_datasets(parts)
    return out.shuffle(seed=seed).flatten_indices() if shuffle else out
