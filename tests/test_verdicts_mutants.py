"""Tests written to kill surviving mutants of the verdict parser (docs/protocol.md, "Mutation testing"): answer
shapes that tests/test_verdicts.py did not hold, each with the verdict a reader takes from it."""

from __future__ import annotations

import pytest

from vulnsteer.verdicts import cwe_keywords, is_english, parse_verdict


@pytest.mark.parametrize(
    "text, cwe, expected",
    [
        # Markup around the verdict: code fences before it, backticks, typographic apostrophes, headings.
        ("```c\nstrcpy(buf, s);\n```\nYes, there is a problem here.", "CWE-787", "vulnerable"),
        ("`Yes`, the strcpy call overflows buf.", "CWE-787", "vulnerable"),
        ("Answer: `No`", "CWE-787", "not_vulnerable"),
        ("The code doesn\u2019t contain a buffer overflow.", "CWE-787", "not_vulnerable"),
        ("The code isn\u2019t vulnerable.", "CWE-787", "not_vulnerable"),
        ("# No\nThe buffer is large enough.", "CWE-787", "not_vulnerable"),
        ("## Yes\nThe strcpy call writes past buf.", "CWE-787", "vulnerable"),
        ("_Answer_: No", "CWE-787", "not_vulnerable"),
        # Contractions: "cannot/can't determine" is a hedge, "won't be vulnerable" a negation.
        ("I cannot determine whether the code is vulnerable.", "CWE-787", "unknown"),
        ("I can't tell whether the code is vulnerable.", "CWE-787", "unknown"),
        ("The input won't be vulnerable to injection.", "CWE-89", "not_vulnerable"),
        ("This code won't cause a buffer overflow.", "CWE-787", "not_vulnerable"),
        # Two affirmations of different kinds in one clause (an unsafe-phrase and a weakness) still affirm.
        ("The code is unsafe and contains a buffer overflow.", "CWE-787", "vulnerable"),
        # A bare verdict line after the reasoning; two that disagree; a final answer overrides earlier ones.
        ("The loop copies len bytes into buf, which holds 16.\nYes", "CWE-787", "vulnerable"),
        ("Let me look at the code.\nNo", "CWE-787", "not_vulnerable"),
        ("Yes\nNo", "CWE-787", "unknown"),
        ("Yes\n\nFinal answer: No", "CWE-787", "not_vulnerable"),
        ("Answer: Yes\nFinal answer: No", "CWE-787", "not_vulnerable"),
        ("CWE-416: No\nCWE-416 in the cleanup path: Yes", "CWE-416", "unknown"),
        # An answer line ("Verdict:", "Answer:") is a conclusion and overrides the reasoning before it.
        ("The strcpy call is vulnerable.\nVerdict: the code is safe.", "CWE-787", "not_vulnerable"),
        ("The strcpy call is vulnerable.\nFinal answer: the code is not vulnerable.", "CWE-787", "not_vulnerable"),
        # A conclusion marker covers its own clause only; a hedged conclusion leaves the answer open.
        ("Therefore, the code is not safe, although the copy itself is not vulnerable.", "CWE-787", "vulnerable"),
        ("The strcpy call is vulnerable to overflow. Therefore, the code might be vulnerable.", "CWE-787", "unknown"),
        ("The strcpy call is vulnerable to overflow. Therefore, it depends on the caller.", "CWE-787", "unknown"),
        # An echoed question is skipped, the answer after it read.
        ("Does this code contain a buffer overflow? The code is not vulnerable.", "CWE-787", "not_vulnerable"),
        # Other weaknesses: a verdict on them says nothing about the asked one, a generic negative still counts.
        (
            "Yes, there is a use after free.\nTherefore, the code is not vulnerable to SQL injection.",
            "CWE-416",
            "vulnerable",
        ),
        ("The code has a SQL injection. However, the code is not vulnerable otherwise.", "CWE-416", "not_vulnerable"),
        (
            "The code is vulnerable to SQL injection. The code is not vulnerable to anything else.",
            "CWE-416",
            "not_vulnerable",
        ),
        # Without a CWE, an opening verdict about the code stands against a later remark on something else.
        ("The code has a buffer overflow in the loop. The input itself is safe.", None, "vulnerable"),
    ],
)
def test_answer_shapes_read_as_a_reader_would(text, cwe, expected):
    assert parse_verdict(text, cwe) == expected


@pytest.mark.parametrize("cwe", ["Use After Free", "Out-of-bounds Write"])
def test_a_cwe_given_by_name_without_a_short_name_is_understood(cwe):
    assert parse_verdict("Yes, the pointer is used after it is freed.", cwe) == "vulnerable"


def test_the_short_name_of_a_cwe_title_decides_over_other_words_in_it():
    """A title naming one weakness's word ("pathname") outside its short name ('SQL Injection') is that short name's
    CWE."""
    assert cwe_keywords("Pathname Handling in Database Queries ('SQL Injection')") == cwe_keywords("CWE-89")
    assert cwe_keywords("Pathname Built into a Web Page ('Cross-site Scripting')") == cwe_keywords("CWE-79")


def test_a_cwe_outside_the_catalogue_is_keyed_by_its_title_without_the_short_name():
    assert cwe_keywords("Frobnication of Widgets ('Widget Frob')") == ("frobnication of widgets",)
    assert (
        parse_verdict("The code is vulnerable to frobnication of widgets.", "Frobnication of Widgets (X)")
        == "vulnerable"
    )


@pytest.mark.parametrize(
    "text, english",
    [
        # Code is in no language: an answer cut off inside a fenced block is judged by its prose alone, whatever
        # English the code's comments hold.
        (
            "Sí, el código es vulnerable porque no comprueba la longitud.\n```c\n/* copy the string to the buffer and "
            "return it */\nstrcpy(buf, input);",
            False,
        ),
        # Fewer than five distinct words of prose count as English, a code span or a code line beside them adding none.
        ("Sí, el código `strcpy(buf, s)` vulnerable", True),
        ("Sí, el código vulnerable\nstrcpy(buf, s);", True),
        # Half the words non-ASCII, with English function words: English; most of them non-ASCII: not, whatever
        # English word is among them.
        ("The code is: да, это код.", True),
        ("这段代码 是 易受攻击的 因为 it 没有 检查 长度", False),
    ],
)
def test_the_language_of_an_answer_is_its_proses(text, english):
    assert is_english(text) is english
