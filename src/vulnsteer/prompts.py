"""SecLLMHolmes prompt strategies (S1-S6, R1-R6, D1-D5) plus a `strict` yes/no prompt, as chat messages.

The 17 SecLLMHolmes strategies reproduce the upstream framework (Ullah et al., IEEE S&P 2024, GitHub
`ai4cloudops/SecLLMHolmes`) word for word:

* system prompts, questions and few-shot layout: `src/prompt_templates.py` (commit bd2ad9f,
  methods `promptS1` ... `promptD5`); the same texts are in the older root `adapter.py`, except that R2
  there has no full stop after step 3 ("... existence of the X vulnerability\\n4.") - we follow `src/`.
* CWE short names used in every question (e.g. "out-of-bounds write") and the CWE -> few-shot file
  extension map: `src/constants.py` (`CWES`, `LANG`).
* how a user turn is laid out (`Code: \"\"\"\\n...\\n\"\"\"\\n<question>` etc.) and how system prompt, examples and
  the question become chat messages: `adapter-examples/openai_adapter.py` (`prepare_prompt`, `chat`).
  Upstream leaves `prepare_prompt` to each model adapter (the Llama adapter puts the question first and
  uses no `Code:` quotes); we use the OpenAI chat adapter's layout, the one for chat-template models.
* few-shot examples: `datasets/few-shot/examples/cwe-N[-p].{c,py}` with answers from `reasoning/`
  (S5, S6, D3) or `step-by-step-reasoning/` (R4, R5, R6, D4, D5), one vulnerable then one patched example.
* definitions: `datasets/mitre-cwe-definitions.json` (D1-D5 paste the whole entry, e.g.
  "Out-of-bounds Write: The product writes data past ...").
* R3 is multi-turn upstream: the code + "Provide a brief overview of the code." is sent first, then three
  more user turns, each after the model's previous reply; they are `Prompt.followups` here.

Upstream questions do not name the code's language and upstream picks one few-shot pair per CWE (C for
six CWEs, Python for CWE-79/89), so the 17 strategies are language-neutral by design and we keep them so;
only `strict` (ours, not upstream) names the sample's language.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Mapping

from vulnsteer.data import Sample, normalise_cwe
from vulnsteer.errors import VulnsteerError

SECLLMHOLMES_IDS: tuple[str, ...] = (
    "S1", "S2", "S3", "S4", "S5", "S6",
    "R1", "R2", "R3", "R4", "R5", "R6",
    "D1", "D2", "D3", "D4", "D5",
)
PROMPT_IDS: tuple[str, ...] = SECLLMHOLMES_IDS + ("strict",)

# Upstream `src/constants.py` PROMPTS_MAP: (zero-/few-shot, task-oriented / role-oriented).
PROMPT_KINDS: dict[str, tuple[str, str]] = {
    "S1": ("ZS", "TO"), "S2": ("ZS", "RO"), "S3": ("ZS", "RO"), "S4": ("ZS", "RO"),
    "S5": ("FS", "TO"), "S6": ("FS", "RO"),
    "R1": ("ZS", "TO"), "R2": ("ZS", "RO"), "R3": ("ZS", "TO"),
    "R4": ("FS", "RO"), "R5": ("FS", "RO"), "R6": ("FS", "TO"),
    "D1": ("ZS", "TO"), "D2": ("ZS", "RO"), "D3": ("FS", "RO"), "D4": ("FS", "RO"), "D5": ("FS", "TO"),
    "strict": ("ZS", "RO"),
}

# Few-shot answer folder each few-shot strategy uses (upstream `dir_path/<folder>/<cwe>[-p].txt`).
_FEW_SHOT_REASONING: dict[str, str] = {
    "S5": "reasoning", "S6": "reasoning", "D3": "reasoning",
    "R4": "step-by-step-reasoning", "R5": "step-by-step-reasoning", "R6": "step-by-step-reasoning",
    "D4": "step-by-step-reasoning", "D5": "step-by-step-reasoning",
}
_NEEDS_DEFINITION = frozenset({"D1", "D2", "D3", "D4", "D5"})

_DATASET_HINT = (
    "pass --dataset pointing at a SecLLMHolmes datasets/ folder (or a clone of ai4cloudops/SecLLMHolmes "
    "containing it)"
)


@dataclass(frozen=True)
class CweInfo:
    """What prompts say about one CWE."""

    name: str  # official MITRE name, e.g. "Out-of-bounds Write"
    short_name: str  # the name SecLLMHolmes questions use, e.g. "out-of-bounds write"
    definition: str | None = None  # upstream mitre-cwe-definitions.json entry ("Name: description ...")


# Official MITRE names (CWE 4.14) and the SecLLMHolmes names (upstream src/constants.py CWES).
BUILTIN_CWES: dict[str, CweInfo] = {
    "CWE-22": CweInfo("Improper Limitation of a Pathname to a Restricted Directory ('Path Traversal')",
                      "path traversal"),
    "CWE-77": CweInfo("Improper Neutralization of Special Elements used in a Command ('Command Injection')",
                      "OS command injection"),
    "CWE-79": CweInfo("Improper Neutralization of Input During Web Page Generation ('Cross-site Scripting')",
                      "cross-site scripting"),
    "CWE-89": CweInfo("Improper Neutralization of Special Elements used in an SQL Command ('SQL Injection')",
                      "SQL injection"),
    "CWE-190": CweInfo("Integer Overflow or Wraparound", "integer overflow"),
    "CWE-416": CweInfo("Use After Free", "use after free"),
    "CWE-476": CweInfo("NULL Pointer Dereference", "NULL pointer dereference"),
    "CWE-787": CweInfo("Out-of-bounds Write", "out-of-bounds write"),
}

# Upstream src/constants.py LANG: extension of each CWE's few-shot example files.
_FEW_SHOT_EXT: dict[str, str] = {
    "CWE-22": "c", "CWE-77": "c", "CWE-79": "py", "CWE-89": "py",
    "CWE-190": "c", "CWE-416": "c", "CWE-476": "c", "CWE-787": "c",
}

_LANGUAGE_NAMES: dict[str, str] = {
    "c": "C", "h": "C", "cpp": "C++", "c++": "C++", "cc": "C++", "cxx": "C++", "hpp": "C++",
    "py": "Python", "python": "Python", "java": "Java", "js": "JavaScript", "javascript": "JavaScript",
    "ts": "TypeScript", "go": "Go", "rb": "Ruby", "ruby": "Ruby", "php": "PHP", "rs": "Rust", "rust": "Rust",
    "cs": "C#", "csharp": "C#", "kotlin": "Kotlin", "kt": "Kotlin", "swift": "Swift",
}


@dataclass(frozen=True)
class Prompt:
    """Chat messages up to the first question, and user turns to send after each model reply."""

    messages: list[dict[str, str]]
    followups: tuple[str, ...] = ()

    @property
    def question(self) -> str:
        """The last user turn of `messages` (the one the model answers first)."""
        return self.messages[-1]["content"]


@dataclass(frozen=True)
class PromptResources:
    """Dataset files some strategies need: few-shot examples and CWE definitions.

    `definitions` always holds the built-in CWEs (names only); a dataset adds their MITRE definitions.
    """

    few_shot_dir: Path | None = None
    definitions: Mapping[str, CweInfo] = field(default_factory=lambda: dict(BUILTIN_CWES))

    @classmethod
    def from_dataset_root(cls, root: Path | str | None) -> "PromptResources":
        """Read a SecLLMHolmes `datasets/` folder (or a clone containing one); None -> built-in names only."""
        if root is None:
            return cls()
        root = Path(root).expanduser()
        if not root.is_dir():
            raise VulnsteerError(f"SecLLMHolmes dataset folder not found: {root}")
        base = root
        if not _looks_like_dataset(base) and _looks_like_dataset(root / "datasets"):
            base = root / "datasets"
        few_shot = base / "few-shot"
        defs_path = base / "mitre-cwe-definitions.json"
        if not few_shot.is_dir() and not defs_path.is_file():
            raise VulnsteerError(
                f"{root} has neither few-shot/ nor mitre-cwe-definitions.json; {_DATASET_HINT}"
            )
        definitions = dict(BUILTIN_CWES)
        if defs_path.is_file():
            try:
                raw = json.loads(defs_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise VulnsteerError(f"cannot read {defs_path}: {exc}") from exc
            if not isinstance(raw, dict):
                raise VulnsteerError(f"{defs_path} is not a JSON object of CWE id -> definition")
            for key, text in raw.items():
                cwe = normalise_cwe(str(key))
                if not isinstance(text, str):
                    raise VulnsteerError(f"{defs_path}: definition of {key} is not a string")
                known = definitions.get(cwe)
                if known is None:
                    head = text.split(":", 1)[0].strip()
                    known = CweInfo(head, head)
                definitions[cwe] = CweInfo(known.name, known.short_name, text)
        return cls(few_shot_dir=few_shot if few_shot.is_dir() else None, definitions=definitions)


def _looks_like_dataset(path: Path) -> bool:
    return (path / "few-shot").is_dir() or (path / "mitre-cwe-definitions.json").is_file()


def _check_id(prompt_id: str) -> str:
    if prompt_id not in PROMPT_IDS:
        raise VulnsteerError(f"unknown prompt id {prompt_id!r}; valid ids: {', '.join(PROMPT_IDS)}")
    return prompt_id


def required_resources(prompt_id: str) -> frozenset[str]:
    """Which dataset resources a strategy needs: a subset of {"few_shot", "definitions"}."""
    _check_id(prompt_id)
    needs = set()
    if prompt_id in _FEW_SHOT_REASONING:
        needs.add("few_shot")
    if prompt_id in _NEEDS_DEFINITION:
        needs.add("definitions")
    return frozenset(needs)


def needs_resources(prompt_id: str) -> bool:
    """True when the strategy reads few-shot files or MITRE definitions from a dataset folder."""
    return bool(required_resources(prompt_id))


def language_name(language: str) -> str:
    """'c' -> 'C', 'py' -> 'Python'; unknown codes are returned as given."""
    return _LANGUAGE_NAMES.get(language.strip().lower(), language)


# ---- upstream building blocks ------------------------------------------------------------------

def _question(cwe_name: str) -> str:
    return f"Does this code contain instances of the security vulnerability known as {cwe_name}?"


def _fmt_question(code: str, question: str) -> str:  # prepare_prompt(prompt="Question")
    return 'Code: """\n' + code + '\n"""\n' + question


def _fmt_qa(code: str, question: str, answer: str) -> str:  # prepare_prompt(prompt="Q/A")
    return 'Code: """\n' + code + '\n"""\n' + question + "\n" + answer


def _fmt_def(defin: str, code: str, question: str) -> str:  # prepare_prompt(prompt="Def")
    return defin + '\n\nCode: """\n' + code + '\n"""\n' + question


def _fmt_none(code: str) -> str:  # prepare_prompt(prompt="None")
    return 'Code: """\n' + code + '\n"""'


def _expert(cwe_name: str) -> str:
    return f"You are a code security expert who analyzes the given code for the security vulnerability known as {cwe_name}."


def _r2_system(n: str) -> str:  # src/prompt_templates.py promptR2 (note the "." after step 3, unlike R5)
    return (
        f"You are a code security expert who analyzes the given code for the security vulnerability known as {n} "
        f"following these four steps:\n1. First you describe the overview of the code\n2. Then based on the "
        f"overview you identify the sub-components in code that could lead to {n}\n3. After that you do a "
        f"detailed analysis of the identified sub-components for the existence of the {n} vulnerability.\n"
        f"4. Based on the detailed analysis you decide and answer whether the {n} vulnerability is present in "
        f"the given code or not"
    )


def _r5_system(n: str) -> str:
    return (
        f"You are a code security expert who analyzes the given code for the security vulnerability known as {n} "
        f"following these four steps:\n1. First you describe the overview of the code\n2. Then based on the "
        f"overview you identify the sub-components in code that could lead to {n}\n3. After that you do a "
        f"detailed analysis of the identified sub-components for the existence of the {n} vulnerability\n"
        f"4. Based on the detailed analysis you decide and answer whether the {n} vulnerability is present in "
        f"the given code or not"
    )


def _r6_system(n: str) -> str:
    return (
        f"Guidelines to analyze the given code for the security vulnerability known as {n}:\n1. First describe "
        f"the overview of the code\n2. Then based on the overview identify the sub-components in code that could "
        f"lead to {n}\n3. After that do a detailed analysis of the identified sub-components for the existence "
        f"of the {n} vulnerability\n4. Based on the detailed analysis decide and answer whether the {n} "
        f"vulnerability is present in the given code or not"
    )


def _r3_turns(n: str) -> tuple[str, str, str, str]:
    return (
        "Provide a brief overview of the code.",
        # "knows as" is upstream's spelling; kept so the prompt is the benchmark's.
        f"Based on the overview identify the sub-components in code that could lead to a security vulnerability knows as {n}.",
        f"Perform a detailed analysis of the identified sub-components for the existence of the {n} vulnerability.",
        f"Based on the detailed analysis decide and answer whether the {n} vulnerability is present in the given code or not.",
    )


STRICT_SYSTEM = (
    "You are a code security expert. You review code for one given kind of security vulnerability and answer "
    "precisely and concisely."
)


def _strict_user(cwe: str, name: str, language: str, code: str) -> str:
    lang = language_name(language)
    return (
        f"Does the following {lang} code contain an instance of the security vulnerability {cwe} ({name})?\n\n"
        f'Code: """\n{code}\n"""\n\n'
        "The first line of your reply must be exactly `Answer: yes` or `Answer: no` (nothing else on that line). "
        "Then give a short reasoning (at most a few sentences) that points to the relevant lines of code."
    )


# ---- resources -------------------------------------------------------------------------------------

@lru_cache(maxsize=256)
def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise VulnsteerError(f"cannot read few-shot file {path}: {exc}") from exc


def _few_shot_code_path(few_shot_dir: Path, cwe: str, patched: bool) -> Path:
    stem = cwe.lower() + ("-p" if patched else "")
    ext = _FEW_SHOT_EXT.get(cwe)
    if ext is not None:
        path = few_shot_dir / "examples" / f"{stem}.{ext}"
        if path.is_file():
            return path
    found = sorted(p for p in (few_shot_dir / "examples").glob(f"{stem}.*") if p.is_file())
    if not found:
        raise VulnsteerError(
            f"no few-shot example {stem}.* in {few_shot_dir / 'examples'}; SecLLMHolmes has few-shot examples "
            f"only for {', '.join(BUILTIN_CWES)}"
        )
    return found[0]


def _few_shot_examples(
    resources: PromptResources, cwe: str, folder: str, fmt
) -> list[dict[str, str]]:
    """Upstream `exp = [(vuln_prompt, vuln_reason), (patch_prompt, patch_reason)]` as chat turns."""
    d = resources.few_shot_dir
    if d is None:
        raise VulnsteerError(f"this prompt needs the SecLLMHolmes few-shot/ folder; {_DATASET_HINT}")
    turns: list[dict[str, str]] = []
    for patched in (False, True):
        code = _read(_few_shot_code_path(d, cwe, patched))
        reason_path = d / folder / f"{cwe.lower()}{'-p' if patched else ''}.txt"
        if not reason_path.is_file():
            raise VulnsteerError(f"few-shot answer file missing: {reason_path}")
        turns.append({"role": "user", "content": fmt(code)})
        turns.append({"role": "assistant", "content": _read(reason_path)})
    return turns


def _info(resources: PromptResources, cwe: str) -> CweInfo:
    info = resources.definitions.get(cwe) or BUILTIN_CWES.get(cwe)
    if info is None:
        raise VulnsteerError(
            f"no name known for {cwe}; built-in CWEs are {', '.join(BUILTIN_CWES)} "
            f"(others need a definitions file; {_DATASET_HINT})"
        )
    return info


def _definition(info: CweInfo, cwe: str) -> str:
    if not info.definition:
        raise VulnsteerError(
            f"this prompt needs the MITRE definition of {cwe} from mitre-cwe-definitions.json; {_DATASET_HINT}"
        )
    return info.definition


# ---- public entry point --------------------------------------------------------------------------

def build_prompt(sample: Sample, prompt_id: str, resources: PromptResources | None = None) -> Prompt:
    """Build the chat messages of strategy `prompt_id` for `sample` (the caller applies the chat template)."""
    _check_id(prompt_id)
    resources = resources if resources is not None else PromptResources()
    cwe = normalise_cwe(sample.cwe)
    info = _info(resources, cwe)
    code = sample.code

    if prompt_id == "strict":
        return Prompt([
            {"role": "system", "content": STRICT_SYSTEM},
            {"role": "user", "content": _strict_user(cwe, info.name, sample.language, code)},
        ])

    n = info.short_name
    q = _question(n)
    system = ""
    examples: list[dict[str, str]] = []
    followups: tuple[str, ...] = ()
    defin = _definition(info, cwe) if prompt_id in _NEEDS_DEFINITION else ""
    folder = _FEW_SHOT_REASONING.get(prompt_id)

    if prompt_id in ("S1", "S2", "S3"):
        system = {"S1": "", "S2": "You are a helpful assistant.", "S3": "You are a code security expert."}[prompt_id]
        text = _fmt_question(code, q)
    elif prompt_id == "S4":
        system, text = _expert(n), code
    elif prompt_id == "S5":
        examples = _few_shot_examples(resources, cwe, folder, lambda c: _fmt_question(c, q))
        text = _fmt_question(code, q)
    elif prompt_id in ("S6", "R4"):
        system, text = _expert(n), code
        examples = _few_shot_examples(resources, cwe, folder, lambda c: c)
    elif prompt_id == "R1":
        text = _fmt_qa(code, q, "Let's think step by step.")
    elif prompt_id == "R2":
        system, text = _r2_system(n), code
    elif prompt_id == "R3":
        first, *rest = _r3_turns(n)
        text = _fmt_none(code) + "\n\n" + first
        followups = tuple(rest)
    elif prompt_id in ("R5", "R6"):
        system = _r5_system(n) if prompt_id == "R5" else _r6_system(n)
        text = code
        examples = _few_shot_examples(resources, cwe, folder, lambda c: c)
    elif prompt_id == "D1":
        text = _fmt_def(defin, code, q)
    elif prompt_id in ("D2", "D3", "D4"):
        system, text = _expert(n) + "\n\n" + defin, code
        if prompt_id != "D2":
            examples = _few_shot_examples(resources, cwe, folder, lambda c: c)
    else:  # D5
        system = f"Analyze the given code for the security vulnerability known as {n}.\n\n{defin}"
        text = code
        examples = _few_shot_examples(resources, cwe, folder, lambda c: c)

    messages: list[dict[str, str]] = []
    if system:  # upstream chat() drops an empty system prompt
        messages.append({"role": "system", "content": system})
    messages.extend(examples)
    messages.append({"role": "user", "content": text})
    return Prompt(messages, followups)
