"""The CWE catalogue: the eight SecLLMHolmes weaknesses, everything each module needs to know about them, in one
table (names for prompts, phrases for the verdict parser, the upstream CWEs that datasets file under them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import MappingProxyType

from vulnsteer.errors import VulnsteerError


@dataclass(frozen=True)
class Cwe:
    id: str  # "CWE-787"
    name: str  # the official MITRE name (CWE 4.14), e.g. "Out-of-bounds Write"
    short_name: str  # the name SecLLMHolmes questions use (upstream src/constants.py CWES)
    few_shot_ext: str  # extension of its SecLLMHolmes few-shot example files (upstream src/constants.py LANG)
    keywords: tuple[str, ...]  # phrases that name it in an answer: answers name CWEs loosely, never by title
    title_hints: tuple[str, ...]  # fragments of MITRE titles that identify it, for callers passing a full name
    covers: tuple[str, ...] = ()  # upstream CWEs that stand for it (the shared JSONL files' `target_cwe`)


CATALOGUE: tuple[Cwe, ...] = (
    Cwe(
        "CWE-22",
        "Improper Limitation of a Pathname to a Restricted Directory ('Path Traversal')",
        "path traversal",
        "c",
        ("path traversal", "directory traversal", "path-traversal", "cwe-22", "restricted directory"),
        ("pathname", "path traversal"),
        ("CWE-23", "CWE-36"),
    ),
    Cwe(
        "CWE-77",
        "Improper Neutralization of Special Elements used in a Command ('Command Injection')",
        "OS command injection",
        "c",
        ("command injection", "shell injection", "os command", "cwe-77", "cwe-78"),
        ("command injection", "os command"),
        ("CWE-78",),
    ),
    Cwe(
        "CWE-79",
        "Improper Neutralization of Input During Web Page Generation ('Cross-site Scripting')",
        "cross-site scripting",
        "py",
        ("cross-site scripting", "cross site scripting", "xss", "script injection", "html injection", "cwe-79"),
        ("web page generation", "cross-site scripting"),
        ("CWE-80", "CWE-81", "CWE-83"),
    ),
    Cwe(
        "CWE-89",
        "Improper Neutralization of Special Elements used in an SQL Command ('SQL Injection')",
        "SQL injection",
        "py",
        ("sql injection", "sqli", "sql command", "cwe-89"),
        ("sql",),
    ),
    Cwe(
        "CWE-190",
        "Integer Overflow or Wraparound",
        "integer overflow",
        "c",
        (
            "integer overflow",
            "integer wraparound",
            "wraparound",
            "wrap-around",
            "wraps around",
            "wrap around",
            "integer underflow",
            "cwe-190",
        ),
        ("integer overflow", "wraparound"),
    ),
    Cwe(
        "CWE-416",
        "Use After Free",
        "use after free",
        "c",
        ("use after free", "use-after-free", "uaf", "dangling pointer", "cwe-416"),
        ("use after free", "use-after-free"),
    ),
    Cwe(
        "CWE-476",
        "NULL Pointer Dereference",
        "NULL pointer dereference",
        "c",
        ("null pointer", "null-pointer", "null dereference", "nullptr dereference", "cwe-476"),
        ("null pointer",),
    ),
    Cwe(
        "CWE-787",
        "Out-of-bounds Write",
        "out-of-bounds write",
        "c",
        (
            "out-of-bounds write",
            "out of bounds write",
            "buffer overflow",
            "buffer overrun",
            "heap overflow",
            "stack overflow",
            "out-of-bounds",
            "out of bounds",
            "oob write",
            "cwe-787",
        ),
        ("out-of-bounds write", "buffer overflow"),
        ("CWE-121", "CWE-122", "CWE-125"),
    ),
)

BY_ID: MappingProxyType[str, Cwe] = MappingProxyType({cwe.id: cwe for cwe in CATALOGUE})
CWES: tuple[str, ...] = tuple(BY_ID)
# Upstream CWE -> the catalogue CWE it stands for.
TARGET_CWE: MappingProxyType[str, str] = MappingProxyType({up: cwe.id for cwe in CATALOGUE for up in cwe.covers})

_CWE_RE = re.compile(r"(?:cwe[-_ ]?)?0*(\d+)", re.IGNORECASE)


def normalise_cwe(cwe: str) -> str:
    """Spell a CWE one way (`cwe-79`, `79`, `CWE-079` -> `CWE-79`) so datasets and filters agree."""
    match = _CWE_RE.fullmatch(cwe.strip())
    if match is None:
        raise VulnsteerError(f"not a CWE id: {cwe!r} (expected e.g. CWE-79)")
    return f"CWE-{int(match.group(1))}"
