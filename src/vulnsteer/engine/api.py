"""Models behind an OpenAI-compatible endpoint (`--model openai:NAME --base-url URL`: vLLM, llama.cpp's server,
hosted APIs) answer the same jobs as a local model: the same messages and follow-up turns, greedy decoding, the same
verdict parser, rows of the same form, so both land in one table.

Score mode (and generate mode's forced final yes/no turn) sends the conversation with the assistant turn prefilled
with "Answer:", as a local run renders it, asks for one token with its top log-probabilities, and takes
log P(yes) - log P(no) over the yes/no tokens among them. A side missing from the top k is bounded by the k-th
log-probability (the score leans towards 0, never past it); neither present: no answer. Servers that do not continue
a final assistant message (OpenAI's own) answer a fresh turn instead: the score then reads that turn's first token.

Requests run `concurrency` at a time; the OpenAI client retries 429s, 5xx and dropped connections with exponential
back-off (`retries` times, honouring Retry-After) and gives each request `timeout` seconds. The key is read from the
environment variable `api_key_env` and is never written anywhere.
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from vulnsteer.engine.evaluate import make_result
from vulnsteer.errors import VulnsteerError
from vulnsteer.prompts import ANSWER_PREFIX, FINAL_QUESTION
from vulnsteer.records import Decoding, Job, Result

PREFIX = "openai:"


@dataclass(frozen=True)
class ApiModel:
    name: str
    base_url: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    timeout: float = 120.0
    retries: int = 5
    top_logprobs: int = 20  # OpenAI's maximum

    def __post_init__(self):
        if not self.base_url:
            raise VulnsteerError(
                f"--model {PREFIX}{self.name} needs --base-url (or --model-args base_url=URL), e.g. "
                "http://127.0.0.1:8080/v1"
            )
        if self.concurrency < 1 or self.timeout <= 0 or self.retries < 0:
            raise VulnsteerError("--concurrency must be >= 1, --timeout > 0 and --retries >= 0")

    @property
    def model_id(self) -> str:
        return PREFIX + self.name

    @property
    def meta(self) -> dict:
        """What identifies the model in result files (not the key)."""
        return {"model": self.model_id, "base_url": self.base_url, "config_hash": None, "weights": None, "dtype": None}


def yes_no_score(top: Sequence[tuple[str, float]]) -> float | None:
    """log P(yes) - log P(no) from (token, log-probability) pairs of one position's top k (see the module
    docstring for a missing side)."""
    sides: dict[str, list[float]] = {"yes": [], "no": []}
    for token, logprob in top:
        word = token.strip().lower()
        if word in sides:
            sides[word].append(logprob)
    if not sides["yes"] and not sides["no"]:
        return None
    floor = min(logprob for _, logprob in top)
    yes, no = (math.log(sum(math.exp(v) for v in sides[w])) if sides[w] else floor for w in ("yes", "no"))
    return yes - no


class _Client:
    def __init__(self, api: ApiModel):
        try:
            from openai import OpenAI
        except ImportError as exc:
            raise VulnsteerError("--model openai:NAME needs the OpenAI client: pip install 'vulnsteer[api]'") from exc
        self.api = api
        self.client = OpenAI(
            base_url=api.base_url,
            api_key=os.environ.get(api.api_key_env) or "none",
            timeout=api.timeout,
            max_retries=api.retries,
        )

    def reply(self, messages: list[dict], max_tokens: int) -> tuple[str, int, int]:
        """Greedy reply: (text, prompt tokens, new tokens)."""
        response = self.client.chat.completions.create(
            model=self.api.name,
            messages=messages,  # type: ignore
            max_tokens=max_tokens,
            temperature=0,
        )
        usage = response.usage
        return (
            response.choices[0].message.content or "",
            usage.prompt_tokens if usage else 0,
            usage.completion_tokens if usage else 0,
        )

    def score(self, messages: list[dict]) -> tuple[float | None, int]:
        """The yes/no log-odds after "Answer:": (score, prompt tokens)."""
        response = self.client.chat.completions.create(
            model=self.api.name,
            messages=[*messages, {"role": "assistant", "content": ANSWER_PREFIX}],  # type: ignore
            max_tokens=1,
            temperature=0,
            logprobs=True,
            top_logprobs=self.api.top_logprobs,
        )
        content = response.choices[0].logprobs.content if response.choices[0].logprobs else None
        if not content:
            raise VulnsteerError(
                f"{self.api.base_url} returned no log-probabilities; score mode needs a server "
                "that does (use --mode generate)"
            )
        top = [(t.token, t.logprob) for t in content[0].top_logprobs]
        return yes_no_score(top), response.usage.prompt_tokens if response.usage else 0

    def answer(self, job: Job, decoding: Decoding) -> Result:
        """One row, turn by turn as the local engine runs it."""
        start = time.perf_counter()
        messages, history = list(job.prompt.messages), []
        followups = list(job.prompt.followups)
        reply, prompt_tokens, new_tokens, score, final = "", 0, 0, None, None
        for turn in range(len(followups) + 1):
            if turn == len(followups) and decoding.mode == "score":
                score, prompt_tokens = self.score(messages)
                break
            reply, prompt_tokens, new_tokens = self.reply(messages, decoding.max_new_tokens)
            reply = reply.strip()
            if turn < len(followups):
                history.append(reply)
                messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": followups[turn]}]
        if decoding.mode == "generate" and decoding.final_answer:
            final, _ = self.score(
                [*messages, {"role": "assistant", "content": reply}, {"role": "user", "content": FINAL_QUESTION}]
            )
        return make_result(
            job, decoding.mode, reply, score, prompt_tokens, new_tokens, time.perf_counter() - start, history, final
        )


def _one_line(api: ApiModel, exc: Exception) -> VulnsteerError:
    import openai

    if isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError)):
        return VulnsteerError(f"{api.base_url} refused the key in ${api.api_key_env} (HTTP {exc.status_code})")
    if isinstance(exc, openai.NotFoundError):
        return VulnsteerError(f"{api.base_url} has no model {api.name!r} (HTTP 404)")
    if isinstance(exc, openai.APITimeoutError):
        return VulnsteerError(
            f"{api.base_url} did not answer within --timeout {api.timeout:g} s ({api.retries} retries)"
        )
    if isinstance(exc, openai.APIConnectionError):
        return VulnsteerError(f"cannot connect to {api.base_url} ({api.retries} retries): {exc.__cause__ or exc}")
    if isinstance(exc, openai.APIStatusError):
        return VulnsteerError(f"{api.base_url} answered HTTP {exc.status_code}: {str(exc.message).splitlines()[0]}")
    return VulnsteerError(f"{api.base_url}: {type(exc).__name__}: {exc}")


def evaluate_api(
    api: ApiModel,
    jobs: Sequence[Job],
    decoding: Decoding,
    progress: Callable[[int], None] | None = None,
    on_result: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Every job through the endpoint, `api.concurrency` at a time; results in the order of `jobs`, each given to
    `on_result` as it arrives. The first failure stops the run (finished rows are already with `on_result`)."""
    client = _Client(api)
    results: list[Result | None] = [None] * len(jobs)
    pool = ThreadPoolExecutor(api.concurrency)
    try:
        pending: dict[Any, int] = {pool.submit(client.answer, job, decoding): i for i, job in enumerate(jobs)}
        while pending:
            # Each result is handed on as soon as it is in, so a run cut short keeps every row that finished.
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in sorted(done, key=lambda f: f.exception() is not None):  # finished rows before a failure
                i = pending.pop(future)
                exc = future.exception()
                if exc is not None:
                    raise (exc if isinstance(exc, VulnsteerError) else _one_line(api, exc)) from None  # type: ignore
                results[i] = future.result()
                if on_result:
                    on_result(results[i])  # type: ignore[arg-type]
                if progress:
                    progress(1)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # requests not yet sent are dropped
    return results  # type: ignore[return-value]
