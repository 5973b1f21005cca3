"""The open-weights promise, checked: a nanoseek checkpoint is a transformers checkpoint.

`transformers_roundtrip` saves a model, loads the directory with transformers'
`DeepseekV3ForCausalLM`, writes it back with transformers' `save_pretrained`, loads that with
nanoseek, and reports how far apart the logits are. The demo prints it; tests assert it.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class RoundTrip:
    max_abs_diff_hf: float  # nanoseek vs transformers on nanoseek's file
    max_abs_diff_back: float  # nanoseek (reloaded from transformers' file) vs transformers
    same_greedy: bool


def transformers_roundtrip(model, tokens: int = 16, seed: int = 0) -> RoundTrip:
    import transformers

    from . import load_model
    from .checkpoint import save_pretrained

    cls = transformers.DeepseekV2ForCausalLM if model.config.is_v2 else transformers.DeepseekV3ForCausalLM
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=g)
    model = model.eval()
    transformers.logging.set_verbosity_error()  # its load report would drown the answer
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_pretrained(model, Path(d) / "ours")
        hf = cls.from_pretrained(Path(d) / "ours", dtype=torch.float32).eval()
        hf.save_pretrained(Path(d) / "theirs")
        back = load_model(Path(d) / "theirs")
        with torch.no_grad():
            ours, theirs, again = model(ids), hf(ids).logits, back(ids)
            g1 = model.generate(ids[:, :8], tokens)
            g2 = hf.generate(ids[:, :8], max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    return RoundTrip((ours - theirs).abs().max().item(), (again - theirs).abs().max().item(),
                     bool(torch.equal(g1, g2)))
