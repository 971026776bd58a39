"""Result files of an evaluation folder: run.json (settings) and samples.jsonl (one line per finished row).

Rows are appended and flushed as each batch finishes, so an interrupted run keeps everything it finished, and
running the same command again continues where it stopped. A folder that holds a run with other settings is
refused rather than mixed.
"""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from vulnsteer.errors import VulnsteerError
from vulnsteer.records import Job, Result, SteeringId


@contextmanager
def exclusive(out_dir: Path) -> Iterator[None]:
    """Hold the output folder for one writer: a second run into it (an `eval`, a `sweep`, a `--resume`) is refused
    with the holder's PID, never run beside it. An advisory `flock` on `out_dir/.lock`, released by the kernel when
    the holder exits, however it exits (kill -9 included), so a stale lock never blocks a rerun."""
    out_dir.mkdir(parents=True, exist_ok=True)
    handle = open(out_dir / ".lock", "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise VulnsteerError(
                f"{out_dir} is in use by another vulnsteer run (pid {holder}); wait for it to end, "
                "or write to another --output-dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        handle.close()


def open_run(out_dir: Path, meta: dict) -> dict[str, Result]:
    """Create or reopen an output folder for a run with settings `meta`; return the rows already done by key."""
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path = out_dir / "run.json"
    if meta_path.exists():
        try:
            previous = json.loads(read_text(meta_path))
        except json.JSONDecodeError as exc:
            raise VulnsteerError(f"{meta_path} is not valid JSON ({exc.msg}); use another --output-dir") from exc
        changed = sorted(k for k in set(previous) | set(meta) if previous.get(k) != meta.get(k))
        if changed:
            raise VulnsteerError(
                f"{out_dir} holds a run with other settings ({', '.join(changed)}); use another --output-dir"
            )
    else:
        meta_path.write_text(json.dumps(meta, indent=2))
    return {result_key(r): r for r in read_samples(out_dir / "samples.jsonl")}


def row_key(sample_id: str, prompt_id: str, mode: str, steering: SteeringId | None) -> str:
    """What makes a row unique within a run folder."""
    return json.dumps([sample_id, prompt_id, mode, steering.to_dict() if steering else None], sort_keys=True)


def job_key(job: Job, mode: str) -> str:
    """The key of the row `job` makes in `mode`."""
    return row_key(job.sample.id, job.prompt_id, mode, job.steering.label if job.steering else None)


def result_key(result: Result) -> str:
    return row_key(result.sample_id, result.prompt_id, result.mode, result.steering)


def read_samples(path: Path) -> list[Result]:
    """Rows of a samples.jsonl; a line cut short by a crash (the last one) is dropped and redone."""
    if not path.exists():
        return []
    rows, lines = [], read_text(path).splitlines()
    for number, line in enumerate(lines, 1):
        try:
            rows.append(Result.from_dict(json.loads(line)))
        except (json.JSONDecodeError, TypeError, VulnsteerError) as exc:
            if number == len(lines) and not isinstance(exc, VulnsteerError):
                break
            raise VulnsteerError(
                f"{path}:{number} is not a vulnsteer result row ({exc}); fix or delete that line, "
                "or write to another --output-dir"
            ) from exc
    return rows


def read_text(path: Path) -> str:
    """A text file the run wrote (or a config), refused in one line when it is not text."""
    try:
        return path.read_text()
    except UnicodeDecodeError as exc:
        raise VulnsteerError(
            f"{path} is not a text file (byte {exc.start} is not UTF-8): it was damaged or "
            "replaced; restore it, or write to another --output-dir"
        ) from exc


class SampleWriter:
    """Appends rows to samples.jsonl, flushed and synced per batch."""

    def __init__(self, path: Path, done: list[Result]):
        # Rewrite the file from the parsed rows so a half-written last line never stays in it.
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in done))
        os.replace(tmp, path)
        self.file = open(path, "a")
        self.written = 0

    def write(self, result: Result) -> None:
        self.file.write(json.dumps(result.to_dict()) + "\n")
        self.file.flush()
        self.written += 1

    def close(self) -> None:
        os.fsync(self.file.fileno())
        self.file.close()


class SweepStore:
    """A sweep's SQLite database (WAL mode): run metadata, one test row per (config, sample) and one selection row
    per (outer fold, config, sample), each committed on its own, so a crash or `kill -9` loses at most the row
    being written and a resume never doubles a row."""

    SCHEMA = """
    CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS rows (
        config TEXT NOT NULL, sample_id TEXT NOT NULL, fold INTEGER NOT NULL, result TEXT NOT NULL,
        PRIMARY KEY (config, sample_id));
    CREATE TABLE IF NOT EXISTS selection_rows (
        outer INTEGER NOT NULL, config TEXT NOT NULL, sample_id TEXT NOT NULL, fold INTEGER NOT NULL,
        result TEXT NOT NULL, PRIMARY KEY (outer, config, sample_id));
    """

    def __init__(self, path: Path):
        import sqlite3

        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(str(path))
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(self.SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise VulnsteerError(f"{path} is not a vulnsteer sweep database ({exc})") from exc
        self.path = path
        self.written = 0

    def meta(self) -> dict:
        return {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM meta")}

    def check(self, meta: dict, must_match: tuple[str, ...]) -> None:
        """Refuse a resumed run whose `must_match` values differ from the stored ones (writes nothing)."""
        previous = self.meta()
        changed = [k for k in must_match if previous and previous.get(k) != meta.get(k)]
        if changed:
            raise VulnsteerError(
                f"{self.path.parent} holds a sweep with another {', '.join(changed)}; "
                "resume it with the same settings or use another --output-dir"
            )

    def claim(self, meta: dict, must_match: tuple[str, ...]) -> None:
        """Write the run's metadata, or check that a resumed run has the same values for `must_match` keys."""
        self.check(meta, must_match)
        if self.meta():
            return
        with self.db:
            self.db.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])

    def record(self, key: str, value) -> None:
        """Store (or replace) one metadata entry that is not part of the run's identity."""
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def done(self) -> set[tuple[str, str]]:
        return set(self.db.execute("SELECT config, sample_id FROM rows"))

    def add(self, config: str, fold: int, result: Result) -> None:
        with self.db:  # one transaction per row: atomic, durable in WAL mode
            self.db.execute(
                "INSERT OR IGNORE INTO rows VALUES (?, ?, ?, ?)",
                (config, result.sample_id, fold, json.dumps(result.to_dict())),
            )
        self._written()

    CHECKPOINT_ROWS = 500

    def _written(self) -> None:
        """Every CHECKPOINT_ROWS rows, fold the write-ahead log into the database file, so that the rows of a run
        killed with -9 are in sweep.sqlite itself, not only in sweep.sqlite-wal beside it."""
        self.written += 1
        if self.written % self.CHECKPOINT_ROWS == 0:
            self.db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def add_selection(self, outer: int, config: str, fold: int, result: Result) -> None:
        """A row that nested selection for `outer` reads: steered by vectors fitted without `outer` and `fold`."""
        with self.db:
            self.db.execute(
                "INSERT OR IGNORE INTO selection_rows VALUES (?, ?, ?, ?, ?)",
                (outer, config, result.sample_id, fold, json.dumps(result.to_dict())),
            )
        self._written()

    def selection_done(self) -> set[tuple[int, str, str]]:
        return set(self.db.execute("SELECT outer, config, sample_id FROM selection_rows"))

    def rows(self) -> list[tuple[str, int, Result]]:
        """(config, fold, result) for every row, in a stable order."""
        query = "SELECT config, fold, result FROM rows ORDER BY config, sample_id"
        return [(c, f, self._result(r, c)) for c, f, r in self.db.execute(query)]

    def selection_rows(self) -> list[tuple[int, str, Result]]:
        """(outer fold, config, result) for every selection row, in a stable order."""
        query = "SELECT outer, config, result FROM selection_rows ORDER BY outer, config, sample_id"
        return [(o, c, self._result(r, c)) for o, c, r in self.db.execute(query)]

    def folds(self) -> dict[str, set[int]]:
        """The fold each stored test row gave its item (one each, in a store that is not mixed)."""
        folds: dict[str, set[int]] = {}
        for sample_id, fold in self.db.execute("SELECT DISTINCT sample_id, fold FROM rows"):
            folds.setdefault(sample_id, set()).add(fold)
        return folds

    def _result(self, stored: str, config: str) -> Result:
        try:
            return Result.from_dict(json.loads(stored))
        except (json.JSONDecodeError, TypeError, VulnsteerError) as exc:
            raise VulnsteerError(
                f"{self.path} holds a row of {config} that is not a result ({exc}); the store was "
                "edited or damaged: delete that row with sqlite3, or start another --output-dir"
            ) from exc

    def close(self) -> None:
        import sqlite3

        try:
            self.db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.DatabaseError:
            pass  # a damaged store: the error that found it is the one to report
        self.db.close()


@dataclass
class StoredSweep:
    meta: dict
    rows: list[tuple[str, int, Result]]  # (config, fold, result)
    selection: list[tuple[int, str, Result]]  # (outer fold, config, result)


def read_sweep(out_dir: Path, with_rows: bool = True) -> StoredSweep:
    """A finished or interrupted sweep's metadata (and rows), read-only."""
    path = out_dir / "sweep.sqlite"
    if not path.exists():
        raise VulnsteerError(f"no sweep in {out_dir} ({path.name} does not exist)")
    store = SweepStore(path)
    try:
        if not with_rows:
            return StoredSweep(store.meta(), [], [])
        return StoredSweep(store.meta(), store.rows(), store.selection_rows())
    finally:
        store.close()
