"""R1-Distill: the divergence (by hand and against TRL), the rejection-sampled traces (local
engine and an OpenAI-compatible server give the same file), the dense student (loads in
transformers with the same logits, serves), and the command (KD loss falls, resume is exact)."""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass

import pytest
import torch

from nanoseek.checkpoint import load_pretrained, save_pretrained
from nanoseek.config import preset
from nanoseek.counting import count
from nanoseek.distill.losses import generalized_jsd_loss
from nanoseek.distill.traces import TracesConfig, traces
from nanoseek.distill.train import (DistillConfig, check_student, compared_vocab, distill, kd_step_loss,
                                    prompts_of)
from nanoseek.model import DeepSeekV3
from nanoseek.tasks import TASKS, Problem
from nanoseek.tasks.base import extract_answer
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.sft import load_conversations, pack, tokenize

LN = math.log


# ---------------------------------------------------------------------- the divergence by hand
# teacher p = (1/2, 1/4, 1/4), student q = (4/5, 1/10, 1/10), given as logits τ·log p with τ = 2:
# the softmax of logits/τ gives back exactly p and q
P, Q = [0.5, 0.25, 0.25], [0.8, 0.1, 0.1]
M = [0.65, 0.175, 0.175]  # β = 1/2: M = (p + q) / 2
BY_HAND = {
    0.0: LN(1.25),  # KL(p‖q) = ½ln(½/⅘) + 2·¼ln(¼/⅒) = ½ln(25/16)
    1.0: 0.8 * LN(1.6) + 0.2 * LN(0.4),  # KL(q‖p)
    0.5: 0.5 * (0.5 * LN(0.5 / 0.65) + 0.5 * LN(0.25 / 0.175))  # ½KL(p‖M)
         + 0.5 * (0.8 * LN(0.8 / 0.65) + 0.2 * LN(0.1 / 0.175)),  # + ½KL(q‖M)
}


def logits_of(probs, tau):
    return tau * torch.tensor(probs, dtype=torch.float64).log()


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_divergence_by_hand_with_temperature(beta):
    s, t = logits_of(Q, 2.0)[None, None], logits_of(P, 2.0)[None, None]
    got = generalized_jsd_loss(s.double(), t.double(), beta=beta, temperature=2.0)
    assert float(got) == pytest.approx(BY_HAND[beta], rel=1e-6)
    # the temperature matters: at τ = 1 the same logits are sharper distributions, another value
    assert abs(float(generalized_jsd_loss(s, t, beta=beta, temperature=1.0)) - BY_HAND[beta]) > 1e-2


def test_prompt_positions_are_masked():
    """Positions labelled -100 (the prompt) add nothing: wildly different distributions there
    leave the loss at the hand-worked value of the one position that counts."""
    s = torch.stack([torch.tensor([9.0, -9.0, 0.0]), logits_of(Q, 1.0).float()])[None]
    t = torch.stack([torch.tensor([-9.0, 9.0, 0.0]), logits_of(P, 1.0).float()])[None]
    labels = torch.tensor([[-100, 2]])
    for beta in (0.0, 0.5, 1.0):
        assert float(generalized_jsd_loss(s, t, labels, beta=beta)) == pytest.approx(BY_HAND[beta], rel=1e-5)
    assert float(generalized_jsd_loss(s, t, torch.tensor([[-100, -100]]))) == 0.0  # nothing to learn: 0, not NaN


def test_equals_trl_generalized_jsd_loss():
    """Numerically TRL's GKDTrainer.generalized_jsd_loss (trl is a test dependency, pinned in
    pyproject.toml) on random logits, masks, β and τ."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.gkd import GKDTrainer
    g = torch.Generator().manual_seed(0)
    for beta in (0.0, 0.1, 0.5, 0.9, 1.0):
        for tau in (1.0, 0.7, 2.0):
            s = 3 * torch.randn(3, 7, 50, generator=g)
            t = 3 * torch.randn(3, 7, 50, generator=g)
            labels = torch.randint(0, 50, (3, 7), generator=g)
            labels[torch.rand(3, 7, generator=g) < 0.4] = -100
            ours = generalized_jsd_loss(s, t, labels, beta=beta, temperature=tau)
            theirs = GKDTrainer.generalized_jsd_loss(s, t, labels, beta=beta, temperature=tau)
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- fixtures
TEACHER_VOCAB = 320


@pytest.fixture(scope="module")
def sharp_teacher(tmp_path_factory, tok):
    """A tiny MoE teacher with a sharpened head: peaked distributions a student can be seen to
    move towards (a random model's are nearly uniform, and so is a fresh student's). Its
    vocabulary is padded past the tokenizer's, as `nanoseek pretrain` pads it."""
    torch.manual_seed(1)
    model = DeepSeekV3(preset("tiny", vocab_size=TEACHER_VOCAB))
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    d = tmp_path_factory.mktemp("teacher") / "teacher"
    save_pretrained(model, d, extra={"tokenizer": lambda p: tok.save(p)})
    return d


def dcfg(teacher, run, **kw) -> DistillConfig:
    base = dict(teacher=str(teacher), student="dense-tiny", data="builtin:sft-arith?n=24&seed=0", out=str(run),
                max_steps=6, batch_size=4, seq_len=128, learning_rate=3e-3, warmup_steps=1, logging_steps=1,
                progress=False, max_new_tokens=24)
    return DistillConfig(**{**base, **kw})


def losses(run) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


@pytest.fixture(scope="module")
def kd_run(tmp_path_factory, sharp_teacher):
    run = tmp_path_factory.mktemp("kd") / "run"
    distill(dcfg(sharp_teacher, run, max_steps=12, batch_size=8))
    return run


# ---------------------------------------------------------------------- the loss on a packed batch
def test_kd_loss_counts_the_assistant_tokens_only(sharp_teacher, tok):
    """kd_step_loss (hidden states → head on the target tokens only) == TRL's recipe on full
    logits with the SFT targets as labels; the tokens it averages over are the assistant's."""
    teacher = load_pretrained(sharp_teacher)
    torch.manual_seed(0)
    student = DeepSeekV3(preset("dense-tiny", vocab_size=TEACHER_VOCAB)).eval()
    convs = load_conversations("builtin:sft-arith?n=5&seed=3")
    ex = tokenize(convs, tok, 256)
    batch = tuple(torch.tensor([pack(ex, 256, tok.pad_id)[0][k]]) for k in range(4))
    ids, tgt, pos, doc = batch
    assert int((tgt != -100).sum()) == sum(sum(m) for _, m in ex)  # every assistant token, nothing else
    assert tok.user_id not in tgt[tgt != -100].tolist()
    from nanoseek.train.sft import block_causal_mask

    with torch.no_grad():
        full_s = student(ids, positions=pos, mask=block_causal_mask(doc))
        full_t = teacher(ids, positions=pos, mask=block_causal_mask(doc))
        for beta in (0.0, 0.5, 1.0):
            got, named = kd_step_loss(teacher, beta, 1.0, TEACHER_VOCAB)(student, batch)
            want = generalized_jsd_loss(full_s, full_t, tgt, beta=beta)
            assert float(got) == pytest.approx(float(want), rel=1e-5)
            assert float(named["ce"]) == pytest.approx(
                float(torch.nn.functional.cross_entropy(full_s[0], tgt[0], ignore_index=-100)), rel=1e-5)


def test_one_conversation_per_row_takes_the_causal_path(sharp_teacher, tok):
    """Unpacked rows (distill's default): no mask at all — plain causal attention over the rows
    cut to the longest conversation — gives the loss of the block mask over the full rows."""
    from nanoseek.train.sft import attention_mask, block_causal_mask, trim

    teacher = load_pretrained(sharp_teacher)
    torch.manual_seed(0)
    student = DeepSeekV3(preset("dense-tiny", vocab_size=TEACHER_VOCAB)).eval()
    ex = tokenize(load_conversations("builtin:sft-arith?n=6&seed=4"), tok, 200)
    batch = tuple(torch.tensor([r[k] for r in pack(ex, 200, tok.pad_id, packed=False)]) for k in range(4))
    ids, tgt, pos, doc = batch
    assert attention_mask(doc) is None and trim(batch)[0].shape == (6, max(len(x) for x, _ in ex))
    with torch.no_grad():
        got, _ = kd_step_loss(teacher, 0.5, 1.0, TEACHER_VOCAB)(student, batch)
        mask = block_causal_mask(doc)
        want = generalized_jsd_loss(student(ids, positions=pos, mask=mask), teacher(ids, positions=pos, mask=mask),
                                    tgt, beta=0.5)
    assert float(got) == pytest.approx(float(want), rel=1e-5)


def test_prompts_of_a_packed_batch_are_the_chat_prompts(tok):
    convs = load_conversations("builtin:sft-arith?n=4&seed=5")
    batch = tuple(torch.tensor([r[k] for r in pack(tokenize(convs, tok, 256), 256, tok.pad_id)]) for k in range(4))
    want = [tok.render_chat(c[:1], add_generation_prompt=True)[0] for c in convs]
    assert sorted(prompts_of(batch)) == sorted(want)


# ---------------------------------------------------------------------- the student
def test_dense_presets_are_dense_and_the_demo_student_is_under_a_third():
    for name in ("dense-tiny", "dense-small", "dense-base"):
        cfg = preset(name)
        assert cfg.model_type == "deepseek_v3" and cfg.first_k_dense_replace == cfg.num_hidden_layers
        assert not any(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    assert count(preset("dense-small")).total <= count(preset("small")).total / 3


def test_a_student_must_share_the_teachers_tokenizer(tmp_path, tok, sharp_teacher):
    cfg, path = check_student("dense-tiny", tok, TEACHER_VOCAB, 128)
    assert path is None and cfg.vocab_size == TEACHER_VOCAB  # a preset takes the teacher's vocabulary size
    # a checkpoint with the teacher's tokenizer but unpadded rows: compared over the tokenizer's ids
    own = tmp_path / "own"
    save_pretrained(DeepSeekV3(preset("dense-tiny", vocab_size=tok.vocab_size)), own, extra={"tokenizer": tok.save})
    assert check_student(str(own), tok, TEACHER_VOCAB, 128)[1] == own
    assert compared_vocab(tok.vocab_size, TEACHER_VOCAB, tok) == tok.vocab_size < TEACHER_VOCAB
    assert compared_vocab(TEACHER_VOCAB, TEACHER_VOCAB, tok) == TEACHER_VOCAB
    distill(dcfg(sharp_teacher, tmp_path / "run", student=str(own), max_steps=1))
    assert math.isfinite(losses(tmp_path / "run")[1])
    other = Tokenizer.train(["completely different words here"] * 20, vocab_size=280)
    d = tmp_path / "stranger"
    save_pretrained(DeepSeekV3(preset("dense-tiny", vocab_size=other.vocab_size)), d, extra={"tokenizer": other.save})
    with pytest.raises(ValueError, match="its tokenizer is not the teacher's"):
        check_student(str(d), tok, tok.vocab_size, 128)
    with pytest.raises(ValueError, match="--seq-len 999 exceeds the student's context"):
        check_student("dense-tiny", tok, tok.vocab_size, 999)


def test_student_checkpoint_loads_in_transformers_with_the_same_logits_and_serves(kd_run, tok):
    transformers = pytest.importorskip("transformers")
    from nanoseek.serve import ServeConfig, create_app
    from nanoseek.serve.testing import ServerThread
    import httpx

    from nanoseek.engine import Engine

    path = kd_run / "model"
    assert json.loads((path / "config.json").read_text())["first_k_dense_replace"] == 2
    ours = load_pretrained(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    ids = torch.randint(0, tok.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() <= 1e-4
    engine = Engine(str(path), device="cpu")
    app = create_app(engine, ServeConfig(ckpt=str(path)))
    with ServerThread(app) as url:
        r = httpx.post(url + "/v1/chat/completions", json={"model": "nanoseek", "max_tokens": 5, "temperature": 0,
                                                           "messages": [{"role": "user", "content": "What is 1+2?"}]},
                       timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


# ---------------------------------------------------------------------- the command
def test_kd_loss_decreases(kd_run):
    log = losses(kd_run)
    assert sorted(log) == list(range(1, 13))
    assert log[12] < 0.75 * log[1] and max(log[s] for s in (10, 11, 12)) < min(log[s] for s in (1, 2, 3)), log
    assert (kd_run / "model" / "tokenizer.json").is_file() and (kd_run / "report.md").is_file()


def interrupt_at(step: int):
    def hook(trainer, metrics):
        if trainer.step == step:
            raise KeyboardInterrupt
    return hook


def test_on_policy_resumes_exactly(sharp_teacher, tmp_path):
    """λ = 0.5: some batches are the student's own samples (through the engine, from the live
    weights), the rest the data. 4 steps == 2 steps, Ctrl-C, --resume: same sources, losses, weights."""
    kw = dict(loss="on_policy", lmbda=0.5, max_steps=4)
    distill(dcfg(sharp_teacher, tmp_path / "whole", **kw))
    with pytest.raises(KeyboardInterrupt):
        distill(dcfg(sharp_teacher, tmp_path / "split", **kw), on_step=interrupt_at(2))
    distill(dcfg(sharp_teacher, tmp_path / "split", resume=True, **kw))

    def records(run):
        return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    a, b = records(tmp_path / "whole"), records(tmp_path / "split")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    assert {r["on_policy"] for r in a} == {0.0, 1.0}  # both sources were drawn
    for x, y in zip(a, b):
        assert x["on_policy"] == y["on_policy"] and abs(x["loss"] - y["loss"]) <= 1e-6
        assert x.get("completions/mean_length") == y.get("completions/mean_length")
    w1, w2 = load_pretrained(tmp_path / "whole" / "model"), load_pretrained(tmp_path / "split" / "model")
    for (name, p), q in zip(w1.state_dict().items(), w2.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_seq_kd_trains_on_teacher_samples(sharp_teacher, tmp_path):
    """--seq-kd: every batch is the teacher's completions of the traces' prompts (the SFT loss on them)."""
    run = tmp_path / "seqkd"
    distill(dcfg(sharp_teacher, run, loss="sft", seq_kd=True, max_steps=2))
    recs = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["on_policy"] for r in recs] == [0.0, 0.0]
    assert all(1 <= r["completions/mean_length"] <= 24 for r in recs)


def test_flags_are_checked_in_one_line(sharp_teacher, tmp_path):
    with pytest.raises(ValueError, match="--beta 0.5: --loss kl is β = 0"):
        dcfg(sharp_teacher, tmp_path / "x", loss="kl", beta=0.5)
    with pytest.raises(ValueError, match="--lmbda 0.5: the on-policy fraction applies to --loss on_policy only"):
        dcfg(sharp_teacher, tmp_path / "x", loss="jsd", lmbda=0.5)
    with pytest.raises(ValueError, match="--beta 1.5: must be in"):
        dcfg(sharp_teacher, tmp_path / "x", loss="jsd", beta=1.5)
    with pytest.raises(FileNotFoundError, match="--student nope: neither a preset"):
        dcfg(sharp_teacher, tmp_path / "x", student="nope")
    assert dcfg(sharp_teacher, tmp_path / "x", loss="jsd").divergence_beta == 0.5
    assert dcfg(sharp_teacher, tmp_path / "x", loss="on_policy").divergence_beta == 1.0
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------- traces
@dataclass
class YesNoTask:
    """Problem i's answer is 'The answer is yes.' when i is even, '… no.' otherwise: the scripted
    teacher always says yes, so exactly the even problems can be verified."""

    name: str = "yesno"

    def make(self, n: int, seed: int, split: str = "train") -> list[Problem]:
        return [Problem(prompt=f"Is {i} even?", answer="yes" if i % 2 == 0 else "no", solution="",
                        meta={"task": "yesno"}) for i in range(n)]

    def parse(self, completion: str, think_preopened: bool = False) -> str | None:
        return extract_answer(completion, think_preopened)

    def check(self, pred: str | None, problem: Problem) -> bool:
        return pred == f"The answer is {problem.answer}."


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    from nanoseek.serve.testing import make_scripted_checkpoint

    return make_scripted_checkpoint(tmp_path_factory.mktemp("scripted") / "teacher")


@pytest.fixture
def yesno(monkeypatch):
    monkeypatch.setitem(TASKS, "yesno", YesNoTask)


def tcfg(out, **kw) -> TracesConfig:
    return TracesConfig(**{**dict(task="yesno", out=str(out), n=6, k=3, temperature=1.0, max_new_tokens=32,
                                  progress=False), **kw})


def test_rejection_sampling_keeps_verified_distinct_rows_in_sfts_format(scripted, yesno, tmp_path):
    s = traces(tcfg(tmp_path / "t", teacher=str(scripted)))
    rows = [json.loads(line) for line in (tmp_path / "t" / "traces.jsonl").read_text().splitlines()]
    assert s["samples"] == 18 and s["verified"] + sum(s["rejected"].values()) == 18
    assert s["acceptance"] == pytest.approx(s["verified"] / 18)
    assert s["rejected"]["wrong"] >= 9  # the odd problems: "yes" is wrong
    # the same completion sampled three times is one row: one per even problem
    assert [r["messages"][0]["content"] for r in rows] == ["Is 0 even?", "Is 2 even?", "Is 4 even?"]
    assert s["rows"] == 3 and s["duplicates"] == s["verified"] - 3
    for r in rows:
        assert r["messages"][1] == {"role": "assistant", "reasoning_content": "Let me think",
                                    "content": "The answer is yes."}
    # nanoseek sft reads it: the assistant turn is the thought then the answer, and only it is trained
    tok = Tokenizer.load(scripted)
    convs = load_conversations(str(tmp_path / "t" / "traces.jsonl"))
    ids, mask = tok.render_chat(convs[0])
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "<think>\nLet me think\n</think>\nThe answer is yes.<|eos|>"
    # a sample cut at the length limit is never kept, right or not
    s = traces(tcfg(tmp_path / "cut", teacher=str(scripted), max_new_tokens=4))
    assert s["rows"] == 0 and s["rejected"]["truncated"] == 18
    assert (tmp_path / "cut" / "traces.jsonl").read_text() == ""
    with pytest.raises(FileExistsError, match="already holds traces.jsonl"):
        tcfg(tmp_path / "t", teacher=str(scripted))


def test_teacher_url_gives_the_local_file(scripted, yesno, tmp_path):
    """The same teacher behind `nanoseek serve` (in-process uvicorn on loopback, the openai
    client, an API key): the same rows, byte for byte, and the same counts."""
    from nanoseek.engine import Engine
    from nanoseek.serve import ServeConfig, create_app
    from nanoseek.serve.testing import ServerThread

    local = traces(tcfg(tmp_path / "local", teacher=str(scripted)))
    app = create_app(Engine(str(scripted), device="cpu"), ServeConfig(ckpt=str(scripted), api_key=["sk-distill"]))
    with ServerThread(app) as url:
        remote = traces(tcfg(tmp_path / "remote", teacher_url=url, api_key="sk-distill", concurrency=4))
        with pytest.raises(ValueError, match="--teacher-url .*401|--teacher-url .*[Aa]uth"):
            traces(tcfg(tmp_path / "nokey", teacher_url=url, api_key="wrong", n=1, k=1))
    assert (tmp_path / "remote" / "traces.jsonl").read_text() == (tmp_path / "local" / "traces.jsonl").read_text()
    for key in ("samples", "verified", "rejected", "rows", "solved"):
        assert remote[key] == local[key], key
