"""Reasoning traces for distillation by rejection sampling: R1-Distill's data recipe.

`nanoseek distill traces --teacher RUN --task arithmetic --n 1000 --k 4 --out traces/`
`nanoseek distill traces --teacher-url http://127.0.0.1:8000 --task gsm8k --out traces/`

K samples per training problem from the teacher — through nanoseek's engine, or from any
OpenAI/DeepSeek-compatible chat-completions server (`nanoseek serve`, DeepSeek's own API) — and
only the ones the task's verifier accepts are kept: a distilled student learns from the
teacher's *correct* reasoning, not from its mistakes. A sample is kept when it thought (a
`<think>` trace), stopped by itself (not cut at --max-new-tokens) and its answer checks;
identical samples of a problem are kept once.

OUT/traces.jsonl holds one chat per line in the form `nanoseek sft` and `nanoseek distill` read:

    {"messages": [{"role": "user", "content": PROMPT},
                  {"role": "assistant", "reasoning_content": THOUGHT, "content": ANSWER}]}

and OUT/summary.json the counts: acceptance (verified samples / samples), problems solved,
why the others were rejected, and the tokens generated and kept. Both paths split a completion
into thought and answer with the API server's own splitter and derive each sample's seed from
(--seed, problem, sample) alike, so a local teacher and the same teacher behind `nanoseek serve`
give the same file.
"""
from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..eval.tasks import sample_seed

TRACES, SUMMARY = "traces.jsonl", "summary.json"


@dataclass
class TracesConfig:
    """`nanoseek distill traces`: rejection-sampled, verified reasoning traces from a teacher."""

    task: str = field(metadata={"help": "arithmetic | countdown | gsm8k: the problems and their verifier"})
    out: str = field(metadata={"help": f"output directory: {TRACES} (chat jsonl for sft/distill) and {SUMMARY}"})
    teacher: str | None = field(default=None, metadata={"help": "teacher checkpoint, or any stage's run directory"})
    teacher_url: str | None = field(default=None, metadata={
        "help": "an OpenAI/DeepSeek-compatible server instead of --teacher (e.g. http://127.0.0.1:8000 for "
                "`nanoseek serve`; /v1 is appended when missing)"})
    api_key: str | None = field(default=None, metadata={"help": "Bearer key for --teacher-url (default: $OPENAI_API_KEY)"})
    model: str = field(default="nanoseek", metadata={"help": "model id sent to --teacher-url (DeepSeek's API: deepseek-reasoner)"})
    task_args: dict = field(default_factory=dict, metadata={"help": 'task knobs as JSON, e.g. {"digits": 3}'})
    n: int = field(default=1000, metadata={"help": "training-split problems to sample"})
    k: int = field(default=4, metadata={"help": "samples per problem (1 when --temperature is 0: greedy samples are equal)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (0 = greedy)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling"})
    max_new_tokens: int = field(default=256, metadata={"help": "tokens per sample at most; a sample cut there is rejected"})
    seed: int = field(default=0, metadata={"help": "pins the problems and every sample's seed"})
    max_num_seqs: int = field(default=256, metadata={"help": "local teacher: samples decoded together"})
    concurrency: int = field(default=8, metadata={"help": "--teacher-url: requests in flight at once"})
    device: str | None = field(default=None, metadata={"help": "local teacher: cpu | cuda (default: cuda if available)"})
    overwrite: bool = field(default=False, metadata={"help": f"replace an existing OUT/{TRACES}"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self) -> None:
        """One line naming the flag for every bad value, before a model is loaded or a request sent."""
        from ..engine.engine import check_device
        from ..tasks import task_from_flags

        if (self.teacher is None) == (self.teacher_url is None):
            raise ValueError("give exactly one of --teacher DIR or --teacher-url URL")
        if self.teacher is not None:
            from ..checkpoint import ckpt_flag

            ckpt_flag(self.teacher, "--teacher")
        elif not self.teacher_url.startswith(("http://", "https://")):
            raise ValueError(f"--teacher-url {self.teacher_url!r}: expected an http:// or https:// URL")
        for name in ("n", "k", "max_new_tokens", "max_num_seqs", "concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be ≥ 1")
        if not 0 <= self.temperature < math.inf:
            raise ValueError(f"--temperature {self.temperature}: must be a finite number ≥ 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p {self.top_p}: must be in (0, 1]")
        task_from_flags(self.task, self.task_args)
        if Path(self.out).is_file():
            raise FileExistsError(f"--out {self.out}: is a file; expected a directory")
        if (Path(self.out) / TRACES).exists() and not self.overwrite:
            raise FileExistsError(f"--out {self.out} already holds {TRACES}: pass --overwrite to replace it, "
                                  "or choose another --out")
        check_device(self.device)

    @property
    def samples_per_problem(self) -> int:
        return 1 if self.temperature == 0 else self.k


@dataclass
class Sample:
    """One teacher completion, split as the API splits it."""

    problem: int
    reasoning: str | None  # None: the completion never opened <think>
    content: str
    tokens: int  # completion tokens generated
    truncated: bool  # stopped by the length limit, not by itself


def local_samples(cfg: TracesConfig, problems) -> Iterator[Sample]:
    """Samples through nanoseek's engine, `max_num_seqs` at a time."""
    from ..checkpoint import ckpt_flag
    from ..engine import Engine, SamplingParams
    from ..serve.reasoning import split_reasoning
    from ..tasks.base import generated_text
    from ..tokenizer import Tokenizer
    from ..train.grpo import build_prompt

    path = ckpt_flag(cfg.teacher, "--teacher")
    tok = Tokenizer.load(path)
    engine = Engine(path, tok, device=cfg.device, max_num_seqs=cfg.max_num_seqs)
    k = cfg.samples_per_problem
    jobs = [(i, j) for i in range(len(problems)) for j in range(k)]
    for lo in range(0, len(jobs), cfg.max_num_seqs):
        chunk = jobs[lo:lo + cfg.max_num_seqs]
        prompts = [build_prompt(problems[i], tok, "chat") for i, _ in chunk]
        params = [SamplingParams(max_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                 seed=sample_seed(cfg.seed, i, j)) for i, j in chunk]
        for (i, _), out in zip(chunk, engine.generate(prompts, params)):
            reasoning, content = split_reasoning(generated_text(tok.decode(out.token_ids)))
            yield Sample(i, reasoning, content, len(out.token_ids), out.finish_reason == "length")


def remote_samples(cfg: TracesConfig, problems) -> Iterator[Sample]:
    """Samples from a chat-completions server, `concurrency` requests in flight; in order."""
    try:
        import openai
    except ImportError:
        raise ValueError("--teacher-url needs the openai client: pip install openai") from None
    url = cfg.teacher_url.rstrip("/")
    client = openai.OpenAI(base_url=url if url.endswith("/v1") else url + "/v1",
                           api_key=cfg.api_key or os.environ.get("OPENAI_API_KEY") or "none", max_retries=3,
                           timeout=600)

    def one(job: tuple[int, int]) -> Sample:
        i, j = job
        try:
            r = client.chat.completions.create(
                model=cfg.model, messages=[{"role": "user", "content": problems[i].prompt}],
                temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens,
                seed=sample_seed(cfg.seed, i, j))
        except openai.APIError as e:
            raise ValueError(f"--teacher-url {cfg.teacher_url}: {e}") from None
        choice = r.choices[0]
        # DeepSeek's field; the openai client keeps unknown fields as attributes
        reasoning = getattr(choice.message, "reasoning_content", None)
        return Sample(i, reasoning, choice.message.content or "", r.usage.completion_tokens if r.usage else 0,
                      choice.finish_reason == "length")

    jobs = [(i, j) for i in range(len(problems)) for j in range(cfg.samples_per_problem)]
    with ThreadPoolExecutor(cfg.concurrency) as pool:
        yield from pool.map(one, jobs)


def verdict(task, problem, s: Sample) -> str:
    """'kept' for a sample worth learning from, else why not: 'truncated', 'no_think', 'wrong'.
    The answer is read from the chat rendering of the row (the eval's contract), so what is
    kept is what the student will be trained on."""
    if s.truncated:
        return "truncated"
    if s.reasoning is None:
        return "no_think"
    return "kept" if task.check(task.parse(f"<think>\n{s.reasoning}\n</think>\n{s.content}"), problem) else "wrong"


def row(problem, s: Sample) -> dict:
    return {"messages": [{"role": "user", "content": problem.prompt},
                         {"role": "assistant", "reasoning_content": s.reasoning, "content": s.content}]}


def traces(cfg: TracesConfig) -> dict:
    """Rejection-sample verified reasoning traces from a teacher into a chat jsonl."""
    from tqdm import tqdm

    from ..tasks import get_task

    task = get_task(cfg.task, **cfg.task_args)
    problems = task.make(cfg.n, cfg.seed, split="train")
    total = len(problems) * cfg.samples_per_problem
    source = cfg.teacher or cfg.teacher_url
    print(f"traces: {len(problems)} {cfg.task} problems × {cfg.samples_per_problem} samples from {source} "
          f"(temperature {cfg.temperature})", flush=True)
    counts = {"kept": 0, "wrong": 0, "truncated": 0, "no_think": 0}
    rows: list[dict] = []
    seen: set[tuple] = set()
    solved: set[int] = set()
    gen_tokens = kept_tokens = 0
    t0 = time.time()
    samples = local_samples(cfg, problems) if cfg.teacher else remote_samples(cfg, problems)
    bar = tqdm(total=total, desc="traces", unit="sample", dynamic_ncols=True, disable=not cfg.progress)
    for s in samples:
        why = verdict(task, problems[s.problem], s)
        counts[why] += 1
        gen_tokens += s.tokens
        if why == "kept":
            solved.add(s.problem)
            key = (s.problem, s.reasoning, s.content)
            if key not in seen:
                seen.add(key)
                rows.append(row(problems[s.problem], s))
                kept_tokens += s.tokens
        bar.update(1)
        bar.set_postfix(accept=f"{counts['kept'] / sum(counts.values()):.2f}", rows=len(rows), refresh=False)
    bar.close()
    seconds = time.time() - t0
    summary = {"task": cfg.task, "task_args": cfg.task_args, "teacher": source, "problems": len(problems),
               "samples": total, "verified": counts["kept"], "acceptance": counts["kept"] / total,
               "rejected": {k: v for k, v in counts.items() if k != "kept"}, "solved": len(solved),
               "rows": len(rows), "duplicates": counts["kept"] - len(rows), "completion_tokens": gen_tokens,
               "kept_tokens": kept_tokens, "seconds": round(seconds, 1),
               "tokens_per_s": round(gen_tokens / max(seconds, 1e-9), 1)}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / TRACES, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    _write_atomic(out / SUMMARY, json.dumps(summary, indent=2) + "\n")
    print(f"traces: {counts['kept']} of {total} samples verified (acceptance {summary['acceptance']:.1%}), "
          f"{len(solved)} of {len(problems)} problems solved; rejected {summary['rejected']}; "
          f"{len(rows)} distinct rows ({summary['duplicates']} duplicates dropped), {kept_tokens} of "
          f"{gen_tokens} generated tokens kept, {seconds:.0f} s → {out / TRACES}", flush=True)
    if not rows:
        print("traces: no sample was verified: nothing to distill from (check the teacher on this task with "
              "`nanoseek eval`)", flush=True)
    return summary


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
