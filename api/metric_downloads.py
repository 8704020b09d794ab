"""Downloads of every metric point of a run at full resolution: CSV streamed a page at a time, and Parquet.

Both read the points through the history's keyset pages (``selectors.curves.run_metric_history``), so a
5-million-point run costs one index range scan per page and never sits in memory whole. Parquet is written
with pyarrow (a dependency of ``datasets``), imported only when a Parquet file is asked for.
"""

from __future__ import annotations

import csv
import io
import tempfile
from collections.abc import Iterator
from typing import IO

from experiments.selectors import curves

COLUMNS = ("step", "name", "value", "wall_time")
PAGE_POINTS = 20_000
PARQUET_ROW_GROUP = 100_000
PARQUET_CONTENT_TYPE = "application/vnd.apache.parquet"
_SPOOL_BYTES = 16 * 2**20  # a larger file goes to a temporary file on disk


def metric_pages(*, run_id: int) -> Iterator[list[curves.HistoryPoint]]:
    """The run's points in (name, step) order, ``PAGE_POINTS`` a page (the last page may be empty)."""
    after = None
    while True:
        page = curves.run_metric_history(run_id=run_id, after=after, limit=PAGE_POINTS)
        yield page
        if len(page) < PAGE_POINTS:
            return
        after = page[-1][0], page[-1][1]


def csv_chunks(*, run_id: int) -> Iterator[str]:
    """The CSV text, a page a chunk: ``COLUMNS``, wall time in ISO 8601 (UTC), nan/inf as Python writes
    them."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for page in metric_pages(run_id=run_id):
        writer.writerows((step, name, value, wall_time.isoformat()) for name, step, value, wall_time in page)
        if buffer.tell():  # the header comes with the first page; the last page may be empty
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()


def parquet_file(*, run_id: int) -> IO[bytes]:
    """A Parquet file of the run's points (``COLUMNS``, wall time a UTC timestamp), rewound to its start."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("step", pa.int64()),
            ("name", pa.string()),
            ("value", pa.float64()),
            ("wall_time", pa.timestamp("us", tz="UTC")),
        ]
    )
    out = tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES)
    with pq.ParquetWriter(out, schema) as writer:
        group: list[curves.HistoryPoint] = []
        for page in metric_pages(run_id=run_id):
            group += page
            if len(group) >= PARQUET_ROW_GROUP or len(page) < PAGE_POINTS:
                names, steps, values, times = zip(*group, strict=True) if group else ((), (), (), ())
                columns = {"step": steps, "name": names, "value": values, "wall_time": times}
                writer.write_table(pa.table(columns, schema=schema))
                group = []
    out.seek(0)
    return out
