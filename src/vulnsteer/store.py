"""Result files of an evaluation folder: run.json (settings) and samples.jsonl (one line per finished row).

Rows are appended and flushed as each batch finishes, so an interrupted run keeps everything it finished, and
running the same command again continues where it stopped. A folder that holds a run with other settings is
refused rather than mixed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from vulnsteer.errors import VulnsteerError
from vulnsteer.evaluation import Result


def open_run(out_dir: Path, meta: dict) -> dict[str, Result]:
    """Create or reopen an output folder for a run with settings `meta`; return the rows already done by key."""
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path = out_dir / "run.json"
    if meta_path.exists():
        try:
            previous = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise VulnsteerError(f"{meta_path} is not valid JSON ({exc.msg}); use another --output-dir") from exc
        changed = sorted(k for k in set(previous) | set(meta) if previous.get(k) != meta.get(k))
        if changed:
            raise VulnsteerError(f"{out_dir} holds a run with other settings ({', '.join(changed)}); "
                                 "use another --output-dir")
    else:
        meta_path.write_text(json.dumps(meta, indent=2))
    return {result_key(r): r for r in read_samples(out_dir / "samples.jsonl")}


def row_key(sample_id: str, prompt_id: str, mode: str, steering: dict | None) -> str:
    """What makes a row unique within a run folder."""
    return json.dumps([sample_id, prompt_id, mode, steering], sort_keys=True)


def result_key(result: Result) -> str:
    return row_key(result.sample_id, result.prompt_id, result.mode, result.steering)


def read_samples(path: Path) -> list[Result]:
    """Rows of a samples.jsonl; a line cut short by a crash (the last one) is dropped and redone."""
    if not path.exists():
        return []
    rows, lines = [], path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        try:
            rows.append(Result(**json.loads(line)))
        except (json.JSONDecodeError, TypeError) as exc:
            if number == len(lines):
                break
            raise VulnsteerError(f"{path}:{number} is not a vulnsteer result row ({exc})") from exc
    return rows


class SampleWriter:
    """Appends rows to samples.jsonl, flushed and synced per batch."""

    def __init__(self, path: Path, done: list[Result]):
        # Rewrite the file from the parsed rows so a half-written last line never stays in it.
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in done))
        os.replace(tmp, path)
        self.file = open(path, "a")

    def write(self, result: Result) -> None:
        self.file.write(json.dumps(result.to_dict()) + "\n")
        self.file.flush()

    def close(self) -> None:
        os.fsync(self.file.fileno())
        self.file.close()
