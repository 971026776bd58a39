"""Turn a model's free-text answer to "does this code contain <CWE>?" into a verdict.

The original SecLLMHolmes-style evaluation counted an answer as "vulnerable" whenever the
word appeared, so "not vulnerable" and "no vulnerability" were scored as yes.  This module
replaces that with a small, deterministic rule set (standard library only).  Rules, in order
of precedence:

1. Empty text, fenced code only, or echoed questions -> "unknown".
2. Explicit answer lines: ``Answer: yes``, ``**Answer:** No``, ``The answer is: NO``,
   ``Vulnerable: yes``, ``Verdict: not vulnerable``, a line that is only "yes"/"no", or
   ``CWE-89: Yes`` list items (matched to the asked CWE).  Conflicting answers -> "unknown".
3. A leading "Yes"/"No" ("No." / "No, ..." / "Yes - ..." / "Yes (CWE-416): ..." but not the determiner in
   "No buffer overflow").
   Rules 2 and 3 are overruled to "unknown" when a conclusion sentence ("Therefore, ...")
   clearly says the opposite, and "Yes and no" is a hedge.
4. Sentence/clause analysis: each clause gets a polarity from negated phrases ("not vulnerable", "no ...
   vulnerability", "does not contain", "is safe", "an attacker can not") checked *before* affirmed ones ("is
   vulnerable", "contains a ... overflow", "leads to ..."), except a negated negative ("not free of overflows"),
   which affirms; phrases about missing checks ("does not validate", "no bounds check") are evidence, not verdicts,
   and are ignored (but "no bounds checking vulnerability" denies one).  When a CWE is given, clauses about the
   asked CWE win over generic ones and clauses about other CWEs are dropped.  The last conclusion clause decides;
   otherwise all committed clauses must agree.  Hedges ("may be vulnerable", "depending on", "hard to say") and
   disagreements -> "unknown".
"""

from __future__ import annotations

import re

from vulnsteer.cwes import CATALOGUE
from vulnsteer.records import Verdict

VULN: Verdict = "vulnerable"
SAFE: Verdict = "not_vulnerable"
UNKNOWN: Verdict = "unknown"

# Key phrases per catalogue CWE: answers name CWEs loosely, never by their full MITRE title.
CWE_KEYWORDS: dict[str, tuple[str, ...]] = {cwe.id: cwe.keywords for cwe in CATALOGUE}
# Vulnerability kinds outside the map: a clause about only these says nothing about the asked CWE.
OTHER_KEYWORDS: tuple[str, ...] = (
    "format string",
    "race condition",
    "memory leak",
    "double free",
    "denial of service",
    "information disclosure",
    "csrf",
    "xxe",
    "deserialization",
    "hardcoded",
    "hard-coded",
    "timing attack",
    "open redirect",
    "ssrf",
)
# Fragments of MITRE titles -> id, for callers that pass the full CWE name.
_NAME_HINTS: tuple[tuple[str, str], ...] = tuple((hint, cwe.id) for cwe in CATALOGUE for hint in cwe.title_hints)

_W = r"(?:[\w'-]+\s+)"  # one filler word
_VULN_NOUN = (
    r"(?:vulnerabilit(?:y|ies)|overflow|underflow|overrun|injection|traversal|xss|cross[- ]site|cwe[- ]?\d+|"
    r"use[- ]after[- ]free|dereference|out[- ]of[- ]bounds|dangling|wraparound|flaws?|weakness(?:es)?|"
    r"security (?:issues?|problems?|risks?|bugs?))"
)
_VULN_ADJ = r"(?:vulnerable|susceptible|prone|exploitable|affected|at risk)"
_NOUN_END = r"(?:\s+(?:vulnerabilit(?:y|ies)|issues?|bugs?|attacks?|risks?|flaws?|errors?))?"
_TAIL = r"(?:\s+(?:to|from|by)\s+" + _W + r"{0,4}?" + _VULN_NOUN + _NOUN_END + r")?"  # "... to sql injection"

# Missing-check phrases describe evidence, not a verdict; blank them so "not"/"no" in them
# is not read as "not vulnerable".
_LACK = re.compile(
    r"\b(?:does not|do not|did not|fails? to|failed to|never|not)\s+" + _W + r"{0,2}?"
    r"(?:check|validat|sanitiz|verif|escap|encod|limit|restrict|bound|initiali[sz])\w*"
    r"|\bno\s+(?:proper\s+|explicit\s+)?(?:bounds?|length|size|input|null|range|overflow)?\s*"
    r"(?:checks?|checking|validation|sanitization|escaping)\b"
    + r"(?!\s+"  # ... unless a weakness follows: "no bounds checking vulnerability" denies one
    + _VULN_NOUN
    + r")"
    r"|\bwithout\s+(?:any\s+|proper\s+)?(?:\w+\s+)?(?:check|validat|sanitiz|escap|encod|normaliz)\w*"
    # What is still to be checked ("S1: data is freed -> check if it was used after it was freed causing a use after
    # free vulnerability", the R prompts' sub-components) is a question, not a finding.
    r"|\bcheck\s+(?:if|whether)\b.*"
)
_NEG = re.compile(
    r"\bnot\s+"
    + _W
    + r"{0,3}?"
    + _VULN_ADJ
    + _TAIL
    + r"|\b(?:no|not any|without any|free (?:of|from))\s+"
    + _W
    + r"{0,4}?"
    + _VULN_NOUN
    + _NOUN_END
    + r"|\bthere\s+(?:is|are|was|were|will be)\s+not\s+"
    + _W
    + r"{0,4}?"
    + _VULN_NOUN
    + _NOUN_END
    + r"|\bno\s+(?:issues?|problems?|risks?|instances?|signs?|evidence|indication)\b"
    + r"|\b(?:does|do|did|will|would|can)\s+not\s+"
    + _W
    + r"{0,3}?"
    r"(?:contain|have|has|suffer|exhibit|introduce|pose|present|allow|lead|result|cause|include|"
    r"see|find|notice|identify|exist|occur|happen)(?:s|es|ed|ing|n)?\b"
    + r"(?:\s+"
    + _W
    + r"{0,4}?"
    + _VULN_NOUN
    + _NOUN_END
    + r")?"
    + r"|\b(?:is|are|looks?|seems?|appears?|remains?)\s+"
    + _W
    + r"{0,2}?(?:safe|secure)\b"
    + r"|\bsafe (?:from|against)\b|\bnot (?:present|possible)\b"
    + r"|\b(?:can|could) not be exploited\b|\ban attacker (?:can|could) not\b|\bno attacker (?:can|could)\b"
    + r"|\b(?:properly|correctly|safely)\s+(?:validat|sanitiz|escap|encod|check|handl|bound)\w*"
    + r"|\b(?:prevents?|mitigates?|eliminates?)\b"
    + r"|\b(?:protects?|protecting|protected|guards?|guarding)\s+"
    + _W
    + r"{0,3}?(?:from|against)\b"
)
_UNSAFE = re.compile(
    r"\b(?:is|are|looks?|seems?)\s+(?:\w+\s+)?(?:not\s+(?:a\s+|an\s+)?(?:safe|secure)|unsafe|insecure)\b"
    # failing to prevent a weakness affirms it ("does not prevent buffer overflows")
    r"|\b(?:(?:does|do|did|will|would|can)\s+not|fails?\s+to|failed\s+to|nothing)\s+(?:\w+\s+)?"
    r"(?:prevent|mitigat|protect|stop|guard)\w*"
    # a negated negative affirms: "not free of overflows", "not entirely free from vulnerabilities"
    r"|\bnot\s+(?:entirely\s+|completely\s+|totally\s+|fully\s+)?free\s+(?:of|from)\b"
)
# A negated belief negates the claim it introduces ("I don't think this code is vulnerable").
_NEG_BELIEF = re.compile(r"^(?:.*?\b)?(?:i|we)\s+(?:do|did)\s+not\s+(?:think|believe|consider|feel|expect|see how)\b")
_AFF = re.compile(
    r"\b(?:is|are|be|been|being|was|were|remains?|looks?|seems?|appears?|becomes?|code|function|"
    r"program|it's|deemed|considered)\s+"
    + _W
    + r"{0,2}?"
    + _VULN_ADJ
    + r"\b"
    + r"|\b"
    + _VULN_ADJ
    + r"\s+(?:to|because|due|since|as)\b"
    + r"|\b(?:contains?|has|have|there (?:is|are)|there's|introduces?|exhibits?|suffers? from|"
    r"leads? to|leading to|results? in|causes?|causing|allows?|enables?|(?:is|are) (?:a|an|the)|this is)\s+"
    + _W
    + r"{0,5}?"
    + _VULN_NOUN
    + r"|\b"
    + _VULN_NOUN
    + r"\s+(?:\w+\s+)?(?:exists?|is present|occurs?|lies|happens)\b"
    + r"|\b(?:can|could) be exploited\b|\ban attacker (?:can|could)\b(?! not\b)"
    # "The vulnerability in the given code is the use of free(file) ...", "The use-after-free vulnerability in ..."
    + r"|\bthe\s+(?:[\w-]+\s+){0,2}?vulnerabilit(?:y|ies)\s+(?:in|of)\s+(?:the\s+|this\s+)?(?:given\s+|provided\s+)?"
    r"(?:code|function|snippet|program)\s+(?:is|are|lies|occurs|exists)\b"
)
# A modal or hedge attached to the claim itself ("may be vulnerable", "could potentially contain").
_SOFT_AFF = re.compile(
    r"\b(?:may|might|could)\s+(?:potentially\s+|possibly\s+|also\s+)?(?:be\s+)?(?:\w+\s+)?"
    r"(?:vulnerable|susceptible|exploitable|contain|have|be at risk|introduce|lead|result|cause|allow)"
    r"|\b(?:potentially|possibly)\s+(?:vulnerable|susceptible|exploitable)"
)
_HEDGE = re.compile(
    r"\bdepend(?:s|ing)? on\b|\bit depends\b|\b(?:hard|difficult|impossible|not possible)\s+to\s+"
    r"(?:say|tell|determine|know|conclude)\b|\b(?:can not|unable to|not able to)\s+(?:\w+\s+)?"
    r"(?:determine|say|tell|conclude|provide|be determined)\b|\bnot sure\b|\bunclear\b|\buncertain\b"
    r"|\bwithout (?:more|additional|further|the full|full|the rest of the)\s+(?:\w+\s+)?"
    r"(?:context|information|code|details)\b|\b(?:not enough|insufficient|need more)\s+"
    r"(?:\w+\s+)?(?:information|context|code)\b|\byes and no\b"
)
_REFUSAL = re.compile(r"\b(?:i'?m sorry|i am sorry|as an ai|i (?:can not|won't|will not) help)\b")
_CONCLUSION = re.compile(
    r"^(?:therefore|thus|hence|so|consequently|overall|in conclusion|in summary|to summarize|"
    r"to conclude|in short|as a result|conclusion|final verdict|summary|in sum)\b"
)
_ANSWER_VALUE = r"(yes|no|not[\s-]+vulnerable|non[\s-]?vulnerable|vulnerable|safe|secure|benign|none|true|false)\b"
_ANSWER_KEY = re.compile(
    r"^(?:final\s+|short\s+|my\s+)?(?:answer|verdict|result|conclusion|decision|is (?:it|the code) vulnerable|"
    r"vulnerable|vulnerability|vulnerabilities|contains vulnerability|vulnerability (?:present|found|detected))$"
)
_KEY_LINE = re.compile(r"^\s*(?:[-*+>]\s*|\d+[.)]\s*)?([^:?=\n.!;]{1,80}?)\s*[:=?]\s*[:\-]?\s*" + _ANSWER_VALUE)
_ANSWER_IS = re.compile(r"\b(?:the|my)\s+(?:final\s+)?answer\s+(?:is|would be)\s*:?\s*" + _ANSWER_VALUE)
# After the word: the end, punctuation, a dash (hyphen, en or em) or a bracket ("Yes (CWE-416): ..."), or a pronoun.
_LEADING = re.compile(
    r"^(?:[-*>]\s*)?(yes|no|sí)(?=$|[\s.,!;:)\-]*$|[.,!;:)\-]|\s*[-\u2013\u2014(\[]"
    r"|\s+(?:it|the|this|that|there|i|we)\b)"
)
_YES_VALUES = {"yes", "vulnerable", "true", "sí"}
# Function words of almost any English sentence, none of them a word of Spanish, French, German or Italian.
_ENGLISH_WORDS = frozenset("the is of to and this that it does there are be with for has have was".split())


def parse_verdict(text: str, cwe_name: str | None = None) -> Verdict:
    """Classify a model's answer as "vulnerable", "not_vulnerable" or "unknown".

    `cwe_name` may be an id ("CWE-89") or a name; it lets answers that discuss several
    weaknesses be scored for the one that was asked about.
    """
    lines = _normalise(text or "")
    if not lines:
        return UNKNOWN
    keys = cwe_keywords(cwe_name)
    clauses = _clauses(lines)
    conclusion = _judge([c for c in clauses if c.is_conclusion], keys)

    explicit = _explicit_answer(lines, keys)
    if explicit is None:
        explicit = _leading_answer(lines)
    if explicit is None:
        explicit = _opening_answer(clauses, keys)
    if explicit is not None:
        # An explicit answer stands unless the model's own conclusion says the opposite.
        if explicit != UNKNOWN and conclusion not in (None, UNKNOWN, explicit):
            return UNKNOWN
        return explicit
    verdict = _judge(clauses, keys)
    return verdict if verdict is not None else UNKNOWN


def is_english(text: str) -> bool:
    """Whether an answer is in English, so that reports can count answers in other languages (which the rules above,
    written for English, mostly read as no answer). Answers of fewer than five distinct words count as English."""
    prose = re.sub(r"```.*?(?:```|$)|`[^`]*`", " ", text or "", flags=re.S)  # code is in no language, fenced
    prose = re.sub(r"(?m)^\s*#\s*(?:include|define|import)\b.*$|^.*[;{}]\s*$", " ", prose)  # ... or not
    words = re.findall(r"[^\W\d_]+", prose.lower())
    if len(set(words)) < 5:
        return True
    if sum(not w.isascii() for w in words) > len(words) / 2:
        return False
    return any(w in _ENGLISH_WORDS for w in words)


def cwe_keywords(cwe_name: str | None) -> tuple[str, ...]:
    """Key phrases that identify the asked CWE in an answer (empty when unknown/not given)."""
    if not cwe_name:
        return ()
    name = cwe_name.strip().lower()
    m = re.search(r"cwe[-_ ]?(\d+)", name)
    if m and f"CWE-{m.group(1)}" in CWE_KEYWORDS:
        return CWE_KEYWORDS[f"CWE-{m.group(1)}"]
    short = re.search(r"\('([^']+)'\)", name)  # MITRE short name, e.g. ('SQL Injection')
    for hay in ([short.group(1)] if short else []) + [name]:
        for hint, cwe in _NAME_HINTS:
            if hint in hay:
                return CWE_KEYWORDS[cwe]
    return (re.sub(r"\s*\(.*\)\s*", " ", name).strip(),)


# --- helpers -------------------------------------------------------------------------


class _Clause:
    """One clause with its polarity (+1/-1/0), hedge flag and whether it is a conclusion."""

    __slots__ = ("text", "polarity", "hedged", "is_conclusion")

    def __init__(self, text: str, is_conclusion: bool) -> None:
        self.text = text
        self.is_conclusion = is_conclusion
        self.polarity, self.hedged = _polarity(text)


def _normalise(text: str) -> list[str]:
    """Lower-case lines without code blocks, markdown emphasis, contractions or blank lines."""
    text = re.sub(r"```.*?(?:```|$)", "\n", text, flags=re.S)  # code is not an answer
    text = text.replace("\u2019", "'").replace("`", "")
    text = re.sub(r"\*\*|__|(?<!\w)\*(?!\s)|(?<!\s)\*(?!\w)", "", text)
    text = text.lower()
    text = re.sub(r"\bcannot\b", "can not", text)
    text = re.sub(r"\bcan't\b", "can not", text)
    text = re.sub(r"\bwon't\b", "will not", text)
    text = re.sub(r"n't\b", " not", text)
    text = re.sub(r"\bnot only\b", "", text)  # "not only vulnerable to X but also ..." affirms
    lines = []
    for line in text.splitlines():
        line = re.sub(r"^\s*#+\s*", "", line).strip()
        if line:
            lines.append(line)
    return lines


def _clauses(lines: list[str]) -> list[_Clause]:
    """Split into sentences and then on contrast words; drop questions (echoed prompts)."""
    out: list[_Clause] = []
    for line in lines:
        answer_line = bool(re.match(r"^(?:final\s+)?(?:answer|verdict|conclusion)\s*:", line))
        for sent in re.split(r"(?<=[.!?])\s+", line):
            if not sent or sent.endswith("?"):
                continue
            is_conc = answer_line or bool(_CONCLUSION.match(sent))
            for part in re.split(r";|\bhowever\b|,?\s+but\s+|\balthough\b|\bthough\b|(?=,\s+so\s+(?!that))", sent):
                part = part.strip(" ,:-")
                if part:
                    # Only the first part keeps a leading marker; ", so ..." starts its own.
                    out.append(_Clause(part, is_conc or bool(_CONCLUSION.match(part))))
                    is_conc = False
    return out


def _polarity(clause: str) -> tuple[int, bool]:
    """Return (+1 affirmed / -1 negated / 0 none-or-mixed, hedged) for one clause."""
    if _HEDGE.search(clause) or _REFUSAL.search(clause):
        return 0, True
    belief = _NEG_BELIEF.match(clause)
    if belief:
        polarity, hedged = _polarity(clause[belief.end() :])
        return -polarity, hedged
    s = _LACK.sub(" ", clause)
    aff = len(_UNSAFE.findall(s))
    s = _UNSAFE.sub(" ", s)
    neg = len(_NEG.findall(s))
    s = _NEG.sub(" ", s)
    soft = len(_SOFT_AFF.findall(s))
    s = _SOFT_AFF.sub(" ", s)
    aff += len(_AFF.findall(s))
    if aff and not neg:
        return 1, False
    if neg and not aff:
        return -1, False
    return 0, bool(soft)


def _said(clause: _Clause) -> bool:
    """Whether a clause takes any stance (committed or hedged) on vulnerability."""
    return bool(clause.polarity or clause.hedged)


def _mentions(clause: str, keys: tuple[str, ...]) -> bool:
    return any(re.search(r"(?<![\w-])" + re.escape(k) + r"(?![\w-])", clause) for k in keys)


def _judge(clauses: list[_Clause], keys: tuple[str, ...]) -> Verdict | None:
    """Combine clause polarities; None when no clause says anything about vulnerability."""
    if keys:
        others = tuple(k for ks in CWE_KEYWORDS.values() if ks != keys for k in ks if k not in keys)
        others += OTHER_KEYWORDS
        relevant = [c for c in clauses if _said(c) and _mentions(c.text, keys)]
        if not relevant:
            relevant = [c for c in clauses if _said(c) and not _mentions(c.text, others)]
            if any(_said(c) and _mentions(c.text, others) for c in clauses):
                # Next to another weakness, a generic "the code is vulnerable" is about that one.
                relevant = [c for c in relevant if c.polarity < 0 or c.hedged]
                if not relevant:
                    return UNKNOWN
        clauses = relevant
    said = [c for c in clauses if _said(c)]
    if not said:
        return None
    concl = [c for c in said if c.is_conclusion]
    if concl:
        said = [concl[-1]]
    strong = {c.polarity for c in said if c.polarity and not c.hedged}
    if len(strong) == 1:
        return VULN if strong.pop() > 0 else SAFE
    return UNKNOWN


def _explicit_answer(lines: list[str], keys: tuple[str, ...]) -> Verdict | None:
    """Verdict from `Answer: yes`-style lines, bare yes/no lines or `CWE-89: Yes` items."""
    general: list[Verdict] = []
    specific: list[Verdict] = []
    final: Verdict | None = None
    for line in lines:
        bare = re.fullmatch(r"[-*>\s]*(yes|no|not vulnerable|vulnerable)[.!]?", line)
        if bare:
            general.append(_value(bare.group(1)))
            continue
        m = _KEY_LINE.match(line)
        if m:
            key = m.group(1).strip(" *_")
            if _ANSWER_KEY.match(key):
                general.append(_value(m.group(2)))
                if key.startswith("final"):
                    final = general[-1]
                continue
            if keys and _mentions(key, keys):
                specific.append(_value(m.group(2)))
                continue
        for m in _ANSWER_IS.finditer(line):
            general.append(_value(m.group(1)))
    if final is not None:
        return final
    for found in (specific, general):
        if found:
            return found[0] if len(set(found)) == 1 else UNKNOWN
    return None


def _leading_answer(lines: list[str]) -> Verdict | None:
    """A first word of "Yes"/"No" used as an answer, not as a determiner ("No buffer ...")."""
    first = lines[0]
    if re.match(r"^yes[\s-]*(?:and|&|/)[\s-]*no\b", first):
        return UNKNOWN
    m = _LEADING.match(first)
    return _value(m.group(1)) if m else None


_OPENING = re.compile(r"^(?:the|this|given|your)\s+(?:\w+\s+)?(?:code|function|program|snippet|implementation)\b")


def _opening_answer(clauses: list[_Clause], keys: tuple[str, ...]) -> Verdict | None:
    """A first sentence that states a verdict about the code ("The code contains an instance of CWE-89 ...") is the
    answer, as a leading "Yes" would be: the reasoning after it may mention safeguards without retracting it. Another
    statement about the code with the opposite verdict makes it unknown."""
    first = clauses[0] if clauses else None
    if first is None or not _OPENING.match(first.text) or first.hedged or not first.polarity:
        return None
    others = tuple(k for ks in CWE_KEYWORDS.values() if ks != keys for k in ks if k not in keys) + OTHER_KEYWORDS
    if keys and not _mentions(first.text, keys) and _mentions(first.text, others):
        return None  # the opening is about another weakness
    if any(_OPENING.match(c.text) and c.polarity == -first.polarity and not c.hedged for c in clauses[1:]):
        return UNKNOWN
    return VULN if first.polarity > 0 else SAFE


def _value(word: str) -> Verdict:
    word = re.sub(r"[\s-]+", " ", word)
    return VULN if word in _YES_VALUES else SAFE
