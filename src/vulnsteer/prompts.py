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
from typing import Callable, Mapping

from vulnsteer.cwes import BY_ID, CATALOGUE, normalise_cwe
from vulnsteer.data import Sample
from vulnsteer.errors import VulnsteerError

_DATASET_HINT = (
    "pass --dataset pointing at a SecLLMHolmes datasets/ folder (or a clone of ai4cloudops/SecLLMHolmes containing it)"
)


@dataclass(frozen=True)
class CweInfo:
    """What prompts say about one CWE."""

    name: str  # official MITRE name, e.g. "Out-of-bounds Write"
    short_name: str  # the name SecLLMHolmes questions use, e.g. "out-of-bounds write"
    definition: str | None = None  # upstream mitre-cwe-definitions.json entry ("Name: description ...")


# The catalogue's CWEs by name only; a SecLLMHolmes dataset folder adds their MITRE definitions.
BUILTIN_CWES: dict[str, CweInfo] = {cwe.id: CweInfo(cwe.name, cwe.short_name) for cwe in CATALOGUE}

_LANGUAGE_NAMES: dict[str, str] = {
    "c": "C",
    "h": "C",
    "cpp": "C++",
    "c++": "C++",
    "cc": "C++",
    "cxx": "C++",
    "hpp": "C++",
    "py": "Python",
    "python": "Python",
    "java": "Java",
    "js": "JavaScript",
    "javascript": "JavaScript",
    "ts": "TypeScript",
    "go": "Go",
    "rb": "Ruby",
    "ruby": "Ruby",
    "php": "PHP",
    "rs": "Rust",
    "rust": "Rust",
    "cs": "C#",
    "csharp": "C#",
    "kotlin": "Kotlin",
    "kt": "Kotlin",
    "swift": "Swift",
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
            raise VulnsteerError(f"{root} has neither few-shot/ nor mitre-cwe-definitions.json; {_DATASET_HINT}")
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
    strategy = STRATEGIES.get(prompt_id)
    needs = set()
    if strategy and strategy.few_shot:
        needs.add("few_shot")
    if strategy and strategy.definition:
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
    return (
        "You are a code security expert who analyzes the given code for the security vulnerability known as "
        f"{cwe_name}."
    )


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
        f"Based on the overview identify the sub-components in code that could lead to a security vulnerability knows "
        f"as {n}.",
        f"Perform a detailed analysis of the identified sub-components for the existence of the {n} vulnerability.",
        f"Based on the detailed analysis decide and answer whether the {n} vulnerability is present in the given code "
        "or not.",
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


# ---- the strategies, declared ----------------------------------------------------------------------

# How a user turn lays out the code, given (code, CWE short name, definition): upstream `prepare_prompt` layouts.
_USER_TURNS: dict[str, Callable[[str, str, str], str]] = {
    "code": lambda code, n, d: code,
    "question": lambda code, n, d: _fmt_question(code, _question(n)),
    "step-by-step": lambda code, n, d: _fmt_qa(code, _question(n), "Let's think step by step."),
    "definition": lambda code, n, d: _fmt_def(d, code, _question(n)),
    "overview": lambda code, n, d: _fmt_none(code) + "\n\n" + _r3_turns(n)[0],  # R3's first turn; the rest follow
}


@dataclass(frozen=True)
class Strategy:
    """One SecLLMHolmes strategy: its system turn (from the CWE's short name and definition), the layout of its
    user turn and of its few-shot examples' user turns, and where its few-shot answers live."""

    kind: tuple[str, str]  # upstream src/constants.py PROMPTS_MAP: (zero-/few-shot, task-/role-oriented)
    system: Callable[[str, str], str] | None = None
    user: str = "code"  # a key of _USER_TURNS
    few_shot: str | None = None  # the answers' folder (upstream `dir_path/<folder>/<cwe>[-p].txt`)
    few_shot_user: str = "code"
    definition: bool = False  # pastes the MITRE definition (from the dataset's mitre-cwe-definitions.json)


def _fixed(text: str) -> Callable[[str, str], str]:
    return lambda n, d: text


STRATEGIES: dict[str, Strategy] = {
    "S1": Strategy(("ZS", "TO"), user="question"),
    "S2": Strategy(("ZS", "RO"), _fixed("You are a helpful assistant."), "question"),
    "S3": Strategy(("ZS", "RO"), _fixed("You are a code security expert."), "question"),
    "S4": Strategy(("ZS", "RO"), lambda n, d: _expert(n)),
    "S5": Strategy(("FS", "TO"), user="question", few_shot="reasoning", few_shot_user="question"),
    "S6": Strategy(("FS", "RO"), lambda n, d: _expert(n), few_shot="reasoning"),
    "R1": Strategy(("ZS", "TO"), user="step-by-step"),
    "R2": Strategy(("ZS", "RO"), lambda n, d: _r2_system(n)),
    "R3": Strategy(("ZS", "TO"), user="overview"),
    "R4": Strategy(("FS", "RO"), lambda n, d: _expert(n), few_shot="step-by-step-reasoning"),
    "R5": Strategy(("FS", "RO"), lambda n, d: _r5_system(n), few_shot="step-by-step-reasoning"),
    "R6": Strategy(("FS", "TO"), lambda n, d: _r6_system(n), few_shot="step-by-step-reasoning"),
    "D1": Strategy(("ZS", "TO"), user="definition", definition=True),
    "D2": Strategy(("ZS", "RO"), lambda n, d: _expert(n) + "\n\n" + d, definition=True),
    "D3": Strategy(("FS", "RO"), lambda n, d: _expert(n) + "\n\n" + d, few_shot="reasoning", definition=True),
    "D4": Strategy(
        ("FS", "RO"), lambda n, d: _expert(n) + "\n\n" + d, few_shot="step-by-step-reasoning", definition=True
    ),
    "D5": Strategy(
        ("FS", "TO"),
        lambda n, d: f"Analyze the given code for the security vulnerability known as {n}.\n\n{d}",
        few_shot="step-by-step-reasoning",
        definition=True,
    ),
}
SECLLMHOLMES_IDS: tuple[str, ...] = tuple(STRATEGIES)
PROMPT_IDS: tuple[str, ...] = SECLLMHOLMES_IDS + ("strict",)


# ---- resources -------------------------------------------------------------------------------------


@lru_cache(maxsize=256)
def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise VulnsteerError(f"cannot read few-shot file {path}: {exc}") from exc


def _few_shot_code_path(few_shot_dir: Path, cwe: str, patched: bool) -> Path:
    stem = cwe.lower() + ("-p" if patched else "")
    ext = BY_ID[cwe].few_shot_ext if cwe in BY_ID else None
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


def _few_shot_examples(resources: PromptResources, cwe: str, folder: str, fmt) -> list[dict[str, str]]:
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


# ---- public entry points -------------------------------------------------------------------------

# Score mode prefills the assistant turn with it; the yes/no log-odds are read at its last token.
ANSWER_PREFIX = "Answer:"
# Generate mode's forced final turn, asked after the free answer and scored as score mode scores.
FINAL_QUESTION = (
    "Final answer: does the code above contain the vulnerability you were asked about? Reply with yes or no."
)


def render(tokenizer, messages: list[dict], prefix: str = "") -> str:
    """Apply the chat template up to the assistant turn; fold the system prompt into the first user turn for
    templates that reject a system role."""
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # templates raise their own exception types (jinja2 TemplateError among them)
        if messages[0]["role"] != "system":
            raise
        system, first, *rest = messages
        merged = {"role": first["role"], "content": system["content"] + "\n\n" + first["content"]}
        text = tokenizer.apply_chat_template([merged, *rest], tokenize=False, add_generation_prompt=True)
    return text + prefix


def build_prompt(sample: Sample, prompt_id: str, resources: PromptResources | None = None) -> Prompt:
    """Build the chat messages of strategy `prompt_id` for `sample` (the caller applies the chat template)."""
    _check_id(prompt_id)
    resources = resources if resources is not None else PromptResources()
    cwe = normalise_cwe(sample.cwe)
    info = _info(resources, cwe)
    code = sample.code

    if prompt_id == "strict":
        return Prompt(
            [
                {"role": "system", "content": STRICT_SYSTEM},
                {"role": "user", "content": _strict_user(cwe, info.name, sample.language, code)},
            ]
        )

    strategy = STRATEGIES[prompt_id]
    n = info.short_name
    definition = _definition(info, cwe) if strategy.definition else ""
    system = strategy.system(n, definition) if strategy.system else ""
    text = _USER_TURNS[strategy.user](code, n, definition)
    examples = (
        _few_shot_examples(
            resources, cwe, strategy.few_shot, lambda c: _USER_TURNS[strategy.few_shot_user](c, n, definition)
        )
        if strategy.few_shot
        else []
    )
    followups = _r3_turns(n)[1:] if strategy.user == "overview" else ()

    messages: list[dict[str, str]] = []
    if system:  # upstream chat() drops an empty system prompt
        messages.append({"role": "system", "content": system})
    messages.extend(examples)
    messages.append({"role": "user", "content": text})
    return Prompt(messages, followups)
