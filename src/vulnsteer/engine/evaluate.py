"""Turn (sample, prompt, steering) jobs into verdicts, batched, in two modes.

`generate`: greedy decoding of a free-text answer, parsed into a verdict; then (`Decoding.final_answer`) a forced
final turn asks for yes or no and scores it as score mode does, a second verdict that needs no parser.
`score`: no generation; the assistant turn is prefilled with "Answer:" and the log-odds of the next token being
"yes" rather than "no" is a continuous vulnerability score (> 0 means vulnerable).

Baseline and steered rows go through the same code path: a job's steering is just a per-row setting, so one batch
may hold both, and both see exactly the same prompts and decoding.

A run goes turn by turn (multi-turn prompts), each turn in phases (rows still conversing, then rows that score);
`planner.plan_phase` makes each phase's batches, and each batch goes to the runner of its path
(`runners.default_runners`), which a caller may replace.
"""

from __future__ import annotations

import time
from typing import Callable, Collection, Sequence

from vulnsteer.architecture import takes_additive_masks
from vulnsteer.engine.planner import Batch, auto_batch_tokens, batch_cost, plan_phase
from vulnsteer.engine.runners import Runner, default_runners, eos_ids, run_halving
from vulnsteer.engine.static import StaticDecoder
from vulnsteer.models import LoadedModel
from vulnsteer.prompts import ANSWER_PREFIX, FINAL_QUESTION, render
from vulnsteer.records import Decoding, Job, Result
from vulnsteer.steering.hooks import leaves_prompt_alone
from vulnsteer.verdicts import parse_verdict


def batch_budget(lm: LoadedModel, decoding: Decoding, lengths: Sequence[int], score: bool) -> int:
    """`decoding.batch_tokens`, or the automatic budget for prompts of these lengths."""
    if decoding.batch_tokens is not None:
        return decoding.batch_tokens
    return auto_batch_tokens(lm.model, 0 if score else decoding.max_new_tokens, min(lengths, default=1))


def evaluate(
    lm: LoadedModel,
    jobs: Sequence[Job],
    decoding: Decoding = Decoding(),
    progress: Callable[[int], None] | None = None,
    on_result: Callable[[Result], None] | None = None,
    runners: dict[str, Runner] | None = None,
    done: Collection[int] = frozenset(),
) -> list[Result]:
    """Run every job; results come back in the order of `jobs`. `on_result` sees each as soon as its batch ends
    (the store uses it to write rows as they finish, so an interrupted run loses at most one batch). `runners`
    replaces the runner of a batch path (`Batch.path`), e.g. to observe one.

    `done`: indices of jobs whose results the caller already holds (a resumed run; they are left out of the
    results). Batches are still planned over every job; a batch of only such rows is skipped, any other runs whole.
    So each row is computed beside the companions an uninterrupted run gives it: a batch's shape and padding change
    float results in the last bits, enough to flip a greedy token (exact for single-turn prompts)."""
    # The static cache serves generation: a run that only scores (one turn) takes the plain path, which shares
    # more of a sweep's work.
    generates = decoding.mode == "generate" or any(job.prompt.followups for job in jobs)
    static = (
        StaticDecoder(lm.model, eos_ids(lm), lm.tokenizer.pad_token_id, max_batch=min(len(jobs), 64))
        if decoding.cache == "static" and generates
        else None
    )
    try:
        return _Run(
            lm,
            jobs,
            decoding,
            {**default_runners(decoding.max_new_tokens, static), **(runners or {})},
            static is None,
            frozenset(done),
        ).run(progress, on_result)
    finally:
        if static is not None:
            static.close()


class _Run:
    """The state of one `evaluate` call: each row's conversation so far and its result once finished."""

    def __init__(
        self,
        lm: LoadedModel,
        jobs: Sequence[Job],
        decoding: Decoding,
        runners: dict[str, Runner],
        side_by_side: bool,
        done: frozenset[int] = frozenset(),
    ):
        self.lm, self.jobs, self.decoding, self.runners, self.done = lm, jobs, decoding, runners, done
        # Scoring shares a prompt's pass through a 4-D mask, on the plain path only; generating, either path shares.
        self.side_by_side = side_by_side and takes_additive_masks(lm.model)
        self.histories: list[list[str]] = [[] for _ in jobs]
        self.followups = [list(job.prompt.followups) for job in jobs]
        self.results: list[Result | None] = [None] * len(jobs)

    def run(self, progress, on_result) -> list[Result]:
        final = self.decoding.mode == "generate" and self.decoding.final_answer  # then a forced yes/no turn
        skipped: set[int] = set()
        for turn in range(1 + max(map(len, self.followups), default=0)):
            active = [i for i in range(len(self.jobs)) if turn <= len(self.followups[i]) and i not in skipped]
            last_turn = {i for i in active if turn == len(self.followups[i])}
            scoring = {i for i in last_turn if self.decoding.mode == "score"}
            for phase in ([i for i in active if i not in scoring], [i for i in active if i in scoring]):
                texts = self._render(phase, scoring)
                for batch in self._plan(texts, bool(phase) and phase[0] in scoring):
                    if self.done.issuperset(batch.rows):
                        skipped.update(batch.rows)
                        continue
                    start = time.perf_counter()
                    answers = self._answer(batch.path, [texts[i] for i in batch.rows], batch.rows)
                    finals = (
                        self._final_scores(batch.rows, answers.replies)
                        if final and batch.rows[0] in last_turn
                        else [None] * len(batch.rows)
                    )
                    seconds = (time.perf_counter() - start) / len(batch.rows)
                    for k, i in enumerate(batch.rows):
                        reply = answers.replies[k].strip()
                        if i not in last_turn:
                            self.histories[i].append(reply)
                            continue
                        if i in self.done:
                            continue
                        self.results[i] = make_result(
                            self.jobs[i],
                            self.decoding.mode,
                            reply,
                            answers.scores[k],
                            answers.prompt_tokens[k],
                            answers.new_tokens[k],
                            seconds,
                            self.histories[i],
                            finals[k],
                        )
                        if on_result:
                            on_result(self.results[i])
                    if progress:
                        progress(sum(1 for i in batch.rows if i in last_turn and i not in self.done))
        return [r for r in self.results if r is not None]

    def _plan(self, texts: dict[int, str], score: bool) -> list[Batch]:
        counts = {t: len(self.lm.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in set(texts.values())}
        lengths = {i: counts[texts[i]] for i in texts}
        budget = batch_budget(self.lm, self.decoding, list(lengths.values()), score)
        cost = batch_cost(self.lm.model, 1 if score else self.decoding.max_new_tokens)
        alone = {i: leaves_prompt_alone(self.jobs[i].steering) for i in texts}
        return plan_phase(texts, lengths, alone, score, self.side_by_side if score else True, budget, cost)

    def _answer(self, path: str, texts: list[str], rows: list[int]):
        steerings = [self.jobs[i].steering for i in rows]
        return run_halving(self.runners[path], self.lm, texts, steerings if any(steerings) else None)

    def _final_scores(self, rows: list[int], replies: list[str]) -> list[float | None]:
        """The forced final turn of a batch's answers, right after they are generated (so that each finished row is
        written at once): the reply, then FINAL_QUESTION, scored as score mode scores, under the row's own
        steering."""
        texts = [
            self._conversation(i, self.histories[i] + [replies[k].strip()], self.followups[i] + [FINAL_QUESTION], True)
            for k, i in enumerate(rows)
        ]
        return self._answer("score", texts, rows).scores

    def _render(self, rows: list[int], scoring: set[int]) -> dict[int, str]:
        """Each row's text; a sweep asks each prompt under many configs, so each distinct conversation renders
        once."""
        rendered: dict[tuple, str] = {}
        texts = {}
        for i in rows:
            key = (id(self.jobs[i].prompt), tuple(self.histories[i]), i in scoring)
            if key not in rendered:
                rendered[key] = self._conversation(i, self.histories[i], self.followups[i], i in scoring)
            texts[i] = rendered[key]
        return texts

    def _conversation(self, i: int, history: list[str], followups: list[str], score: bool) -> str:
        """The conversation so far: the prompt, then each earlier reply with the follow-up question after it."""
        messages = list(self.jobs[i].prompt.messages)
        for reply, followup in zip(history, followups):
            messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": followup}]
        return render(self.lm.tokenizer, messages, ANSWER_PREFIX if score else "")


def _score_verdict(score: float) -> str:
    return "vulnerable" if score > 0 else "not_vulnerable"


def make_result(
    job: Job,
    mode: str,
    reply: str,
    score,
    prompt_tokens,
    new_tokens,
    seconds,
    history,
    final_score: float | None = None,
) -> Result:
    """A row as every engine writes it: the verdict from the score (> 0: vulnerable) or parsed from the reply."""
    sample = job.sample
    verdict = _score_verdict(score) if mode == "score" else parse_verdict(reply, sample.cwe)
    return Result(
        sample_id=sample.id,
        pair_id=sample.pair_id,
        cwe=sample.cwe,
        label=sample.label,
        split=sample.split,
        source=sample.source,
        prompt_id=job.prompt_id,
        mode=mode,
        response=reply,
        verdict=verdict,
        score=None if score is None else round(float(score), 6),
        prompt_tokens=int(prompt_tokens),
        new_tokens=int(new_tokens),
        seconds=round(seconds, 4),
        steering=job.steering.label if job.steering else None,
        turns=list(history),
        final_score=None if final_score is None else round(float(final_score), 6),
        final_verdict=None if final_score is None else _score_verdict(final_score),
    )
