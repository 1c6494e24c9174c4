"""Reading URL lists: parquet, csv, tsv or jsonl; a file, a folder or a glob.

Errors name the file and the problem, so main() can print them as one line.
"""

from __future__ import annotations

import glob as globmod
import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import ConfigError

FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}


class InputError(ConfigError):
    """The URL list is missing, unreadable, empty or lacks a column."""


def list_inputs(spec: str) -> list[Path]:
    p = Path(spec)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in FORMATS and f.is_file())
        if not files:
            raise InputError(f"{spec}: folder holds no .parquet, .csv, .tsv or .jsonl file")
        return files
    if any(ch in spec for ch in "*?["):
        files = sorted(Path(f) for f in globmod.glob(spec) if Path(f).suffix.lower() in FORMATS)
        if not files:
            raise InputError(f"{spec}: glob matches no .parquet, .csv, .tsv or .jsonl file")
        return files
    if not p.exists():
        raise InputError(f"{spec}: no such file or folder")
    if p.suffix.lower() not in FORMATS:
        raise InputError(f"{spec}: unknown format {p.suffix!r} (use .parquet, .csv, .tsv or .jsonl)")
    return [p]


def read_file(path: Path, columns: tuple[str, ...] = ()) -> pa.Table:
    """The table in `path`; in csv/tsv, `columns` are read as text exactly as written."""
    kind = FORMATS[path.suffix.lower()]
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path)
        if kind in ("csv", "tsv"):
            import pyarrow.csv as pcsv

            # Typed as strings up front: inferring types and casting back turns uid 000123
            # into 123 and caption 1.50 into 1.5. TSV has no quoting (the IANA text/tab-separated-values
            # format), so a quote in a caption is text, not a delimiter.
            tsv = kind == "tsv"
            return pcsv.read_csv(
                path,
                parse_options=pcsv.ParseOptions(delimiter="\t" if tsv else ",", quote_char=False if tsv else '"',
                                                newlines_in_values=not tsv),
                convert_options=pcsv.ConvertOptions(strings_can_be_null=False,
                                                    column_types={c: pa.string() for c in columns}),
            )
        import pyarrow.json as pjson

        return pjson.read_json(path)
    except (pa.ArrowInvalid, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if path.stat().st_size == 0 if path.exists() else False:
            raise InputError(f"{path}: empty file") from None
        raise InputError(f"{path}: cannot read as {kind} ({first[:160]})") from None


def read_urls(spec: str, url_col: str, caption_col: str, extra_cols: tuple[str, ...]) -> pa.Table:
    """One table with columns url, caption and the extra columns, as strings, in file order."""
    wanted = {"url": url_col, "caption": caption_col, **{c: c for c in extra_cols}}
    tables = []
    for path in list_inputs(spec):
        t = read_file(path, tuple(wanted.values()))
        twice = sorted({c for c in t.column_names if t.column_names.count(c) > 1})
        if twice:
            # Which of the two is the caption? Arrow would raise a KeyError; guessing would be worse.
            raise InputError(f"{path}: column name(s) {', '.join(map(repr, twice))} appear more than once in the "
                             "header; rename one of them")
        missing = [c for c in wanted.values() if c not in t.column_names]
        if missing:
            raise InputError(
                f"{path}: missing column(s) {', '.join(missing)} (has: {', '.join(t.column_names[:12])}); "
                "see --url-col, --caption-col, --extra-cols"
            )
        cols = {}
        for out_name, src in wanted.items():
            col = t.column(src)
            if pa.types.is_nested(col.type):
                # A list or struct has no one text form to carry into the json (Arrow cannot cast it).
                raise InputError(f"{path}: column {src!r} holds {col.type} values; only scalar columns "
                                 "(text, numbers, booleans, dates) can be read")
            if not pa.types.is_string(col.type) and not pa.types.is_large_string(col.type):
                try:
                    col = pc.cast(col, pa.string())
                except (pa.ArrowNotImplementedError, pa.ArrowInvalid) as exc:
                    raise InputError(f"{path}: column {src!r} of type {col.type} cannot be read as text "
                                     f"({str(exc).splitlines()[0][:120]})") from None
            cols[out_name] = col.cast(pa.string())
        tables.append(pa.table(cols))
    table = pa.concat_tables(tables)
    if table.num_rows == 0:
        raise InputError(f"{spec}: no rows")
    return table


def fingerprint(table: pa.Table) -> dict[str, str]:
    """Per column the job reads (url, caption, every extra column): a hash of its values, to refuse
    resuming into an output built from other input, naming the column that changed.

    Unambiguous: each value is length-prefixed and null is distinct from "" (joining with a
    separator made ["a\\0b", "c"] and ["a", "b\\0c"] collide).
    """
    out = {}
    for name in table.column_names:
        h = hashlib.sha256()
        h.update(f"{table.num_rows}\n".encode())
        for chunk in table.column(name).chunks:
            for v in chunk.to_pylist():
                if v is None:
                    h.update(b"\x00")
                else:
                    data = str(v).encode("utf-8", "surrogatepass")
                    h.update(b"\x01" + len(data).to_bytes(8, "little") + data)
        out[name] = h.hexdigest()[:16]
    return out
