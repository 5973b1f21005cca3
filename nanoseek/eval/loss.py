"""Validation loss and bits per byte.

Loss per token depends on the tokenizer (a bigger vocabulary packs more text into a token, so its
per-token loss is higher for the same model quality). Bits per byte does not: it is the total
negative log-likelihood in bits divided by the number of UTF-8 bytes those tokens stand for, so
runs with different tokenizers compare on one scale. Special tokens (`<|eos|>`, …) stand for no
bytes of text; they are left out of both sums, as in nanochat's evaluation.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F


def token_bytes(tokenizer, vocab_size: int | None = None) -> torch.Tensor:
    """(V,) int64: UTF-8 bytes each token id decodes to; 0 for special and unused ids.

    Byte-level BPE writes every byte as one printable character, so a token's byte count is the
    length of its string form.
    """
    from ..tokenizer import SPECIAL_TOKENS

    V = vocab_size or tokenizer.vocab_size
    out = torch.zeros(V, dtype=torch.int64)
    for i in range(len(SPECIAL_TOKENS), min(V, tokenizer.vocab_size)):
        tok = tokenizer.id_to_token(i)
        out[i] = len(tok) if tok is not None else 0
    return out


@torch.no_grad()
def evaluate_loss(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device="cpu",
                  token_nbytes: torch.Tensor | None = None, autocast_dtype: torch.dtype | None = None) -> dict:
    """Mean next-token loss (nats) over `batches`, and bits per byte when `token_nbytes` is given.

    Only the main head is scored (MTP is a training signal, not part of the model's prediction).
    The model is put back in the mode it was in.
    """
    was_training = model.training
    model.eval()
    nll_sum, n_tok, nll_text, n_bytes = 0.0, 0, 0.0, 0
    dev_type = torch.device(device).type
    try:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with torch.autocast(dev_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                logits = model(x)
            nll = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none", ignore_index=-100)
            keep = y.flatten() != -100
            nll_sum += float(nll[keep].sum())
            n_tok += int(keep.sum())
            if token_nbytes is not None:
                nb = token_nbytes.to(y.device)[y.flatten().clamp(min=0)] * keep
                nll_text += float((nll * (nb > 0)).sum())
                n_bytes += int(nb.sum())
    finally:
        model.train(was_training)
    out = {"val_loss": nll_sum / max(n_tok, 1), "val_tokens": n_tok}
    if token_nbytes is not None:
        out["val_bpb"] = nll_text / (math.log(2) * max(n_bytes, 1))
    return out
