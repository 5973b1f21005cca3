"""Calibration sequences (Wanda's activation norms) and the validation figures of a variant.

Both come from `--calib`, read as every training stage reads its data (nanoseek/train/data.py):
calibration windows from its training stream, validation from its held-out stream, so a
variant is never scored on the text it was calibrated on.
"""

from __future__ import annotations

import numpy as np
import torch


def streams(cfg, tok):
    from ..train.data import open_streams

    return open_streams(cfg.calib, tok)


def calib_batches(cfg, tok, batch: int = 8) -> list[torch.Tensor]:
    """`calib_samples` windows of `seq_len` tokens at seeded positions of the training stream."""
    train, _ = streams(cfg, tok)
    rng = np.random.default_rng(cfg.seed)
    starts = rng.integers(0, max(1, len(train) - cfg.seq_len), size=cfg.calib_samples)
    rows = torch.from_numpy(np.stack([train.window(int(s), cfg.seq_len) for s in starts]))
    return list(rows.split(batch))


def validation(model, tok, cfg, batch: int = 8) -> dict:
    """Validation loss (nats per token) and bits per byte of `model` on the held-out stream."""
    from ..eval.loss import evaluate_loss, token_bytes
    from ..train.data import val_batches

    _, val = streams(cfg, tok)
    nbytes = token_bytes(tok, model.config.vocab_size)
    return evaluate_loss(model, val_batches(val, batch, cfg.seq_len, cfg.val_tokens), token_nbytes=nbytes)
