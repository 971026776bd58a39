"""The vocabulary users type (modes, positions, caches, read positions, normalisations, vector choices) is parsed in
one function per word, and a sweep's config ids are written, never parsed back; what is stored keeps its form."""

from __future__ import annotations

import ast
import json
import re
from dataclasses import asdict
from pathlib import Path

import pytest

import vulnsteer
from vulnsteer.errors import VulnsteerError
from vulnsteer.experiments.sweep import SweepConfig, config_sha256, grid, points_by_id
from vulnsteer.extract.activations import Read
from vulnsteer.extract.vectors import Normalisation
from vulnsteer.records import Cache, Decoding, Mode, Positions, Steering, VectorChoice

PACKAGE = Path(vulnsteer.__file__).parent
BENCH = PACKAGE.parents[1] / "bench"
WORDS = [Mode, Positions, Cache, Read, Normalisation]
VOCABULARIES = [{str(w) for w in word} for word in WORDS] + [set(VectorChoice.WORDS)]


def sources() -> dict[str, str]:
    return {
        str(path.relative_to(PACKAGE.parents[1])): path.read_text()
        for path in [*sorted(PACKAGE.rglob("*.py")), *sorted(BENCH.glob("*.py"))]
    }


def word_collections(tree: ast.AST) -> list[tuple[int, set[str]]]:
    """Tuples, lists and sets written out of string constants, the form a second copy of a vocabulary takes; not
    those of `VectorChoice`, which defines its words."""
    defining = {
        id(node)
        for cls in ast.walk(tree)
        if isinstance(cls, ast.ClassDef) and cls.name == "VectorChoice"
        for node in ast.walk(cls)
    }
    return [
        (node.lineno, {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)})
        for node in ast.walk(tree)
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and id(node) not in defining
    ]


def test_no_vocabulary_is_written_out_a_second_time():
    """A tuple like ("generate", "score") or a test like `in ("generated", "all")` is a second place that knows a
    word's values: each is known only to its `Word` (or `VectorChoice.WORDS`) and tested through its members."""
    copies = [
        f"{name}:{line} {sorted(values)}"
        for name, text in sources().items()
        for line, values in word_collections(ast.parse(text))
        if any(len(values & vocabulary) >= 2 for vocabulary in VOCABULARIES)
    ]
    assert copies == []


def test_words_are_made_only_by_their_parse_function():
    """`Mode("x")` raises a ValueError (a traceback); `Mode.parse` says what is allowed in one line. No code calls a
    word's constructor, and only `VectorChoice.parse` reads a CWE id or a random draw out of a vector word."""
    made = re.compile(r"(?<![\w.])(?:" + "|".join(w.__name__ for w in WORDS) + r")\(")
    calls = [
        f"{name}:{text[: m.start()].count(chr(10)) + 1}"
        for name, text in sources().items()
        for m in made.finditer(text)
        if not text[: m.start()].endswith("class ")
    ]
    assert calls == []
    vector_words = [name for name, text in sources().items() if re.search(r"""startswith\(["'](CWE-|random)""", text)]
    assert vector_words == ["src/vulnsteer/records.py"]


def test_config_ids_are_never_parsed_back():
    """A sweep's points are known from its config (`points_by_id`): no code splits a config id into its fields."""
    parsed = [
        name
        for name, text in sources().items()
        if re.search(r"""\.r?(split|partition)\(\s*["']\|["']""", text) or "GridPoint.parse" in text
    ]
    assert parsed == []


def test_each_word_is_refused_in_one_line_naming_what_is_allowed():
    with pytest.raises(VulnsteerError, match=r"^unknown mode 'guess'; use one of generate, score$"):
        Decoding(mode="guess")  # type: ignore[arg-type]
    with pytest.raises(
        VulnsteerError,
        match=r"^unknown positions 'end'; use one of prompt-last, prompt, generated, "
        r"all$",
    ):
        Steering({}, 1.0, "end")  # type: ignore[arg-type]
    with pytest.raises(
        VulnsteerError,
        match=r"^unknown value of config key cache 'fast'; use one of dynamic, "
        r"static$",
    ):
        SweepConfig(cache="fast")  # type: ignore[arg-type]
    with pytest.raises(
        VulnsteerError,
        match=r"^unknown value of config key vectors 'mine'; use one of own, pooled, "
        r"random or a CWE id like CWE-787$",
    ):
        SweepConfig(vectors=["own", "mine"])
    with pytest.raises(VulnsteerError, match=r"^unknown --cwe-vector 'random'; use one of own, pooled or a CWE id"):
        VectorChoice.parse("random", "--cwe-vector", random=False)
    assert VectorChoice.parse("CWE-787") == VectorChoice("cwe", "CWE-787")
    assert Decoding(mode="score").mode is Mode.SCORE  # type: ignore[arg-type]


def test_typed_words_store_as_the_words_they_were():
    """Stored forms do not change: a config's JSON (and its hash, which a resumed sweep checks) holds the plain
    words, and grid point ids are the ids earlier stores hold."""
    raw = {
        "mode": "score",
        "cache": "dynamic",
        "read": "prompt-last",
        "normalisation": "unit",
        "positions": ["prompt-last", "all"],
        "vectors": ["own", "pooled", "random", "CWE-79"],
    }
    config = SweepConfig(layers=["1"], strengths=[-1, 2], random_draws=2, **raw)
    stored = json.loads(json.dumps(asdict(config)))
    assert {k: stored[k] for k in raw} == raw
    assert config_sha256(config) == config_sha256(SweepConfig.from_dict(stored))
    ids = [p.id for p in grid(config, ["CWE-787"]) if p.positions == "all"]
    assert ids[:3] == ["mean-diff|1|own|all|-1", "mean-diff|1|own|all|+2", "mean-diff|1|pooled|all|-1"]
    assert "mean-diff|1|random:1|all|+2" in ids and "mean-diff|1|CWE-79|all|-1" in ids
    assert "mean-diff|1|CWE-787|prompt-last|+2" in points_by_id(config, ["CWE-787"])  # the transfer row
    assert "mean-diff|1|own|all|+0" in ids  # the path control


def test_a_method_name_is_checked_in_one_place():
    """`check_method` is the one check of a method's name (extract --method, a sweep's methods, a direction)."""
    checks = {path for path, text in sources().items() if re.search(r"\bnot in (methods\(\)|DIRECTIONS\b)", text)}
    assert checks == {"src/vulnsteer/extract/vectors.py"}
    with pytest.raises(VulnsteerError, match=r"^unknown value of config key methods 'magic'; use one of mean-diff"):
        SweepConfig(methods=["magic"])
