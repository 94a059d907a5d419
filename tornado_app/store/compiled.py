"""Statements compiled once, run on a driver's own connection.

The write paths (the SQLite batcher, the asyncpg executor) skip SQLAlchemy's
per-statement execution machinery, which costs more CPU than the database
does for the exchange's short statements: each Core statement is compiled
once for the dialect, and its values go through the same bind processors
SQLAlchemy uses and its results through the same result processors, as
named tuples. So a unit of work reads the same values, the same way, on
every executor.
"""

from __future__ import annotations

from collections import namedtuple
from operator import itemgetter


class Compiled:
    """A Core statement compiled for ``dialect`` (its paramstyle must be positional).

    ``native_results``: the driver already gives Python's types (asyncpg, with
    the JSON codecs SQLAlchemy's asyncpg dialect also sets up), so the rows
    need no processing."""

    def __init__(self, statement, dialect, native_results: bool = False):
        compiled = statement.compile(dialect=dialect)
        self.sql = str(compiled)
        self.names = list(compiled.positiontup or ())
        self.defaults = {name: bind.effective_value for name, bind in compiled.binds.items()}
        self.processors = [
            compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect)
            for name in self.names
        ]
        # The values in order by one C call (the caller gave them all, the
        # common case), then the few that need processing.
        self._pick = _picker(self.names)
        self._process = [(index, process) for index, process in enumerate(self.processors)
                         if process is not None]
        columns = compiled._result_columns
        results = [] if native_results else [
            column.type.dialect_impl(dialect).result_processor(dialect, None) for column in columns]
        self.results = results if any(results) else None
        self.returns_rows = bool(columns)
        # Rows with the columns' names, as the engine's Rows have them.
        self.row = namedtuple("Row", [column.keyname for column in columns], rename=True)._make

    def parameters(self, values: dict | None) -> tuple | list:
        values = values or {}
        try:
            picked = self._pick(values)
        except KeyError:  # a bind parameter's own value stands in
            defaults = self.defaults
            picked = [values[name] if name in values else defaults[name] for name in self.names]
        if not self._process:
            return picked
        picked = list(picked)
        for index, process in self._process:
            picked[index] = process(picked[index])
        return picked

    def rows(self, raw_rows) -> list:
        """The driver's rows as named tuples of processed values."""
        if self.results is not None:
            raw_rows = [[value if process is None else process(value)
                         for value, process in zip(row, self.results)] for row in raw_rows]
        return list(map(self.row, raw_rows))


def _picker(names: list[str]):
    """A function of a dict: its values of ``names``, in order, as a tuple."""
    if len(names) > 1:
        return itemgetter(*names)
    if names:
        one = itemgetter(names[0])
        return lambda values: (one(values),)
    return lambda values: ()


class StatementCache:
    """Compiled statements by identity. The Store's are module constants, so
    this stays small; statements built per call only ever cost a recompile
    (the cache is emptied rather than grow without bound)."""

    size = 256

    def __init__(self, dialect, native_results: bool = False):
        self.dialect = dialect
        self.native_results = native_results
        self._compiled: dict = {}

    def get(self, statement) -> Compiled:
        compiled = self._compiled.get(statement)
        if compiled is None:
            if len(self._compiled) >= self.size:
                self._compiled.clear()
            compiled = self._compiled[statement] = Compiled(
                statement, self.dialect, self.native_results)
        return compiled
