"""`vulnsteer eval --model openai:NAME` through a stand-in endpoint client (no server): rows reach samples.jsonl as
their requests finish, so a run cut short keeps every finished row and a rerun resumes from them."""

from __future__ import annotations

import itertools
import json
import threading
import time

from conftest import run_cli

from vulnsteer.engine import api


def _stand_in(monkeypatch, answer) -> None:
    """Replace the OpenAI client: `answer(call_number)` gives each greedy reply."""
    calls = itertools.count()
    lock = threading.Lock()

    def reply(self, messages, max_tokens):
        with lock:
            call = next(calls)
        return answer(call), 10, 2

    monkeypatch.setattr(api._Client, "__init__", lambda self, model: setattr(self, "api", model))
    monkeypatch.setattr(api._Client, "reply", reply)
    monkeypatch.setattr(api._Client, "score", lambda self, messages: (1.0, 10))


def test_an_interrupted_api_run_keeps_the_rows_that_finished(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    rows = out / "samples.jsonl"

    def answer(call: int) -> str:
        if call != 1:
            return "No."
        # The second request fails (a lost connection ends the run), but only once the first one's row is on disk:
        # with rows held back until every request ends, it never is, and the run finishes without a failure.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if rows.exists() and rows.read_text().strip():
                raise ConnectionError("connection lost")
            time.sleep(0.01)
        return "Yes."

    _stand_in(monkeypatch, answer)
    args = [
        "eval",
        "--model",
        "openai:stand-in",
        "--base-url",
        "http://127.0.0.1:1/v1",
        "--dataset",
        "demo",
        "--limit",
        "4",
        "--mode",
        "generate",
        "--max-new-tokens",
        "8",
        "--concurrency",
        "2",
        "-o",
        str(out),
    ]
    code, _, err = run_cli(args, capsys)
    assert code == 1 and "ConnectionError: connection lost" in err and "Traceback" not in err, err
    kept = [json.loads(line) for line in rows.read_text().splitlines()]
    assert 1 <= len(kept) < 4 and all(r["response"] == "No." for r in kept)

    _stand_in(monkeypatch, lambda call: "No.")
    code, stdout, err = run_cli(args, capsys)
    assert code == 0 and f"resuming: {len(kept)} of 4 rows" in stdout, err
    assert len(rows.read_text().splitlines()) == 4
