"""MovieLens readers for every GroupLens release layout, and MovieLens side-feature engineering.

Layouts (detected from the files present in the directory):

* ``ml-100k``: ``u.data`` (tab-separated), ``u.user`` (``id|age|gender|occupation|zip``),
  ``u.item`` (``|``-separated, ISO-8859-1, 19 genre flags named by ``u.genre``).
* ``ml-1m``: ``ratings.dat``, ``users.dat`` (``id::gender::age::occupation::zip``), ``movies.dat``
  (``id::title::Genre|Genre``), ``::``-separated, ISO-8859-1.
* ``ml-10m``: the same without ``users.dat``.
* ``ml-20m`` (also 25m, latest): ``ratings.csv`` and ``movies.csv`` with headers, quoted titles.

Ratings files may be gzipped (``ratings.dat.gz``). MovieLens ids are 1-based, every rating must
reference a listed user and movie, and ratings lie in ``(0, 5]``; anything else is a bad row.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data.errors import BadRows, DataError
from data.tabular import (
    Field,
    Parsed,
    RawTables,
    read_delimited,
    reject_duplicates,
    reject_non_positive,
    reject_unknown,
)

LATIN1 = "latin-1"  # GroupLens .dat/u.* files predate UTF-8 (accented titles)
NO_GENRES = "(no genres listed)"  # ml-20m+ placeholder, stored as an empty genre list
ONE_BASED = "MovieLens ids are 1-based"

# ML-1M's age groups ("1" = under 18, "18" = 18-24, ..., "56" = 56+); ML-100K's exact ages are
# bucketed into the same groups so both releases share one feature definition.
AGE_GROUPS = (1, 18, 25, 35, 45, 50, 56)
ZIP_PREFIX_LEN = 3  # US 3-digit ZIP prefix = one sectional mail centre: coarse enough to generalise
_TITLE_YEAR = re.compile(r"\((\d{4})\)\s*$")
_DATE_YEAR = re.compile(r"(\d{4})\s*$")

_RATING_FIELDS = [
    Field("user_id", "int"),
    Field("item_id", "int"),
    Field("rating", "float"),
    Field("timestamp", "int"),
]
_CSV_RATING_NAMES = {"userId": "user_id", "movieId": "item_id", "rating": "rating", "timestamp": "timestamp"}
_RATINGS_FILES = ("u.data", "ratings.dat", "ratings.dat.gz", "ratings.csv", "ratings.csv.gz")


def _ratings_format(path: Path) -> str:
    name = path.name
    if name.startswith("u.data"):
        return "tab"
    if ".dat" in name:
        return "dat"
    if ".csv" in name:
        return "csv"
    raise DataError(
        path, None, None, "unknown MovieLens ratings file (expected u.data, ratings.dat or ratings.csv)"
    )


def detect_variant(directory: Path, ratings_file: Path | None = None) -> tuple[str, Path]:
    """``(variant, ratings path)`` from the files present; variant is ml-100k/ml-1m/ml-10m/ml-20m."""
    directory = Path(directory)
    if ratings_file is None:
        found = [directory / n for n in _RATINGS_FILES if (directory / n).is_file()]
        if not found:
            raise DataError(
                directory, None, None, f"no MovieLens ratings file; expected one of {_RATINGS_FILES}"
            )
        ratings_file = found[0]
    fmt = _ratings_format(Path(ratings_file))
    if fmt == "tab":
        return "ml-100k", Path(ratings_file)
    if fmt == "dat":
        return ("ml-1m" if (directory / "users.dat").is_file() else "ml-10m"), Path(ratings_file)
    return "ml-20m", Path(ratings_file)


def _require(path: Path) -> Path:
    if not path.is_file():
        raise DataError(path, None, None, "file not found (every MovieLens release of this layout has it)")
    return path


def title_year(title: str | None, date: str | None = None) -> int | None:
    """Release year from ``"Title (1995)"``, else from a release date ending in the year."""
    for text, pattern in ((title, _TITLE_YEAR), (date, _DATE_YEAR)):
        if text:
            m = pattern.search(text)
            if m:
                return int(m.group(1))
    return None


def _items_table(ids: np.ndarray, titles: list[str], genres: pa.Array, years: list[int | None]) -> pa.Table:
    return pa.table(
        {
            "item_id": pa.array(ids, pa.int64()),
            "title": pa.array(titles, pa.string()),
            "genres": genres,
            "year": pa.array(years, pa.int64()),
        }
    )


def _read_genre_names(path: Path, bad_rows: BadRows) -> list[str]:
    parsed = read_delimited(
        path, [Field("name"), Field("id", "int")], sep="|", encoding=LATIN1, bad_rows=bad_rows
    )
    ids = parsed.numpy("id")
    if sorted(ids.tolist()) != list(range(len(ids))):
        raise DataError(
            path, int(parsed.lines[0]), "id", f"genre ids must be 0..{len(ids) - 1}, got {ids.tolist()}"
        )
    names = parsed.numpy("name")
    return [str(names[k]) for k in np.argsort(ids)]


def _read_items_100k(path: Path, genre_path: Path, bad_rows: BadRows) -> Parsed:
    genre_names = _read_genre_names(_require(genre_path), bad_rows)
    fields = [
        Field("item_id", "int"),
        Field("title"),
        Field("release_date", required=False),
        Field("video_release_date", required=False),
        Field("imdb_url", required=False),
    ] + [Field(g, "int") for g in genre_names]
    parsed = read_delimited(_require(path), fields, sep="|", encoding=LATIN1, bad_rows=bad_rows)
    parsed = reject_non_positive(parsed, ["item_id"], bad_rows, ONE_BASED)
    parsed = reject_duplicates(parsed, "item_id", bad_rows, "movie id")
    for g in genre_names:
        flags = parsed.numpy(g)
        parsed = parsed.reject(
            (flags != 0) & (flags != 1),
            g,
            lambda i, f=flags: f"genre flag must be 0 or 1, got {f[i]}",
            bad_rows,
        )
    flags = np.stack([parsed.numpy(g) for g in genre_names], axis=1) == 1
    _, cols = np.nonzero(flags)  # row-major: each row's genres in u.genre order
    offsets = np.r_[0, np.cumsum(flags.sum(axis=1))].astype(np.int32)
    genres = pa.ListArray.from_arrays(
        pa.array(offsets), pa.array(np.asarray(genre_names, dtype=object)[cols], pa.string())
    )
    titles = parsed.table["title"].to_pylist()
    dates = parsed.table["release_date"].to_pylist()
    years = [title_year(t, d) for t, d in zip(titles, dates, strict=True)]
    table = _items_table(parsed.numpy("item_id"), titles, genres, years)
    return Parsed(parsed.path, table, parsed.lines)


def _read_items_listed(path: Path, fmt: str, bad_rows: BadRows) -> Parsed:
    """``movies.dat`` / ``movies.csv``: id, title, ``|``-joined genres."""
    if fmt == "dat":
        fields = [Field("item_id", "int"), Field("title"), Field("genres", required=False)]
        parsed = read_delimited(_require(path), fields, sep="::", encoding=LATIN1, bad_rows=bad_rows)
    else:
        fields = [Field("movieId", "int"), Field("title"), Field("genres", required=False)]
        parsed = read_delimited(_require(path), fields, sep=",", header=True, quoting=True, bad_rows=bad_rows)
        parsed = Parsed(
            parsed.path, parsed.table.rename_columns(["item_id", "title", "genres"]), parsed.lines
        )
    parsed = reject_non_positive(parsed, ["item_id"], bad_rows, ONE_BASED)
    parsed = reject_duplicates(parsed, "item_id", bad_rows, "movie id")
    titles = parsed.table["title"].to_pylist()
    genre_lists = [[] if g in ("", NO_GENRES) else g.split("|") for g in parsed.table["genres"].to_pylist()]
    years = [title_year(t) for t in titles]
    table = _items_table(parsed.numpy("item_id"), titles, pa.array(genre_lists, pa.list_(pa.string())), years)
    return Parsed(parsed.path, table, parsed.lines)


def _read_users(path: Path, fmt: str, bad_rows: BadRows) -> Parsed:
    if fmt == "tab":  # u.user
        order = ["user_id", "age", "gender", "occupation", "zip"]
        sep = "|"
    else:  # users.dat
        order = ["user_id", "gender", "age", "occupation", "zip"]
        sep = "::"
    kinds = {"user_id": "int", "age": "int"}
    fields = [Field(n, kinds.get(n, "str")) for n in order]  # type: ignore[arg-type]
    parsed = read_delimited(_require(path), fields, sep=sep, encoding=LATIN1, bad_rows=bad_rows)
    parsed = reject_non_positive(parsed, ["user_id"], bad_rows, ONE_BASED)
    parsed = reject_duplicates(parsed, "user_id", bad_rows, "user id")
    ages = parsed.numpy("age")
    parsed = parsed.reject(ages < 0, "age", lambda i: f"negative age {ages[i]}", bad_rows)
    table = parsed.table.select(["user_id", "age", "gender", "occupation", "zip"])
    return Parsed(parsed.path, table, parsed.lines)


def _read_ratings(path: Path, fmt: str, bad_rows: BadRows) -> Parsed:
    if fmt == "csv":
        fields = [Field(n, f.kind) for n, f in zip(_CSV_RATING_NAMES, _RATING_FIELDS, strict=True)]
        parsed = read_delimited(_require(path), fields, sep=",", header=True, bad_rows=bad_rows)
        parsed = Parsed(
            parsed.path, parsed.table.rename_columns(list(_CSV_RATING_NAMES.values())), parsed.lines
        )
    else:
        sep = "\t" if fmt == "tab" else "::"
        parsed = read_delimited(_require(path), _RATING_FIELDS, sep=sep, encoding=LATIN1, bad_rows=bad_rows)
    parsed = reject_non_positive(parsed, ["user_id", "item_id"], bad_rows, ONE_BASED)
    r = parsed.numpy("rating")
    parsed = parsed.reject(
        ~((r > 0) & (r <= 5)), "rating", lambda i: f"rating out of range (0, 5]: {r[i]}", bad_rows
    )
    ts = parsed.numpy("timestamp")
    return parsed.reject(ts < 0, "timestamp", lambda i: f"negative timestamp {ts[i]}", bad_rows)


def read_movielens(
    directory: Path, *, ratings_file: Path | None = None, bad_rows: BadRows | None = None
) -> RawTables:
    """Read a MovieLens directory into raw tables.

    ``interactions``: user_id, item_id (int64), rating (float32), timestamp (int64), in file order.
    ``users`` (ml-100k/ml-1m only): user_id, age, gender, occupation, zip. ``items``: item_id,
    title, genres (list<string>), year (int64, null when the title has none). ``ratings_file``
    overrides the ratings file found in ``directory`` (side files are still read from there).
    """
    directory = Path(directory)
    bad_rows = bad_rows if bad_rows is not None else BadRows()
    variant, ratings_path = detect_variant(directory, ratings_file)
    fmt = _ratings_format(ratings_path)
    users: Parsed | None = None
    if variant == "ml-100k":
        users = _read_users(directory / "u.user", "tab", bad_rows)
        items = _read_items_100k(directory / "u.item", directory / "u.genre", bad_rows)
    elif variant in ("ml-1m", "ml-10m"):
        if variant == "ml-1m":
            users = _read_users(directory / "users.dat", "dat", bad_rows)
        items = _read_items_listed(directory / "movies.dat", "dat", bad_rows)
    else:
        items = _read_items_listed(directory / "movies.csv", "csv", bad_rows)
    ratings = _read_ratings(ratings_path, fmt, bad_rows)
    if users is not None:
        ratings = reject_unknown(ratings, "user_id", users.numpy("user_id"), bad_rows, users.path.name)
    ratings = reject_unknown(ratings, "item_id", items.numpy("item_id"), bad_rows, items.path.name)
    if len(ratings) == 0:
        raise DataError(ratings_path, None, None, "no valid ratings")
    t = ratings.table
    interactions = pa.table(
        {
            "user_id": pc.cast(t["user_id"], pa.int64()),
            "item_id": pc.cast(t["item_id"], pa.int64()),
            "rating": pc.cast(t["rating"], pa.float32()),
            "timestamp": pc.cast(t["timestamp"], pa.int64()),
        }
    )
    files = [p for p in (ratings_path, users.path if users else None, items.path) if p is not None]
    return RawTables(
        name=variant,
        interactions=interactions,
        users=users.table if users is not None else None,
        items=items.table,
        source={
            "format": "movielens",
            "variant": variant,
            "path": str(directory),
            "files": [str(p) for p in files],
        },
        bad_rows=bad_rows,
    )


def movielens_features(raw: RawTables) -> RawTables:
    """Turn raw MovieLens side tables into feature columns (what :mod:`data.prepare` stores).

    users: ``age`` (numeric), ``age_bucket`` (ML-1M age groups), ``gender``, ``occupation``,
    ``zip_prefix`` (first 3 characters). items: ``title`` (kept as text, not a feature), ``genres``,
    ``year`` (numeric), ``year_bucket`` (decade). The raw zip is dropped: it is almost unique per
    user and would only memorise. Column order here is the CTR feature order.
    """
    users = raw.users
    if users is not None:
        ages = users["age"].to_numpy()
        bucket = np.asarray(AGE_GROUPS)[np.digitize(ages, AGE_GROUPS[1:])]
        users = pa.table(
            {
                "user_id": users["user_id"],
                "age": users["age"],
                "age_bucket": pa.array(bucket, pa.int64()),
                "gender": users["gender"],
                "occupation": users["occupation"],
                "zip_prefix": pc.utf8_slice_codeunits(users["zip"], 0, ZIP_PREFIX_LEN),
            }
        )
    items = raw.items
    if items is not None:
        year = items["year"]
        items = pa.table(
            {
                "item_id": items["item_id"],
                "title": items["title"],
                "genres": items["genres"],
                "year": year,
                "year_bucket": pc.multiply(pc.divide(year, 10), 10),  # integer division on int64
            }
        )
    notes = {
        "age": {"source": "users.age"},
        "age_bucket": {
            "source": "users.age",
            "transform": "bucketize",
            "boundaries": list(AGE_GROUPS[1:]),
            "values": list(AGE_GROUPS),
            "doc": "value = lower bound of the ML-1M age group containing the age",
        },
        "zip_prefix": {"source": "users.zip", "transform": "prefix", "length": ZIP_PREFIX_LEN},
        "genres": {"source": "items.genres", "doc": "u.item genre flags / movies genres split on '|'"},
        "year": {
            "source": "items.title",
            "transform": "regex",
            "pattern": _TITLE_YEAR.pattern,
            "missing": None,
        },
        "year_bucket": {"source": "items.year", "transform": "decade", "formula": "year // 10 * 10"},
    }
    return RawTables(
        name=raw.name,
        interactions=raw.interactions,
        users=users,
        items=items,
        source=raw.source,
        bad_rows=raw.bad_rows,
        categorical=frozenset({"age_bucket", "year_bucket"}),
        text=frozenset({"title"}),
        notes=notes,
    )
