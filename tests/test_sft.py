"""Chat SFT: what is trained (assistant tokens only), how rows are packed (conversations never
see each other), and that the command writes a loadable checkpoint with its tokenizer."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from nanoseek.checkpoint import load_pretrained
from nanoseek.tokenizer import Tokenizer
from nanoseek.checkpoint import resolve_ckpt
from nanoseek.train.sft import (SFTConfig, block_causal_mask, load_conversations, pack, sft,
                                sft_loss, tokenize)


def test_pack_targets_only_assistant_tokens_and_positions_restart(tok):
    convs = load_conversations("builtin:sft-arith?n=3&seed=1")
    ex = tokenize(convs, tok, 256)
    rows = pack(ex, 256, tok.pad_id)
    assert len(rows) == 1  # three short chats fit one row
    ids, tgt, pos, doc = rows[0]
    start = 0
    for d, (x, m) in enumerate(ex):
        n = len(x)
        assert ids[start:start + n] == x
        assert pos[start:start + n] == list(range(n))
        assert doc[start:start + n] == [d] * n
        # target i is token i+1 exactly where token i+1 is written by the assistant
        want = [x[i + 1] if m[i + 1] else -100 for i in range(n - 1)] + [-100]
        assert tgt[start:start + n] == want
        assert sum(t != -100 for t in tgt[start:start + n]) == sum(m)  # every assistant token
        start += n
    assert doc[start:] == [-1] * (256 - start) and set(tgt[start:]) == {-100}
    # the user's question is never a target; the closing <|eos|> is
    assert tok.eos_id in [t for t in tgt if t != -100]
    assert tok.user_id not in [t for t in tgt if t != -100]


def test_packed_loss_equals_unpacked_losses(ckpt, tok):
    """Block-diagonal mask + restarted positions: a packed row gives every conversation the
    logits it would get alone, so the packed loss is the token-weighted mean of the single ones."""
    model = load_pretrained(ckpt)
    ex = tokenize(load_conversations("builtin:sft-arith?n=4&seed=2"), tok, 200)
    packed = pack(ex, 200, tok.pad_id)
    assert len(packed) == 1
    batch = [torch.tensor([packed[0][k]]) for k in range(4)]
    with torch.no_grad():
        got = sft_loss(model, *batch)
    total, count = 0.0, 0
    for x, m in ex:
        ids = torch.tensor([x])
        t = torch.tensor([[x[i + 1] if m[i + 1] else -100 for i in range(len(x) - 1)] + [-100]])
        with torch.no_grad():
            logits = model(ids)
        total += float(F.cross_entropy(logits[0], t[0], ignore_index=-100, reduction="sum"))
        count += int((t != -100).sum())
    assert float(got) == pytest.approx(total / count, rel=1e-5)
    # and crossing the boundary would have changed it (the mask matters)
    ids, tgt, pos, doc = batch
    with torch.no_grad():
        leaky = F.cross_entropy(model(ids).flatten(0, 1), tgt.flatten(), ignore_index=-100)
    assert abs(float(leaky) - float(got)) > 1e-4


def test_block_causal_mask_shape_and_padding():
    m = block_causal_mask(torch.tensor([[0, 0, 1, 1, -1]]))
    assert m.shape == (1, 1, 5, 5)
    assert m[0, 0].int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0],
                                      [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]]


def test_bad_data_names_file_and_line(tmp_path):
    f = tmp_path / "chats.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                          {"role": "assistant", "content": "yo"}]}) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"chats\.jsonl:2: not valid JSON"):
        load_conversations(str(f))
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match=r"chats\.jsonl:1: no assistant message"):
        load_conversations(str(f))
    with pytest.raises(ValueError, match="unknown built-in SFT set"):
        load_conversations("builtin:nope")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_conversations(str(tmp_path / "missing.jsonl"))


def test_builtin_knobs_reach_the_task():
    convs = load_conversations("builtin:sft-arith?n=5&seed=3&digits=3&ops=*&chain=2")
    assert len(convs) == 5 and all("*" in c[0]["content"] for c in convs)
    cd = load_conversations("builtin:sft-countdown?n=2")
    assert len(cd) == 2 and cd[0][1]["reasoning_content"]


def test_sft_command_writes_a_checkpoint_that_learns(ckpt, tok, tmp_path):
    run = tmp_path / "sft"
    cfg = SFTConfig(ckpt=str(ckpt), data="builtin:sft-arith?n=64&seed=0", out=str(run), max_steps=12,
                    batch_size=4, seq_len=128, learning_rate=3e-3, warmup_steps=2, logging_steps=1, progress=False)
    out = sft(cfg)
    assert out == run / "model" and resolve_ckpt(run) == out
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    assert json.loads((run / "config.json").read_text())["max_steps"] == 12
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13))
    assert log[-1]["loss"] < 0.8 * log[0]["loss"]  # it fits the cold-start data
    assert Tokenizer.load(out).vocab_size == tok.vocab_size
    load_pretrained(out)


def sft_cfg(ckpt, run, **kw) -> SFTConfig:
    base = dict(ckpt=str(ckpt), data="builtin:sft-arith?n=40&seed=0", out=str(run), max_steps=6, batch_size=4,
                seq_len=128, learning_rate=3e-3, warmup_steps=2, logging_steps=1, progress=False)
    return SFTConfig(**{**base, **kw})


def interrupt_at(step: int):
    def hook(trainer, metrics):
        if trainer.step == step:
            raise KeyboardInterrupt
    return hook


def test_sft_resumes_exactly(ckpt, tmp_path):
    """6 steps (more than an epoch of 40 chats in 4-row batches: the shuffle's state matters) ==
    3 steps, Ctrl-C, --resume: the same losses and weights."""
    sft(sft_cfg(ckpt, tmp_path / "whole"))
    with pytest.raises(KeyboardInterrupt):
        sft(sft_cfg(ckpt, tmp_path / "split"), on_step=interrupt_at(3))
    assert (tmp_path / "split" / "checkpoints" / "step_000003" / "trainer_state.pt").is_file()
    sft(sft_cfg(ckpt, tmp_path / "split", resume=True))

    def losses(run):
        return {r["step"]: r["loss"] for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
                if "loss" in r}

    a, b = losses("whole"), losses("split")
    assert sorted(a) == sorted(b) == list(range(1, 7)) and all(abs(a[s] - b[s]) <= 1e-6 for s in a)
    x, y = load_pretrained(tmp_path / "whole" / "model"), load_pretrained(tmp_path / "split" / "model")
    for (name, p), q in zip(x.state_dict().items(), y.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_router_bias_update_acts_in_sft_when_gamma_is_positive(ckpt, tmp_path):
    """γ > 0: after a step every expert's bias moved by γ against its load in that step (down if
    overloaded, up if underloaded); γ = 0: the bias never moves."""
    seen = {}

    def watch(trainer, metrics):
        moes = trainer.model.moe_layers()
        if trainer.step == 1:  # record the loads and biases right before step 2's update
            def pre(opt, args, kwargs):
                seen["load"] = [m.tokens_per_expert.clone() for m in moes]
                seen["bias"] = [m.gate.e_score_correction_bias.clone() for m in moes]
            trainer.optimizer.register_step_pre_hook(pre)
        if trainer.step == 2:
            seen["after"] = [m.gate.e_score_correction_bias.clone() for m in moes]

    gamma = 0.01
    sft(sft_cfg(ckpt, tmp_path / "g", max_steps=2, router_gamma=gamma), on_step=watch)
    ran = 0
    for load, before, after in zip(seen["load"], seen["bias"], seen["after"]):
        if load.sum() == 0:  # the MTP module's MoE: SFT never runs it, so it has no load to balance
            assert torch.equal(after, before)
            continue
        ran += 1
        torch.testing.assert_close(after - before, gamma * torch.sign(load.mean() - load))
    assert ran == 2  # the tiny preset's two main-model MoE layers
    base = torch.cat([m.gate.e_score_correction_bias for m in load_pretrained(ckpt).moe_layers()])
    sft(sft_cfg(ckpt, tmp_path / "g0", max_steps=2, router_gamma=0.0))
    after0 = torch.cat([m.gate.e_score_correction_bias for m in load_pretrained(tmp_path / "g0" / "model").moe_layers()])
    assert torch.equal(after0, base)
