"""A tiny *scripted* checkpoint and an in-thread uvicorn server, for serve's tests and load benchmark.

Why scripted: a random model never writes ``<think>``, so reasoning_content could not be tested
end to end. Instead of faking the engine, we build a real (tiny, random) DeepSeek-V3 checkpoint
whose embedding and output head are set so that greedy decoding follows a fixed chain — each
token determines the next one:

    <|assistant|> → <think> → "\\n" → "Let" → " me" → " think" → </think> → "The" → " answer" → " is" → " yes" → "." → <|eos|>

So ``model=nanoseek`` answers ``reasoning_content="Let me think"``, ``content="The answer is yes."``,
and with the reasoner template (prompt ends ``<think>\\n``) the chain is entered at ``"\\n"``.
The transformer layers keep their random weights and run for real (MLA, MoE, the engine's
paged cache and prefix cache); they only nudge the residual stream, which the chain's margin
(``scale`` logits) dominates. Off the chain, logits are small and random, so sampling at
temperature > 0 wanders — which is what seed tests need.

How the chain is wired: chain tokens get orthonormal embeddings ``e_a``; after the final RMSNorm
the hidden state is ``≈ sqrt(d)·e_a``; the head row of ``next(a)`` is ``scale/sqrt(d)·e_a``, so
its logit is ``≈ scale`` while every other logit is ``O(scale/sqrt(d))`` or less.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

SCRIPT_WORDS = ["Let", " me", " think", "The", " answer", " is", " yes", "."]
REASONING = "Let me think"
CONTENT = "The answer is yes."


def _corpus() -> list[str]:
    base = ["Let me think. The answer is yes.", "Let me think about it. The answer is yes, it is.",
            "The quick brown fox jumps over the lazy dog.", "Cats and dogs are friends in this story.",
            "A serving system streams tokens to many clients at once."]
    return base * 50


def make_scripted_checkpoint(path, scale: float = 12.0, seed: int = 0, vocab_size: int = 320, **overrides) -> Path:
    """Write a tiny deepseek_v3 checkpoint + tokenizer whose greedy reply is the chain above
    (``overrides``: fields of the tiny preset, e.g. a longer ``max_position_embeddings``)."""
    import torch

    from nanoseek.checkpoint import save_pretrained
    from nanoseek.config import preset
    from nanoseek.model import DeepSeekV3
    from nanoseek.tokenizer import Tokenizer

    tok = Tokenizer.train(_corpus(), vocab_size=vocab_size)
    word_ids = []
    for w in SCRIPT_WORDS:
        ids = tok.encode(w)
        if len(ids) != 1:
            raise RuntimeError(f"scripted checkpoint: {w!r} is {len(ids)} tokens, expected 1")
        word_ids.append(ids[0])
    nl = tok.encode("\n")
    assert len(nl) == 1 and tok.encode("<think>\n") == [tok.think_id, nl[0]]
    chain = [tok.assistant_id, tok.think_id, nl[0], *word_ids[:3], tok.end_think_id, *word_ids[3:], tok.eos_id]

    torch.manual_seed(seed)
    cfg = preset("tiny", vocab_size=tok.vocab_size, **overrides)
    model = DeepSeekV3(cfg).float()
    d = cfg.hidden_size
    with torch.no_grad():
        emb = torch.randn(tok.vocab_size, d)
        emb = emb / emb.norm(dim=1, keepdim=True)
        q, _ = torch.linalg.qr(torch.randn(d, d))
        emb[chain] = q[: len(chain)]  # orthonormal: chain steps do not interfere
        model.embed_tokens.weight.copy_(emb)
        head = torch.zeros(tok.vocab_size, d)
        for a, b in zip(chain[:-1], chain[1:]):
            head[b] = scale / d**0.5 * emb[a]
        model.lm_head.weight.copy_(head)
    path = Path(path)
    save_pretrained(model, path, extra={"tokenizer": tok.save})
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1 in a daemon thread; ``with ServerThread(app) as url:``."""

    def __init__(self, app, port: int | None = None, log_level: str = "warning"):
        import uvicorn

        self.port = port or free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level=log_level,
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True, name=f"uvicorn-{self.port}")
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on port {self.port}")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
