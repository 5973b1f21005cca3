"""Held-out addition accuracy of a *base* (pretrained, not chat) model, by greedy decoding.

The model is shown the corpus format's prompt, 'Q: 37+45\\nA:', and continues it; the answer is
the number after the first '####' (`tasks.parse_pretrain_answer`). Problems come from the
arithmetic task's test split, whose keys the pretraining corpus never contains, so a correct
answer means the model learnt column addition, not the table.

Decoding is the inference engine's (greedy, stopping at the <|eos|> that closes a corpus
document), the one way nanoseek generates; the model's plain forward is the reference the engine
is tested against.
"""

from __future__ import annotations

import torch

from ..tasks import ArithmeticTask, parse_pretrain_answer, pretrain_prompt


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
    was_training = model.training
    try:
        from ..engine import Engine, SamplingParams

        engine = Engine(model, tokenizer, max_num_seqs=batch_size)
        outs = engine.generate(encoded, SamplingParams(max_tokens=max_new_tokens, temperature=0.0))
        texts = [tokenizer.decode(o.token_ids) for o in outs]
    finally:
        model.train(was_training)
    oks = [parse_pretrain_answer(t) == p.answer for t, p in zip(texts, problems)]
    samples = [(pretrain_prompt(p), t.split("\n####")[0] + _answer_line(t), p.answer, ok)
               for p, t, ok in list(zip(problems, texts, oks))[:return_samples]]
    return {"accuracy": sum(oks) / n, "n": n, "digits": digits, "samples": samples}


def _answer_line(text: str) -> str:
    _, sep, rest = text.partition("####")
    return f"\n####{rest.split(chr(10), 1)[0] if rest.strip() else rest}" if sep else ""
