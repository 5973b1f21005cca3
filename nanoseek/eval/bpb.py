"""Bits per byte of a checkpoint on held-out text: `nanoseek eval --bpb FILE|DIR --ckpt DIR`.

bpb = Σ −log₂ p(token | the tokens before it) over the text's tokens ÷ the text's UTF-8 bytes.
Per byte, not per token, so models with different tokenizers — and a raw corpus against a
curated one — are compared on the same held-out files (`nanoseek.eval.loss` explains why).

Each document is scored as training saw it: after an ``<|eos|>`` (the end of the document
before it), every one of its tokens predicted, the closing ``<|eos|>`` not (it stands for no
bytes). A document longer than ``seq_len`` tokens is scored in consecutive windows of
``seq_len`` targets; a window's tokens see only the window before them, as in training.
"""

from __future__ import annotations

from typing import Iterable

import torch

from .loss import evaluate_loss, token_bytes


def _windows(docs_ids: Iterable[list[int]], eos: int, seq_len: int, batch: int):
    """(x, y) batches of windows: x the seq_len inputs, y the next tokens, -100 past a document."""
    xs, ys = [], []
    for ids in docs_ids:
        seq = [eos, *ids]
        for start in range(0, len(seq) - 1, seq_len):
            x = seq[start:start + seq_len]
            y = seq[start + 1:start + seq_len + 1]
            xs.append(x + [eos] * (seq_len - len(x)))
            ys.append(y + [-100] * (seq_len - len(y)))
            if len(xs) == batch:
                yield torch.tensor(xs), torch.tensor(ys)
                xs, ys = [], []
    if xs:
        yield torch.tensor(xs), torch.tensor(ys)


def bits_per_byte(model, tok, docs: Iterable[str], seq_len: int, batch: int = 8, device="cpu") -> dict:
    """bpb of ``model`` on ``docs`` (texts), with the token and byte counts it rests on."""
    texts = list(docs)
    if not texts:
        raise ValueError("no documents to score")
    ids = tok.encode_batch(texts, allow_special=False)
    V = model.config.vocab_size
    nbytes = token_bytes(tok, V)
    r = evaluate_loss(model, _windows(ids, tok.eos_id, seq_len, batch), device, nbytes)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return {"bpb": r["val_bpb"], "loss": r["val_loss"], "tokens": r["val_tokens"], "bytes": n_bytes,
            "docs": len(texts)}


def eval_bpb(cfg) -> dict:
    """`nanoseek eval --bpb SPEC --ckpt DIR`: bits per byte of the checkpoint on SPEC's documents."""
    from ..checkpoint import ckpt_flag, load_pretrained
    from ..data.sources import iter_documents
    from ..engine.engine import check_device
    from ..tokenizer import Tokenizer

    path = ckpt_flag(cfg.ckpt)
    check_device(cfg.device)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tok = Tokenizer.load(path)
    model = load_pretrained(path, device=device)
    seq_len = cfg.seq_len or model.config.max_position_embeddings
    skipped: list[tuple[str, str]] = []
    res = bits_per_byte(model, tok, iter_documents(cfg.bpb, skipped=skipped), seq_len, device=device)
    return {"bpb_data": cfg.bpb, "seq_len": seq_len, **res, "files_skipped": [p for p, _ in skipped]}
