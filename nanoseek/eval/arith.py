"""Held-out addition accuracy of a *base* (pretrained, not chat) model, by greedy decoding.

The model is shown the corpus format's prompt, 'Q: 37+45\\nA:', and continues it; the answer is
the number after the first '####' (`tasks.parse_pretrain_answer`). Problems come from the
arithmetic task's test split, whose keys the pretraining corpus never contains, so a correct
answer means the model learnt column addition, not the table.

Prompts are batched by token length (equal lengths need no padding) and decoded over the latent
cache; a row stops mattering once its '#### N' line is complete, and the batch stops when all are.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from ..model.cache import DenseLatentCache
from ..tasks import ArithmeticTask, parse_pretrain_answer, pretrain_prompt


@torch.no_grad()
def greedy_continue(model, prompts: list[list[int]], max_new_tokens: int, done_fn=None,
                    device="cpu", check_every: int = 8) -> list[list[int]]:
    """Greedy continuations of equal-length prompts; `done_fn(new_ids) -> bool` may end a row early."""
    x = torch.tensor(prompts, device=device)
    B, T = x.shape
    cache = DenseLatentCache.for_model(model, B, T + max_new_tokens)
    new = torch.empty(B, 0, dtype=torch.long, device=device)
    step_in = x
    for i in range(max_new_tokens):
        nxt = model(step_in, cache=cache, logits_to_keep=1)[:, -1].argmax(-1)
        new = torch.cat([new, nxt[:, None]], 1)
        step_in = nxt[:, None]
        if done_fn is not None and (i + 1) % check_every == 0 and all(done_fn(r) for r in new.tolist()):
            break
    return new.tolist()


def _complete(text: str) -> bool:
    _, sep, rest = text.partition("####")
    return bool(sep) and "\n" in rest.lstrip(" ")


@torch.no_grad()
def addition_accuracy(model, tokenizer, n: int = 200, digits: int = 3, seed: int = 0,
                      batch_size: int = 64, max_new_tokens: int = 128, device="cpu",
                      return_samples: int = 0) -> dict:
    """Fraction of `n` held-out `digits`-digit two-number additions answered correctly.

    Returns {"accuracy", "n", "digits", "samples": [(prompt, continuation, truth, ok), ...]}.
    The model is returned to its previous train/eval mode.
    """
    problems = ArithmeticTask(digits=digits, ops="+", chain=2).make(n, seed, split="test")
    prefix = [tokenizer.eos_id]  # in the corpus a document starts right after an <|eos|>
    encoded = [prefix + tokenizer.encode(pretrain_prompt(p), allow_special=False) for p in problems]
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(encoded):
        by_len[len(ids)].append(i)
    was_training = model.training
    model.eval()
    texts: list[str] = [""] * n
    try:
        for _, idxs in sorted(by_len.items()):
            for s in range(0, len(idxs), batch_size):
                chunk = idxs[s:s + batch_size]
                outs = greedy_continue(model, [encoded[i] for i in chunk], max_new_tokens,
                                       done_fn=lambda r: _complete(tokenizer.decode(r)), device=device)
                for i, out in zip(chunk, outs):
                    texts[i] = tokenizer.decode(out)
    finally:
        model.train(was_training)
    oks = [parse_pretrain_answer(t) == p.answer for t, p in zip(texts, problems)]
    samples = [(pretrain_prompt(p), t.split("\n####")[0] + _answer_line(t), p.answer, ok)
               for p, t, ok in list(zip(problems, texts, oks))[:return_samples]]
    return {"accuracy": sum(oks) / n, "n": n, "digits": digits, "samples": samples}


def _answer_line(text: str) -> str:
    _, sep, rest = text.partition("####")
    return f"\n####{rest.split(chr(10), 1)[0] if rest.strip() else rest}" if sep else ""
