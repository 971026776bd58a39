"""Tests for the answer-to-verdict parser, measured on a file of realistic model answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vulnsteer.verdicts import VERDICTS, cwe_keywords, parse_verdict

ANSWERS = Path(__file__).with_name("answers.jsonl")

# Genuinely ambiguous answers where a human reading differs from what a rule can see.
XFAIL: dict[int, str] = {}


def load_answers(path: Path | str = ANSWERS) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def naive_verdict(text: str, cwe_name: str | None = None) -> str:
    """The original experiment's rule: any mention of 'vulnerab' means yes."""
    return "vulnerable" if "vulnerab" in text.lower() else "not_vulnerable"


def parser_accuracy(path: Path | str = ANSWERS, parser=parse_verdict) -> float:
    """Share of answers in `path` whose parsed verdict equals the expected one."""
    rows = load_answers(path)
    return sum(parser(r["text"], r["cwe"]) == r["expected"] for r in rows) / len(rows)


ROWS = load_answers()


def test_answer_file_is_well_formed():
    assert len(ROWS) >= 70
    for r in ROWS:
        assert set(r) == {"text", "cwe", "expected", "kind"}
        assert r["expected"] in VERDICTS
    assert len(XFAIL) <= 0.05 * len(ROWS)


@pytest.mark.parametrize(
    "row",
    [
        pytest.param(r, id=f"{i}-{r['kind']}", marks=[pytest.mark.xfail(strict=True, reason=XFAIL[i])] if i in XFAIL else [])
        for i, r in enumerate(ROWS)
    ],
)
def test_parse_answer(row):
    assert parse_verdict(row["text"], row["cwe"]) == row["expected"]


def test_accuracy_beats_naive_keyword_matching():
    ours = parser_accuracy()
    naive = parser_accuracy(parser=naive_verdict)
    print(f"\nverdict parser accuracy: ours={ours:.3f} naive={naive:.3f} (n={len(ROWS)})")
    assert ours >= 0.93
    assert naive <= ours - 0.25


@pytest.mark.parametrize("name", ["CWE-89", "cwe89", "Improper Neutralization of Special Elements used in an SQL Command ('SQL Injection')"])
def test_cwe_name_forms(name):
    assert "sql injection" in cwe_keywords(name)
    text = "No buffer overflow here. However, the code is vulnerable to SQL injection."
    assert parse_verdict(text, name) == "vulnerable"


def test_command_injection_name_is_not_sql():
    name = "Improper Neutralization of Special Elements used in a Command ('Command Injection')"
    assert "command injection" in cwe_keywords(name)


def test_without_cwe_name_and_empty():
    assert parse_verdict("The code is not vulnerable.") == "not_vulnerable"
    assert parse_verdict("The code is vulnerable.") == "vulnerable"
    assert parse_verdict("") == "unknown"
    assert parse_verdict(None) == "unknown"  # type: ignore[arg-type]
