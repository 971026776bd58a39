from __future__ import annotations

import json
from pathlib import Path

import pytest

from vulnsteer.data import Sample
from vulnsteer.errors import VulnsteerError
from vulnsteer.prompts import (
    BUILTIN_CWES,
    PROMPT_IDS,
    Prompt,
    PromptResources,
    build_prompt,
    needs_resources,
    required_resources,
)

DATA = Path(__file__).parents[2] / "shared" / "datasets" / "secllmholmes"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/datasets/secllmholmes not present")

FEW_SHOT_IDS = ("S5", "S6", "R4", "R5", "R6", "D3", "D4", "D5")
DEF_IDS = ("D1", "D2", "D3", "D4", "D5")


def _sample(cwe: str, stem: str, ext: str, lang: str) -> Sample:
    code = (DATA / "hand-crafted" / "dataset" / cwe / f"{stem}.{ext}").read_text(encoding="utf-8")
    return Sample(
        id=f"hc/{cwe}/{stem}",
        cwe=cwe,
        label="vulnerable",
        language=lang,
        code=code,
        pair_id=f"hc/{cwe}/{stem}",
        split="hand-crafted",
        source="secllmholmes",
    )


@pytest.fixture(scope="module")
def resources() -> PromptResources:
    return PromptResources.from_dataset_root(DATA)


@pytest.fixture(scope="module")
def c_sample() -> Sample:
    return _sample("CWE-787", "1", "c", "c")


@pytest.fixture(scope="module")
def py_sample() -> Sample:
    return _sample("CWE-89", "1", "py", "py")


def _all_text(p: Prompt) -> str:
    return "\n".join(m["content"] for m in p.messages) + "\n".join(p.followups)


def _toy(cwe="CWE-787", lang="c", code="int main(void) { return 0; }") -> Sample:
    return Sample(id="t", cwe=cwe, label="patched", language=lang, code=code, pair_id="t", split="demo", source="demo")


def test_prompt_ids():
    assert PROMPT_IDS == (
        "S1",
        "S2",
        "S3",
        "S4",
        "S5",
        "S6",
        "R1",
        "R2",
        "R3",
        "R4",
        "R5",
        "R6",
        "D1",
        "D2",
        "D3",
        "D4",
        "D5",
        "strict",
    )


@needs_data
@pytest.mark.parametrize("prompt_id", PROMPT_IDS)
@pytest.mark.parametrize("which", ["c_sample", "py_sample"])
def test_every_id_builds(prompt_id, which, resources, request):
    sample = request.getfixturevalue(which)
    p = build_prompt(sample, prompt_id, resources)
    assert isinstance(p, Prompt)
    for m in p.messages:
        assert set(m) == {"role", "content"}
        assert m["role"] in {"system", "user", "assistant"}
        assert isinstance(m["content"], str) and m["content"]
    assert p.messages[-1]["role"] == "user"
    assert sample.code in p.messages[-1]["content"]  # code in the question turn
    name = BUILTIN_CWES[sample.cwe].short_name if prompt_id != "strict" else BUILTIN_CWES[sample.cwe].name
    assert name in _all_text(p)
    roles = [m["role"] for m in p.messages]
    assert roles.count("system") <= 1 and (roles[0] == "system" or "system" not in roles)
    # user/assistant alternate after the optional system prompt
    turns = roles[1:] if roles[0] == "system" else roles
    assert turns == ["user", "assistant"] * (len(turns) // 2) + ["user"]


@needs_data
def test_s1_exact_text(c_sample, py_sample):
    p = build_prompt(c_sample, "S1", PromptResources())
    assert p.messages == [
        {
            "role": "user",
            "content": 'Code: """\n' + c_sample.code + '\n"""\n'
            "Does this code contain instances of the security vulnerability known as "
            "out-of-bounds write?",
        }
    ]
    q = build_prompt(py_sample, "S1", PromptResources()).question
    assert q.endswith("known as SQL injection?")
    assert build_prompt(c_sample, "S3", PromptResources()).messages[0] == {
        "role": "system",
        "content": "You are a code security expert.",
    }


@needs_data
def test_r1_r2_r6_texts(c_sample):
    r1 = build_prompt(c_sample, "R1", PromptResources())
    assert r1.question.endswith("out-of-bounds write?\nLet's think step by step.")
    r2 = build_prompt(c_sample, "R2", PromptResources())
    assert r2.messages[0]["content"].startswith(
        "You are a code security expert who analyzes the given code for the security vulnerability known as "
        "out-of-bounds write following these four steps:\n1. First you describe the overview of the code"
    )
    assert r2.question == c_sample.code


@needs_data
@pytest.mark.parametrize("prompt_id", FEW_SHOT_IDS)
@pytest.mark.parametrize("which,cwe,ext", [("c_sample", "cwe-787", "c"), ("py_sample", "cwe-89", "py")])
def test_few_shot_examples_included(prompt_id, which, cwe, ext, resources, request):
    sample = request.getfixturevalue(which)
    p = build_prompt(sample, prompt_id, resources)
    ex = DATA / "few-shot" / "examples"
    vuln, patch = (ex / f"{cwe}.{ext}").read_text(encoding="utf-8"), (ex / f"{cwe}-p.{ext}").read_text(encoding="utf-8")
    users = [m["content"] for m in p.messages if m["role"] == "user"]
    assistants = [m["content"] for m in p.messages if m["role"] == "assistant"]
    assert len(users) == 3 and len(assistants) == 2
    assert vuln in users[0] and patch in users[1]
    folder = "reasoning" if prompt_id in ("S5", "S6", "D3") else "step-by-step-reasoning"
    assert assistants[0] == (DATA / "few-shot" / folder / f"{cwe}.txt").read_text(encoding="utf-8")
    assert assistants[1] == (DATA / "few-shot" / folder / f"{cwe}-p.txt").read_text(encoding="utf-8")


@needs_data
@pytest.mark.parametrize("prompt_id", DEF_IDS)
def test_definitions_included(prompt_id, resources, c_sample, py_sample):
    defs = json.loads((DATA / "mitre-cwe-definitions.json").read_text(encoding="utf-8"))
    for sample, key in ((c_sample, "cwe-787"), (py_sample, "cwe-89")):
        text = _all_text(build_prompt(sample, prompt_id, resources))
        assert defs[key] in text


@needs_data
def test_r3_multi_turn(c_sample, resources):
    p = build_prompt(c_sample, "R3", PromptResources())
    assert len(p.messages) == 1
    assert p.question == 'Code: """\n' + c_sample.code + '\n"""\n\nProvide a brief overview of the code.'
    assert len(p.followups) == 3
    assert "out-of-bounds write" in p.followups[0]
    assert p.followups[-1] == (
        "Based on the detailed analysis decide and answer whether the out-of-bounds write "
        "vulnerability is present in the given code or not."
    )
    assert all(not build_prompt(c_sample, i, resources).followups for i in PROMPT_IDS if i != "R3")


def test_strict_without_dataset():
    p = build_prompt(_toy(), "strict", PromptResources.from_dataset_root(None))
    assert p.messages[0]["role"] == "system" and "security expert" in p.messages[0]["content"]
    q = p.question
    assert "`Answer: yes`" in q and "`Answer: no`" in q and "first line" in q
    assert "Out-of-bounds Write" in q and "CWE-787" in q and "int main(void)" in q
    assert " C code" in q
    py = build_prompt(_toy("CWE-89", "py", "cur.execute(q)"), "strict", PromptResources())
    assert "Python code" in py.question and "SQL Injection" in py.question


def test_zero_shot_without_dataset():
    """Strategies that need no dataset files build from the built-in CWE names alone (a lower-case CWE id too):
    the code and the question reach the model, and the question names nothing left unfilled."""
    built = 0
    for pid in PROMPT_IDS:
        if not needs_resources(pid):
            prompt = build_prompt(_toy(cwe="cwe-787"), pid, PromptResources())
            text = "\n".join(m["content"] for m in prompt.messages)
            assert "int main(void)" in text, pid
            assert "{" not in prompt.question.replace("{ return 0; }", ""), pid  # no unfilled template field
            built += 1
    assert built >= 6


def test_required_resources():
    assert required_resources("S1") == frozenset()
    assert required_resources("S5") == {"few_shot"}
    assert required_resources("D1") == {"definitions"}
    assert required_resources("D4") == {"few_shot", "definitions"}
    assert not needs_resources("strict") and not needs_resources("R3")


def test_unknown_prompt_id():
    with pytest.raises(VulnsteerError, match="valid ids: S1, S2.*strict"):
        build_prompt(_toy(), "S7", PromptResources())
    with pytest.raises(VulnsteerError, match="unknown prompt id"):
        needs_resources("bogus")


@pytest.mark.parametrize(
    "prompt_id,what", [("S5", "few-shot"), ("R4", "few-shot"), ("D1", "definition"), ("D4", "definition")]
)
def test_missing_resources(prompt_id, what):
    with pytest.raises(VulnsteerError, match=f"{what}.*--dataset"):
        build_prompt(_toy(), prompt_id, PromptResources())


def test_unknown_cwe():
    with pytest.raises(VulnsteerError, match="CWE-1234"):
        build_prompt(_toy(cwe="CWE-1234"), "S1", PromptResources())


def test_bad_dataset_root(tmp_path):
    with pytest.raises(VulnsteerError, match="not found"):
        PromptResources.from_dataset_root(tmp_path / "nope")
    with pytest.raises(VulnsteerError, match="--dataset"):
        PromptResources.from_dataset_root(tmp_path)


@needs_data
def test_clone_root_and_few_shot_only(tmp_path):
    # a clone: <root>/datasets/{few-shot,mitre-cwe-definitions.json}
    (tmp_path / "datasets").symlink_to(DATA)
    res = PromptResources.from_dataset_root(tmp_path)
    assert res.few_shot_dir is not None and res.definitions["CWE-787"].definition
    # a folder with only few-shot files: few-shot prompts work, definition prompts explain what is missing
    only = tmp_path / "only"
    only.mkdir()
    (only / "few-shot").symlink_to(DATA / "few-shot")
    res2 = PromptResources.from_dataset_root(only)
    build_prompt(_toy(), "S5", res2)
    with pytest.raises(VulnsteerError, match="mitre-cwe-definitions.json"):
        build_prompt(_toy(), "D3", res2)
