"""Reading URL lists: parquet, csv, tsv or jsonl; a file, a folder or a glob; on disk or object storage.

The driver only *plans* (`plan_slices`): it lists the input files through fsspec and
cuts them into slices, parquet files by row groups and tsv/jsonl files by byte ranges,
without reading a row. Each task reads its own slice (`read_slice`), so the driver's
memory does not grow with the input. A byte-range slice holds the lines that *start*
inside it: a task skips the partial line at its start (the previous slice reads it)
and finishes the line that crosses its end. csv files are one slice each: a quoted
caption may hold newlines, so a byte offset does not tell where a row starts.

Errors name the file and the problem, so main() can print them as one line.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import ConfigError

FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}
SLICE_BYTES = 64 * 2**20
"""Target size of a tsv/jsonl slice (a task reads it whole, then writes it as parquet)."""
SLICE_ROWS = 1_000_000
"""Target rows of a parquet slice (whole row groups)."""


class InputError(ConfigError):
    """The URL list is missing, unreadable, empty or lacks a column."""


@dataclass(frozen=True)
class InputFile:
    url: str
    """As fsspec opens it (protocol included for object storage)."""
    fmt: str
    size: int
    version: str
    """What changes when the file is rewritten: mtime, ETag or generation (identity without reading it)."""


@dataclass(frozen=True)
class InputSlice:
    """A piece of one input file that one task reads."""

    url: str
    fmt: str
    start: int
    """parquet: first row group; text: first byte."""
    stop: int
    """parquet: row group after the last; text: byte after the last (lines starting before it)."""


def _suffix(path: str) -> str:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""


def _version(info: dict[str, Any]) -> str:
    for key in ("ETag", "etag", "generation", "mtime", "LastModified", "last_modified", "updated", "created"):
        if info.get(key) is not None:
            return f"{key}={info[key]}"
    return ""


def list_inputs(spec: str, exclude: str | None = None) -> list[InputFile]:
    """The input files of `spec` (file, folder or glob; local or any fsspec URL), sorted by name.
    Files below `exclude` (the job's own output folder, which a broad glob may reach) are left out."""
    from pipeline.rundir import OutputError, resolve

    try:
        fs, path = resolve(spec, "--urls")
    except OutputError as exc:
        raise InputError(str(exc)) from None
    try:
        # A name that exists is a name, even with [ or * in it; only otherwise is it a glob.
        if any(ch in path for ch in "*?[") and not fs.exists(path):
            infos = [fs.info(p) for p in fs.glob(path)]
            infos = [i for i in infos if i.get("type") == "file" and _suffix(i["name"]) in FORMATS]
            if not infos:
                raise InputError(f"{spec}: glob matches no .parquet, .csv, .tsv or .jsonl file")
        else:
            fs.invalidate_cache(path)
            try:
                info = fs.info(path)
            except FileNotFoundError:
                raise InputError(f"{spec}: no such file or folder") from None
            if info.get("type") == "directory":
                infos = [i for i in fs.ls(path, detail=True)
                         if i.get("type") == "file" and _suffix(i["name"]) in FORMATS]
                if not infos:
                    raise InputError(f"{spec}: folder holds no .parquet, .csv, .tsv or .jsonl file")
            else:
                if _suffix(path) not in FORMATS:
                    raise InputError(f"{spec}: unknown format {_suffix(path)!r} (use .parquet, .csv, .tsv or .jsonl)")
                infos = [info]
    except (PermissionError, OSError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"{spec}: cannot list the input ({type(exc).__name__}: {str(exc)[:160]})") from None
    from fsspec.implementations.local import LocalFileSystem

    local = isinstance(fs, LocalFileSystem)
    if exclude:
        infos = [i for i in infos if not (i["name"] + "/").startswith(exclude.rstrip("/") + "/")]
        if not infos:
            raise InputError(f"{spec}: the only files it names are inside --out")
    files = [InputFile(i["name"] if local else fs.unstrip_protocol(i["name"]), FORMATS[_suffix(i["name"])],
                       int(i.get("size") or 0), _version(i)) for i in infos]
    return sorted(files, key=lambda f: f.url)


def check_columns(files: list[InputFile], url_col: str, caption_col: str, extra_cols: tuple[str, ...],
                  no_header: bool = False) -> int:
    """Before anything is written: every file has the columns the job reads (parquet: its footer;
    csv/tsv: the header line; jsonl: the first record). One small read per file. Returns a lower
    bound of the input's rows (parquet's row counts; one per text file with a row)."""
    import pyarrow.parquet as pq

    wanted = (url_col, caption_col, *extra_cols)
    rows = 0
    for f in files:
        if f.size == 0:
            raise InputError(f"{f.url}: empty file")
        if f.fmt == "parquet":
            try:
                with fsspec.open(f.url, "rb") as fh:
                    pf = pq.ParquetFile(fh)
                    table = pf.schema_arrow.empty_table()
                    rows += pf.metadata.num_rows
            except (pa.ArrowInvalid, OSError) as exc:
                raise InputError(f"{f.url}: cannot read as parquet ({_first(exc)})") from None
        elif f.fmt == "csv":
            # The first rows through the csv parser itself: a quoted caption may span lines.
            table = _csv_head(f.url, wanted, no_header)
        else:
            with fsspec.open(f.url, "rb") as fh:
                head = fh.readline()
                if f.fmt != "jsonl" and not no_header:
                    head += fh.readline()  # the header and one row: enough to see the columns and types
            table = read_table(InputSlice(f.url, f.fmt, 0, len(head)), wanted, no_header) if head.strip() else None
        if table is None:
            raise InputError(f"{f.url}: empty file")
        if f.fmt != "parquet":
            rows += min(1, table.num_rows)
        select_columns(table, f.url, url_col, caption_col, extra_cols)
    return rows


def plan_slices(files: list[InputFile], slice_bytes: int = SLICE_BYTES,
                slice_rows: int = SLICE_ROWS) -> list[InputSlice]:
    """Cut the files into slices; reads parquet footers only (one small read per file)."""
    import pyarrow.parquet as pq

    out: list[InputSlice] = []
    for f in files:
        if f.fmt == "parquet":
            try:
                with fsspec.open(f.url, "rb") as fh:
                    meta = pq.ParquetFile(fh).metadata
            except (pa.ArrowInvalid, OSError) as exc:
                raise InputError(f"{f.url}: cannot read as parquet ({_first(exc)})") from None
            start, rows = 0, 0
            for g in range(meta.num_row_groups):
                rows += meta.row_group(g).num_rows
                if rows >= slice_rows:
                    out.append(InputSlice(f.url, f.fmt, start, g + 1))
                    start, rows = g + 1, 0
            if start < meta.num_row_groups or meta.num_row_groups == 0:
                out.append(InputSlice(f.url, f.fmt, start, meta.num_row_groups))
        elif f.fmt == "csv" or f.size <= slice_bytes:
            out.append(InputSlice(f.url, f.fmt, 0, f.size))
        else:
            for lo in range(0, f.size, slice_bytes):
                out.append(InputSlice(f.url, f.fmt, lo, min(f.size, lo + slice_bytes)))
    return out


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:160]


def _csv_options(columns: tuple[str, ...], no_header: bool, tsv: bool) -> tuple[Any, Any, Any]:
    import pyarrow.csv as pcsv

    # Typed as strings up front: inferring types and casting back turns uid 000123 into 123 and
    # caption 1.50 into 1.5. TSV has no quoting (the IANA text/tab-separated-values format), so a
    # quote in a caption is text, not a delimiter. Without a header, columns are named 0, 1, ...
    # after Arrow's f0, f1, ... (the parser counts the fields, quoting included).
    read = pcsv.ReadOptions(autogenerate_column_names=no_header, block_size=1 << 24)
    parse = pcsv.ParseOptions(delimiter="\t" if tsv else ",", quote_char=False if tsv else '"',
                              newlines_in_values=not tsv)
    types = {(f"f{c}" if no_header and c.isdigit() else c): pa.string() for c in columns}
    convert = pcsv.ConvertOptions(strings_can_be_null=False, column_types=types)
    return read, parse, convert


def _positional(t: pa.Table) -> pa.Table:
    return t.rename_columns([n[1:] if n.startswith("f") and n[1:].isdigit() else n for n in t.column_names])


def _csv_head(url: str, columns: tuple[str, ...], no_header: bool) -> pa.Table | None:
    """The first block of a csv file, parsed (None when the file holds nothing)."""
    import pyarrow.csv as pcsv

    read, parse, convert = _csv_options(columns, no_header, tsv=False)
    read.block_size = 1 << 20
    try:
        with fsspec.open(url, "rb") as fh:
            reader = pcsv.open_csv(fh, read_options=read, parse_options=parse, convert_options=convert)
            batch = next(iter(reader), None)
            table = pa.Table.from_batches([batch] if batch is not None else [], schema=reader.schema)
    except StopIteration:
        return None
    except (pa.ArrowInvalid, OSError) as exc:
        if "Empty CSV file" in str(exc):
            return None
        raise InputError(f"{url}: cannot read as csv ({_first(exc)})") from None
    return _positional(table) if no_header else table


def _text_bytes(sl: InputSlice, no_header: bool = False) -> tuple[bytes, bytes]:
    """(header line or b"", the slice's whole lines) of a text slice."""
    with fsspec.open(sl.url, "rb") as f:
        header = f.readline() if sl.fmt in ("csv", "tsv") and not no_header else b""
        if sl.start == 0:
            f.seek(len(header))
        else:
            f.seek(sl.start - 1)
            f.readline()  # the rest of the line that started before us (or just its "\n")
        body = io.BytesIO()
        while f.tell() < sl.stop:
            line = f.readline()
            if not line:
                break
            body.write(line if line.endswith(b"\n") else line + b"\n")
    return header, body.getvalue()


def read_table(sl: InputSlice, columns: tuple[str, ...] = (), no_header: bool = False) -> pa.Table:
    """The rows of one slice as Arrow, every column; in csv/tsv, `columns` are read as text exactly as
    written. `no_header`: csv/tsv files without a header line; their columns are named 0, 1, ..."""
    kind = sl.fmt
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            with fsspec.open(sl.url, "rb") as fh:
                pf = pq.ParquetFile(fh)
                groups = list(range(sl.start, sl.stop))
                return pf.read_row_groups(groups) if groups else pf.schema_arrow.empty_table()
        header, body = _text_bytes(sl, no_header)
        if kind in ("csv", "tsv"):
            import pyarrow.csv as pcsv

            if no_header:
                if not body.strip():
                    if sl.start == 0:
                        raise InputError(f"{sl.url}: empty file")
                    return pa.table({})
            elif not header.strip():
                raise InputError(f"{sl.url}: empty file")
            read, parse, convert = _csv_options(columns, no_header, tsv=kind == "tsv")
            t = pcsv.read_csv(io.BytesIO(header + body), read_options=read, parse_options=parse,
                              convert_options=convert)
            return _positional(t) if no_header else t
        import pyarrow.json as pjson

        if not body.strip():
            if sl.start == 0:
                raise InputError(f"{sl.url}: empty file")
            return pa.table({})
        # One block for the whole slice: a record longer than the default 1 MB block is not an error.
        return pjson.read_json(io.BytesIO(body), read_options=pjson.ReadOptions(block_size=len(body) + 1))
    except (pa.ArrowInvalid, OSError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"{sl.url}: cannot read as {kind} ({_first(exc)})") from None


def _column(t: pa.Table, name: str) -> pa.ChunkedArray | None:
    """A column by name, or a dotted path into struct columns (`image.url`); None if absent."""
    if name in t.column_names:
        return t.column(name)
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:cut])
        if head in t.column_names:
            col = t.column(head)
            for field_name in parts[cut:]:
                if not pa.types.is_struct(col.type) or col.type.get_field_index(field_name) < 0:
                    return None
                col = pc.struct_field(col, field_name)
            return col
    return None


def select_columns(t: pa.Table, where: str, url_col: str, caption_col: str,
                   extra_cols: tuple[str, ...]) -> pa.Table:
    """Columns url and caption as strings, and the extra columns with their own types (numbers stay
    numbers, nulls stay null; as img2dataset keeps them). Names may be dotted paths into structs
    (`--url-col image.url`). Bad columns are one-line errors."""
    wanted = {"url": url_col, "caption": caption_col, **{c: c for c in extra_cols}}
    twice = sorted({c for c in t.column_names if t.column_names.count(c) > 1})
    if twice:
        # Which of the two is the caption? Arrow would raise a KeyError; guessing would be worse.
        raise InputError(f"{where}: column name(s) {', '.join(map(repr, twice))} appear more than once in the "
                         "header; rename one of them")
    if t.num_columns == 0 and t.num_rows == 0:
        return pa.table({name: pa.array([], pa.string()) for name in wanted})
    missing = [c for c in wanted.values() if _column(t, c) is None]
    if missing:
        raise InputError(
            f"{where}: missing column(s) {', '.join(missing)} (has: {', '.join(t.column_names[:12])}); "
            "see --url-col, --caption-col, --extra-cols"
        )
    cols = {}
    for out_name, src in wanted.items():
        col = _column(t, src)
        assert col is not None
        if pa.types.is_nested(col.type):
            # A list or struct has no one text form to carry into the json (Arrow cannot cast it).
            raise InputError(f"{where}: column {src!r} holds {col.type} values; only scalar columns "
                             "(text, numbers, booleans, dates) can be read; a field of a struct is "
                             f"named with a dot ({src}.FIELD)")
        if out_name not in ("url", "caption"):
            # Extra columns keep their type: a float stays a float in each sample's json.
            cols[out_name] = col.cast(pa.string()) if pa.types.is_large_string(col.type) else col
            continue
        if not pa.types.is_string(col.type) and not pa.types.is_large_string(col.type):
            try:
                col = pc.cast(col, pa.string())
            except (pa.ArrowNotImplementedError, pa.ArrowInvalid) as exc:
                raise InputError(f"{where}: column {src!r} of type {col.type} cannot be read as text "
                                 f"({_first(exc)})") from None
        cols[out_name] = col.cast(pa.string())
    return pa.table(cols)


def read_slice(sl: InputSlice, url_col: str, caption_col: str, extra_cols: tuple[str, ...],
               no_header: bool = False) -> pa.Table:
    """One slice as columns url, caption (strings) and the extra columns, in file order."""
    wanted = (url_col, caption_col, *extra_cols)
    return select_columns(read_table(sl, wanted, no_header), sl.url, url_col, caption_col, extra_cols)


def read_urls(spec: str, url_col: str, caption_col: str, extra_cols: tuple[str, ...],
              no_header: bool = False) -> pa.Table:
    """The whole input as one table (tests and small tools; the jobs read slices in tasks)."""
    files = list_inputs(spec)
    tables = [read_slice(sl, url_col, caption_col, extra_cols, no_header) for sl in plan_slices(files)]
    table = pa.concat_tables(tables)
    if table.num_rows == 0:
        raise InputError(f"{spec}: no rows")
    return table


def column_digests(table: pa.Table) -> dict[str, str]:
    """Per column: a hash of its values, to refuse resuming into an output built from other input,
    naming the column that changed.

    Unambiguous: the values' lengths (-1 for null, so null is distinct from "") and their
    concatenated bytes are hashed as two streams (joining with a separator made
    ["a\\0b", "c"] and ["a", "b\\0c"] collide). Read from Arrow's buffers, not value by value.
    """
    import numpy as np

    out = {}
    for name in table.column_names:
        lengths, data = hashlib.sha256(), hashlib.sha256()
        for chunk in table.column(name).chunks:
            if not (pa.types.is_string(chunk.type) or pa.types.is_large_string(chunk.type)
                    or pa.types.is_binary(chunk.type) or pa.types.is_large_binary(chunk.type)):
                chunk = chunk.cast(pa.string())  # an extra column of numbers, dates, ...: its text form
            arr = chunk.cast(pa.large_binary()) if not pa.types.is_large_binary(chunk.type) else chunk
            n = len(arr)
            if n == 0:
                continue
            _, offsets_buf, data_buf = arr.buffers()
            offsets = np.frombuffer(offsets_buf, dtype=np.int64)[arr.offset:arr.offset + n + 1]
            lens = np.diff(offsets)
            if arr.null_count:
                lens = np.where(arr.is_null().to_numpy(zero_copy_only=False), -1, lens)
            lengths.update(lens.astype("<i8").tobytes())
            if data_buf is not None:
                data.update(memoryview(data_buf)[offsets[0]:offsets[-1]])
        out[name] = hashlib.sha256(f"{table.num_rows}\n".encode() + lengths.digest() + data.digest()).hexdigest()[:16]
    return out


fingerprint = column_digests


def combine_digests(per_slice: list[dict[str, str]]) -> dict[str, str]:
    """The input's per-column digests from its slices' (in slice order)."""
    names: list[str] = []
    for d in per_slice:
        names += [n for n in d if n not in names]
    return {n: hashlib.sha256("".join(d.get(n, "-") for d in per_slice).encode()).hexdigest()[:16] for n in names}
