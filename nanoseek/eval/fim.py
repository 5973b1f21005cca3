"""Hidden-line exact match: does a code model fill in one line of a held-out function?

For each function of held-out Python code (any depth, at most ``max_chars`` long, so that the
prompt fits a small model's context), one single-line statement of its body is hidden, chosen by
the seed. The model is asked for it greedily in two ways:

* ``fim``: the FIM prompt (``Tokenizer.fim_prompt``) with the function's lines before the hole
  as prefix and its lines after as suffix; the answer is the generated text up to the first
  newline (generation stops there or at ``<|eos|>``).
* ``prefix``: left to right from the prefix alone, as a model without FIM must. The prompt ends
  before the prefix's last newline, so that the newline and the indentation are generated as the
  tokenizer would have cut them in running text; the answer is the line after that newline.

A hit is the hidden line exactly, indentation included (trailing spaces aside); the edit
similarity (difflib's ratio of matching characters, 0 for no line) credits a near miss, as
code-completion benchmarks do. The same holes are asked in both ways, so the two compare what
the suffix adds.
"""

from __future__ import annotations

import ast
import difflib
import random
from dataclasses import dataclass

MODES = ("fim", "prefix")


@dataclass(frozen=True)
class Hole:
    source: str  # where the function comes from: document index and the function's name
    prefix: str  # the function's lines before the hidden one (ends with a newline)
    line: str  # the hidden line, without its newline
    suffix: str  # the function's lines after it


def _candidates(fn: ast.AST) -> list[int]:
    """0-based line numbers of the one-line statements in ``fn``'s body (no docstring)."""
    out = []
    for node in ast.walk(fn):
        if node is fn or not isinstance(node, ast.stmt) or node.lineno != node.end_lineno:
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            continue  # a docstring or bare string: prose, not code
        out.append(node.lineno - 1)
    return sorted(set(out))


def holes(documents, n: int, seed: int = 0, max_chars: int = 1200) -> list[Hole]:
    """At most ``n`` holes, one per function, from Python source texts (ones that do not parse
    are skipped), sampled with ``seed``."""
    rng = random.Random(f"fim-holes:{seed}")
    found = []
    for d, text in enumerate(documents):
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        lines = text.splitlines(keepends=True)
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            start, end = fn.lineno - 1, fn.end_lineno  # decorators stay out: the def line opens the prefix
            body = lines[start:end]
            if not body or sum(map(len, body)) > max_chars or not body[-1].endswith("\n"):
                continue
            # a line of its own, worth asking for: no `a; b`, no comment to copy, not a bare `pass`
            cands = [i for i in _candidates(fn) if i > start and len(lines[i].strip()) >= 5
                     and ";" not in lines[i] and "#" not in lines[i]]
            if cands:
                found.append((f"{d}:{fn.name}", lines, start, end, cands))
    rng.shuffle(found)
    out = []
    for name, lines, start, end, cands in found[:n]:
        i = rng.choice(cands)
        out.append(Hole(name, "".join(lines[start:i]), lines[i].rstrip("\n"), "".join(lines[i + 1:end])))
    return out


def prompt_ids(tok, hole: Hole, mode: str) -> list[int]:
    if mode == "fim":
        return tok.fim_prompt(hole.prefix, hole.suffix)
    return tok.encode(hole.prefix[:-1], allow_special=False)


def answer(text: str, mode: str) -> str | None:
    """The line the model proposed, or None when its text does not contain one."""
    if mode == "prefix":
        if not text.startswith("\n"):
            return None
        text = text[1:]
    return text.split("\n", 1)[0]


def exact_match(engine, tok, hole_list: list[Hole], modes=MODES, max_tokens: int = 48) -> dict:
    """{"n": …, "<mode>_exact_match": rate, "<mode>_edit_similarity": mean, "samples": a few
    (hidden, fim, prefix) lines}."""
    from ..engine import SamplingParams

    # a hole whose prompt (either way) leaves no room for the answer in the context is not asked
    prompts = [{m: prompt_ids(tok, h, m) for m in modes} for h in hole_list]
    keep = [i for i, p in enumerate(prompts) if max(map(len, p.values())) + max_tokens <= engine.max_context]
    hole_list, prompts = [hole_list[i] for i in keep], [prompts[i] for i in keep]
    res: dict = {"n": len(hole_list)}
    got: dict[str, list] = {}
    for mode in modes:
        stop = ["\n"] if mode == "fim" else []  # prefix mode must first generate the newline
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=stop)
        outs = engine.generate([p[mode] for p in prompts], params)
        got[mode] = [answer(o.text, mode) for o in outs]
        pairs = [(a.rstrip() if a is not None else None, h.line.rstrip()) for a, h in zip(got[mode], hole_list)]
        res[f"{mode}_exact_match"] = sum(a == b for a, b in pairs) / max(1, len(pairs))
        res[f"{mode}_edit_similarity"] = sum(difflib.SequenceMatcher(None, a, b).ratio() if a is not None else 0.0
                                             for a, b in pairs) / max(1, len(pairs))
    res["samples"] = [{"source": h.source, "hidden": h.line, **{m: got[m][i] for m in modes}}
                      for i, h in enumerate(hole_list[:8])]
    return res
