"""Reading the user's data file: JSONL (also gzipped), a JSON array, CSV, Parquet, or a folder
written by ``datasets``' ``save_to_disk``, through the ``datasets`` library.

Every row comes back as a dict with ``LINE`` added: where it sits in the file, for error
messages (``line 7`` of a JSONL or CSV file, ``row 7`` of the others). A file that cannot be
read is a ``TrainError`` naming the file, the line and the fix, and nothing is left behind
(``datasets`` writes its Arrow cache into a temporary folder, removed after reading).
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import logging
import tempfile
from pathlib import Path

from paca.errors import require
from paca.recipes.train.errors import TrainError

LINE = "_paca_line"  # where a row came from in the user's file, for error messages
SPLITS = ("train", "validation", "test")
# file name endings -> the datasets builder that reads them
BUILDERS = {
    ".jsonl": "json",
    ".jsonl.gz": "json",
    ".json": "json",
    ".json.gz": "json",
    ".csv": "csv",
    ".csv.gz": "csv",
    ".parquet": "parquet",
}
# encodings a file that is not UTF-8 is most often in, tried in this order to name the one to
# convert from: UTF-16 announces itself with a byte-order mark; cp1252 (Windows' Western
# European) decodes almost any byte string, so it comes last and is said as a guess
GUESSES = ("utf-16", "cp1252")


def _builder(path: Path) -> str | None:
    name = path.name.lower()
    return next((b for end, b in BUILDERS.items() if name.endswith(end)), None)


def _opener(path: Path):
    return gzip.open if path.name.lower().endswith(".gz") else open


def _where(path: Path | str, line: int | None, kind: str = "line") -> str:
    place = f"data={path}" if str(path) else ""
    return f"{place} {kind} {line}".strip() if line is not None else place


def _utf8_text(path: Path) -> str:
    """The file's text; a ``TrainError`` naming the first line that is not UTF-8, and the
    encoding to convert from when one can be guessed."""
    with _opener(path)(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
    guess = None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        guess = "utf-16"
    else:
        with contextlib.suppress(UnicodeDecodeError):
            raw.decode("cp1252")
            guess = "cp1252"
    how = (
        f"it looks like {guess}: convert it with `iconv -f {guess} -t utf-8 IN > OUT`"
        if guess
        else "convert it to UTF-8 (`iconv -f ENCODING -t utf-8 IN > OUT`; `file IN` may name "
        "the encoding)"
    )
    raise TrainError(f"{_where(path, line)}: not UTF-8 text; {how}")


# how rows sit in a JSON file: one array, or one object per line
LAYOUT = {
    True: "the file holds one JSON array of objects",
    False: 'each line holds one JSON object such as {"prompt": ..., "response": ...}',
}


def _check_json(path: Path, text: str) -> None:
    """The first place where a JSON array or JSON-lines ``text`` is not rows of objects, as a
    ``TrainError`` naming its line (or row)."""
    array = text.lstrip().startswith("[")
    if array:
        pieces = [(1, text)]
    else:
        pieces = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    for number, piece in pieces:
        try:
            value = json.loads(piece)
        except json.JSONDecodeError as exc:
            line = exc.lineno if array else number
            raise TrainError(
                f"{_where(path, line)}: not valid JSON ({exc.msg}); {LAYOUT[array]}"
            ) from None
        for index, row in enumerate(value if array else [value], start=1):
            if not isinstance(row, dict):
                place = _where(path, index, "row") if array else _where(path, number)
                raise TrainError(
                    f"{place}: a JSON {type(row).__name__}, not an object; {LAYOUT[array]}"
                )


def _line_numbers(text: str, builder: str, count: int) -> list[int] | None:
    """The line each row of a JSONL or CSV file's ``text`` starts on (blank lines are skipped
    by the readers, and a CSV field may span lines); ``None`` where rows have no lines."""
    if builder == "json":
        if text.lstrip().startswith("["):  # a JSON array: rows, not lines
            return None
        lines = [n for n, t in enumerate(text.splitlines(), start=1) if t.strip()]
    else:  # csv: the header is line 1; a record starts where the previous one ended
        reader = csv.reader(io.StringIO(text))
        lines, start = [], 1
        for record in reader:
            if record and start > 1:
                lines.append(start)
            start = reader.line_num + 1
    return lines if len(lines) == count else None


@contextlib.contextmanager
def _quiet_datasets():
    """``datasets`` without its progress bars and log lines (it logs a failed parse at ERROR
    level before raising; the error this module raises says it better)."""
    import datasets

    bars = datasets.utils.logging.is_progress_bar_enabled()
    logger = logging.getLogger("datasets")
    level = logger.level
    datasets.utils.logging.disable_progress_bar()
    logger.setLevel(logging.CRITICAL)
    try:
        yield datasets
    finally:
        logger.setLevel(level)
        if bars:
            datasets.utils.logging.enable_progress_bar()


def _rows(dataset, path: Path, lines: list[int] | None) -> list[dict]:
    rows = dataset.to_list()
    if lines is None:
        return [row | {LINE: ("row", i)} for i, row in enumerate(rows, start=1)]
    return [row | {LINE: ("line", n)} for row, n in zip(rows, lines, strict=True)]


def where(row: dict, path: str | Path) -> str:
    """``data=PATH line 7`` (or ``row 7``): the place of ``row`` for an error message."""
    kind, number = row.get(LINE, ("row", None))
    return _where(path, number, kind)


def read_rows(path: Path) -> list[dict] | dict[str, list[dict]]:
    """The rows of a data file, or of each split of a ``save_to_disk`` folder.

    Args:
        path (Path): a ``.jsonl``, ``.jsonl.gz``, ``.json`` (an array or JSON lines), ``.csv``
            or ``.parquet`` file, or a folder written by ``Dataset.save_to_disk`` or
            ``DatasetDict.save_to_disk``.

    Returns:
        list[dict] | dict[str, list[dict]]: the rows (each with ``LINE``); for a
        ``DatasetDict`` folder, the rows of each split.

    Raises:
        TrainError: no such file, an unknown kind of file, text that is not UTF-8, a line
            that is not a JSON object, an empty file, or a split that is not train,
            validation or test.
    """
    path = Path(path)
    if not path.exists():
        raise TrainError(f"data={path}: no such file or folder")
    require("datasets", "reading data files in paca train")
    if path.is_dir():
        return _read_folder(path)
    builder = _builder(path)
    if builder is None:
        raise TrainError(
            f"data={path}: unknown kind of file; use .jsonl (or .jsonl.gz), .json, .csv, "
            ".parquet, or a folder written by datasets' save_to_disk"
        )
    text = None
    if builder in ("json", "csv"):
        text = _utf8_text(path)
        if not text.strip():
            raise TrainError(f"data={path}: the dataset is empty")
        if builder == "json" and not path.name.lower().endswith((".json", ".json.gz")):
            _check_json(path, text)
    with _quiet_datasets() as datasets, tempfile.TemporaryDirectory() as cache:
        try:
            dataset = datasets.load_dataset(
                builder, data_files=str(path), split="train", cache_dir=cache, keep_in_memory=True
            )
        except Exception as exc:  # datasets wraps every parse error in its own types
            if builder == "json":
                _check_json(path, text)
            cause = exc.__cause__ or exc
            raise TrainError(
                f"data={path}: {builder} reader failed ({str(cause).splitlines()[0][:200]}); "
                "check the file's format"
            ) from None
    if len(dataset) == 0:
        raise TrainError(f"data={path}: the dataset is empty")
    lines = _line_numbers(text, builder, len(dataset)) if text is not None else None
    return _rows(dataset, path, lines)


def _read_folder(path: Path) -> list[dict] | dict[str, list[dict]]:
    with _quiet_datasets() as datasets:
        try:
            loaded = datasets.load_from_disk(str(path), keep_in_memory=True)
        except FileNotFoundError:
            raise TrainError(
                f"data={path}: a folder, but not one written by datasets' save_to_disk; give a "
                "data file (.jsonl, .json, .csv, .parquet) or such a folder"
            ) from None
    if isinstance(loaded, datasets.Dataset):
        if len(loaded) == 0:
            raise TrainError(f"data={path}: the dataset is empty")
        return _rows(loaded, path, None)
    unknown = sorted(set(loaded) - set(SPLITS))
    if unknown:
        raise TrainError(
            f"data={path}: split {unknown[0]!r} is not one of {', '.join(SPLITS)}; rename it "
            "(DatasetDict({'train': ..., 'validation': ...}))"
        )
    if "train" not in loaded or len(loaded["train"]) == 0:
        raise TrainError(f"data={path}: no train split with rows; the run trains on it")
    return {split: _rows(loaded[split], path / split, None) for split in loaded}
