"""Token healing and the engine's allowed-token mask (nanoseek/engine/constraints.py): a prompt that
ends mid-token is continued as if its last token had been left for the model to choose, under
greedy and seeded sampling, batched and with speculative decoding on; the text never repeats the
backed-up bytes."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from conftest import sharp_tiny
from nanoseek.engine import Engine, SamplingParams
from nanoseek.engine.constraints import Grammar, TextPrefix, VocabIndex
from nanoseek.engine.detok import bytes_to_unicode
from nanoseek.tokenizer import EXTRA_TOKENS, SPECIAL_TOKENS, Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

HEALED, PLAIN = "def f(n):\n    ", "def f(n):\n"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    """A byte-level BPE whose merges build runs of spaces (" "×2, ×4, ×8) and a few code words, but
    never join a newline to the spaces after it: "def f(n):\\n    " ends in the one token "    ",
    the prompt-ends-mid-token case of the issue (DeepSeek-V3's own pre-tokenizer splits newlines
    from the indentation the same way)."""
    byte = bytes_to_unicode()
    sp = byte[ord(" ")]
    merges = [(sp, sp), (sp * 2, sp * 2), (sp * 4, sp * 4), ("d", "e"), ("de", "f"), ("r", "e"), ("t", "u"),
              ("re", "tu"), ("retu", "r"), ("retur", "n"), (sp, "return"), (sp, "n"), (sp, "f")]
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + EXTRA_TOKENS)}
    for ch in byte.values():
        vocab[ch] = len(vocab)
    for a, b in merges:
        vocab[a + b] = len(vocab)
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS + EXTRA_TOKENS)
    t = Tokenizer(backend)
    assert [t.decode([i]) for i in t.encode(HEALED)[-2:]] == ["\n", "    "]
    return t


@pytest.fixture(scope="module")
def engine(tok):
    return Engine(sharp_tiny(vocab_size=tok.vocab_size), tok, max_num_seqs=8)


def _index(engine) -> VocabIndex:
    return VocabIndex(engine._table, engine.tokenizer.special_ids, engine.config.vocab_size)


def _starts_with_spaces(engine, params: SamplingParams) -> SamplingParams:
    """The same params, with the first token(s) constrained to spell four spaces."""
    index = _index(engine)
    return SamplingParams(**{**params.__dict__, "constraint": lambda: TextPrefix(index, b"    ")})


@pytest.mark.parametrize("params", [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                                    SamplingParams(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)],
                         ids=["greedy", "seeded"])
def test_healed_prompt_continues_as_the_constrained_shorter_prompt(engine, params):
    """"def f(n):\\n    " healed = "def f(n):\\n" with its first token(s) constrained to spell the four
    spaces: the same tokens; the healed reply's text leaves out the spaces the prompt already has."""
    healed, = engine.generate([HEALED], SamplingParams(**{**params.__dict__, "token_healing": True}))
    ref, = engine.generate([PLAIN], _starts_with_spaces(engine, params))
    assert healed.prompt_token_ids == engine.encode(PLAIN)
    assert healed.token_ids == ref.token_ids
    assert ref.text.startswith("    ")
    assert healed.text == ref.text[4:]
    # the constraint did its work: the first token spells (a prefix of) the four spaces or more
    first = engine.tokenizer.decode(ref.token_ids[:1])
    assert first.startswith("    ") or "    ".startswith(first)


def test_unhealed_prompt_is_untouched(engine):
    """Without token_healing (the default) the prompt is generated from as it is."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    plain, = engine.generate([HEALED], params)
    assert plain.prompt_token_ids == engine.encode(HEALED)


def test_special_last_token_is_not_backed_up(engine, tok):
    ids = engine.encode(PLAIN) + [tok.assistant_id]
    out, = engine.generate([ids], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, token_healing=True))
    assert out.prompt_token_ids == ids


def test_masks_compose_with_batching_and_speculation(tok):
    """Constrained and unconstrained requests in one batch, with MTP drafts on: each constrained
    request's text is what it is alone without speculation (it drafts nothing), and the
    unconstrained neighbours still speculate (their drafts are verified)."""
    model = sharp_tiny(vocab_size=tok.vocab_size)
    assert model.config.num_nextn_predict_layers >= 1
    alone = Engine(model, tok)
    spec = Engine(model, tok, speculative_tokens=2)
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    heal = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, token_healing=True)
    sampled = SamplingParams(temperature=0.8, seed=3, max_tokens=10, ignore_eos=True, token_healing=True)
    prompts = [HEALED, "return n", HEALED, "def f(n):\n  "]
    plist = [heal, greedy, sampled, heal]
    want = [alone.generate([p], sp)[0].token_ids for p, sp in zip(prompts, plist)]
    got = [o.token_ids for o in spec.generate(prompts, plist)]
    assert got == want
    assert spec.stats["spec_num_draft_tokens"] > 0


def test_generate_command_heals(tmp_path, tok, capsys):
    """`nanoseek generate --token-healing`: the text printed after the prompt is the engine's healed reply."""
    from nanoseek.checkpoint import save_pretrained
    from nanoseek.engine.chat import GenerateConfig, generate_cmd

    d = tmp_path / "ckpt"
    save_pretrained(sharp_tiny(vocab_size=tok.vocab_size), d, extra={"tokenizer": tok.save})
    cfg = GenerateConfig(ckpt=str(d), prompt=HEALED, max_tokens=8, temperature=0, token_healing=True, device="cpu")
    answer = generate_cmd(cfg)
    want, = Engine(str(d), device="cpu").generate([HEALED], cfg.params())
    assert answer == want.text and capsys.readouterr().out.startswith(HEALED + want.text)
    assert want.prompt_token_ids == tok.encode(PLAIN)


def test_grammar_state_survives_preemption():
    """A cache too small for the batch preempts constrained requests and recomputes them: each keeps
    its grammar state, so the tokens are those of a roomy engine and every reply is valid JSON."""
    tok = Tokenizer.train(['{"name": "a b", "id": 12, "tags": ["x", "y"], "ok": true}'] * 200, vocab_size=400)
    model = sharp_tiny(vocab_size=tok.vocab_size)
    schema = {"type": "object", "properties": {"a": {"type": "array", "minItems": 15, "maxItems": 30,
                                                     "items": {"type": "integer", "maximum": 99}}},
              "required": ["a"], "additionalProperties": False}
    roomy = Engine(model, tok, max_num_seqs=16)
    tight = Engine(model, tok, max_num_seqs=16, cache_tokens=200, block_size=8)
    g = Grammar.json_schema(tok, roomy.config.vocab_size, schema)
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=200, constraint=g) for i in range(16)]
    want = roomy.generate([tok.encode("{")] * 16, params)
    got = tight.generate([tok.encode("{")] * 16, params)
    assert tight.scheduler.num_preempted > 0
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    for o in got:
        assert o.finish_reason == "stop" and len(json.loads(o.text)["a"]) >= 15
