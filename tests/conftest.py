"""Shared fixtures: a small arithmetic tokenizer and a tiny random checkpoint that carries it."""

import pytest
import torch

from nanoseek.checkpoint import save_pretrained
from nanoseek.config import preset
from nanoseek.model import DeepSeekV3
from nanoseek.tasks import ArithmeticTask, cold_start_sft
from nanoseek.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny
    matmuls gain nothing from a second thread, and on a shared 2-core machine OpenMP's spinning
    workers make them ~100× slower; restored after the module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    texts = [c["messages"][0]["content"] + c["messages"][1]["reasoning_content"]
             for c in cold_start_sft(ArithmeticTask(), 200, 0)]
    return Tokenizer.train(texts, vocab_size=300)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok):
    torch.manual_seed(0)
    model = DeepSeekV3(preset("tiny", vocab_size=tok.vocab_size))
    d = tmp_path_factory.mktemp("base") / "base"
    save_pretrained(model, d, extra={"tokenizer": lambda p: tok.save(p)})
    return d


def sharp_tiny(seed: int = 0, **overrides) -> DeepSeekV3:
    """A random tiny model whose argmax (and expert choice) is robust to float noise: random tiny
    models have near-tied logits, and batching/padding legitimately changes the last bits."""
    torch.manual_seed(seed)
    m = DeepSeekV3(preset("tiny", **overrides)).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(25)
        for moe in m.moe_layers():
            moe.gate.weight.mul_(20)
    return m
