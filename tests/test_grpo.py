"""The GRPO trainer's wiring (the loss math itself is tests/test_grpo_loss.py): the update it
makes equals the one computed by hand from independent log-probs; truncated completions and
equal-reward groups carry no gradient; beta = 0 builds no reference; rollouts see the live
weights; the command logs what it promises and warns on the silent failures."""
from __future__ import annotations

import copy
import json
import statistics
import warnings

import pytest
import torch

from nanoseek.checkpoint import load_pretrained
from nanoseek.train import grpo as G
from nanoseek.train.grpo import EngineSampler, GRPOConfig, Rollout, build_reference, grpo, grpo_update
from nanoseek.train.loop import Trainer


def scripted_rollouts(n: int, seed: int = 0, truncated=(), share: int = 1) -> list[Rollout]:
    """n rollouts of random prompts and completions; `share` consecutive rows have the same
    prompt (GRPO's G completions of a prompt, which the update runs through the model once)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = torch.randint(8, 264, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        if i % share:
            p = out[-1].prompt_ids
        c = torch.randint(8, 264, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist()
        out.append(Rollout(p, c, i in truncated))
    return out


def cfg_for(**kw) -> GRPOConfig:
    base = dict(ckpt="-", task="arithmetic", out="-", num_generations=4, loss_type="grpo",
                scale_rewards="group", max_grad_norm=1e9, mask_truncated_completions=True,
                prompts_per_step=2, gradient_accumulation_steps=3,  # micro-batches of ⌈2·4 / 3⌉ = 3 sequences
                dtype="float32")  # exact math; bf16 autocast (the CPU default here) rounds the log-probs
    base.update(kw)
    return GRPOConfig(**base)


def update(model, lr: float, rolls, rewards, ref=None, **kw) -> dict:
    """One grpo_update through the training core, with plain SGD (so the step is checkable by hand)."""
    cfg = cfg_for(learning_rate=lr, **kw)
    trainer = Trainer(cfg, model, optimizer=torch.optim.SGD(model.parameters(), lr=lr))
    return grpo_update(trainer, ref, rolls, rewards, cfg, pad_id=2)


def hand_logp(model, r: Rollout) -> torch.Tensor:
    """log π(c_t | prompt, c_<t) from one unpadded forward of this sequence alone."""
    ids = torch.tensor([r.prompt_ids + r.ids])
    lp = model(ids)[0].log_softmax(-1)
    P = len(r.prompt_ids)
    return torch.stack([lp[P - 1 + t, r.ids[t]] for t in range(len(r.ids))])


def test_one_step_equals_the_hand_computed_update(ckpt):
    """Scripted rewards → the group advantages by hand, the log-probs from an unpadded forward,
    and the GRPO gradient at ratio 1 (−1/N Σ_i Â_i · mean_t ∇log π) applied by SGD: the trainer's
    parameters after one step must match, through padding, micro-batching, prompts shared by
    consecutive rows (one forward each, also across a micro-batch boundary) and truncation masks."""
    torch.manual_seed(0)
    model = load_pretrained(ckpt).train()
    twin = copy.deepcopy(model)
    rolls = scripted_rollouts(8, seed=5, truncated={6}, share=2)
    assert rolls[2].prompt_ids == rolls[3].prompt_ids != rolls[4].prompt_ids  # rows 2 | 3 split by micro_batch_size=3
    assert [len(r.prompt_ids) for r in rolls[:3]] == [8, 8, 3]  # a micro-batch's shorter prompt is padded
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.0, 1.0, 2.0])
    lr = 0.05
    st = update(model, lr, rolls, rewards)

    adv = []
    for g in range(2):
        r = rewards[4 * g: 4 * g + 4].tolist()
        m, s = statistics.mean(r), statistics.stdev(r)
        adv += [(x - m) / (s + 1e-4) for x in r]
    assert st["debug"]["advantages"].tolist() == pytest.approx(adv, abs=1e-5)

    lps = [hand_logp(twin, r) for r in rolls]
    logged = st["debug"]["logp"]
    for i, r in enumerate(rolls):
        assert logged[i, :len(r.ids)].tolist() == pytest.approx(lps[i].tolist(), abs=1e-4)
    mask = st["debug"]["mask"]
    assert mask[6].sum() == 0 and mask[0].sum() == len(rolls[0].ids)  # row 6 was truncated

    # loss_type "grpo": mean over tokens of each sequence, then over the N sequences; the
    # truncated one contributes a zero term (it still counts in N, as in TRL)
    surrogate = -sum(adv[i] * lps[i].mean() for i in range(8) if i != 6) / 8
    twin.zero_grad()
    surrogate.backward()
    for (name, p), q0, q in zip(model.named_parameters(), twin.parameters(), twin.parameters()):
        want = q0.detach() - lr * (q.grad if q.grad is not None else torch.zeros_like(q))
        torch.testing.assert_close(p.detach(), want, atol=2e-6, rtol=1e-4, msg=name)
    # the logged value at ratio 1 is −mean_i Â_i over the trained (unmasked) rows
    assert st["loss"] == pytest.approx(-sum(adv[i] for i in range(8) if i != 6) / 8, abs=1e-5)
    assert st["clip_ratio/region_mean"] == 0.0 and st["num_sequences_trained"] == 8


def test_dynamic_sampling_drops_equal_reward_groups(ckpt):
    model = load_pretrained(ckpt).train()
    rolls = scripted_rollouts(8, seed=1)
    st = update(model, 0.1, rolls, torch.tensor([1.0, 1, 1, 1, 0, 1, 0, 0]))
    assert st["frac_reward_zero_std"] == 0.5 and st["num_sequences_trained"] == 4
    assert st["debug"]["keep"].tolist() == [False] * 4 + [True] * 4
    assert st["debug"]["logp"].shape[0] == 4
    # every group equal: no update at all
    before = [p.detach().clone() for p in model.parameters()]
    st = update(model, 0.1, rolls, torch.tensor([1.0] * 4 + [0.0] * 4))
    assert st.get("skipped") and st["frac_reward_zero_std"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # with dynamic sampling off the equal group stays in the batch (with zero advantage)
    st = update(model, 0.1, rolls, torch.tensor([1.0, 1, 1, 1, 0, 1, 0, 0]), dynamic_sampling=False)
    assert st["num_sequences_trained"] == 8


def test_zero_advantage_sequences_are_skipped_but_still_normalise(ckpt):
    """dynamic_sampling off, dapo: the equal-reward group gets advantage exactly 0, is not run
    through the model, yet its tokens stay in the dapo denominator — so the update equals the
    hand-computed one over all 8 sequences (TRL's)."""
    torch.manual_seed(0)
    model = load_pretrained(ckpt).train()
    twin = copy.deepcopy(model)
    rolls = scripted_rollouts(8, seed=3, share=4)
    rewards = torch.tensor([0.7, 0.7, 0.7, 0.7, 1.0, 0.0, 0.0, 1.0])  # 0.7·4/4 is not exact in fp32
    lr = 0.05
    st = update(model, lr, rolls, rewards, dynamic_sampling=False, loss_type="dapo")
    assert st["num_sequences_trained"] == 8 and st["num_sequences_skipped_zero_adv"] == 4
    assert st["debug"]["logp"].shape[0] == 4

    s = statistics.stdev([1.0, 0.0, 0.0, 1.0])
    adv = [0.0] * 4 + [(x - 0.5) / (s + 1e-4) for x in (1.0, 0.0, 0.0, 1.0)]
    n_tok = sum(len(r.ids) for r in rolls)
    surrogate = -sum(adv[i] * hand_logp(twin, r).sum() for i, r in enumerate(rolls)) / n_tok
    surrogate.backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        want = q.detach() - lr * (q.grad if q.grad is not None else torch.zeros_like(q))
        torch.testing.assert_close(p.detach(), want, atol=2e-6, rtol=1e-4, msg=name)


def test_truncated_completions_are_masked_and_carry_no_gradient(ckpt):
    model = load_pretrained(ckpt).train()
    rolls = scripted_rollouts(4, seed=2, truncated={0, 1, 2, 3})
    before = [p.detach().clone() for p in model.parameters()]
    st = update(model, 0.1, rolls, torch.tensor([1.0, 0, 0, 1]))
    assert float(st["debug"]["mask"].sum()) == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    st = update(model, 0.1, rolls, torch.tensor([1.0, 0, 0, 1]), mask_truncated_completions=False)
    assert float(st["debug"]["mask"].sum()) == sum(len(r.ids) for r in rolls)


def test_beta_zero_builds_no_reference_and_beta_logs_kl(ckpt):
    model = load_pretrained(ckpt)
    assert build_reference(model, 0.0) is None
    ref = build_reference(model, 0.04)
    assert ref is not model and not any(p.requires_grad for p in ref.parameters())
    # with a reference, the k3 KL is 0 before the policy moves, > 0 after two updates (μ = 2)
    model.train()
    rolls = scripted_rollouts(4, seed=3)
    st = update(model, 0.5, rolls, torch.tensor([1.0, 0, 0, 1]), ref=ref, beta=0.04, num_iterations=2)
    assert st["kl"] > 0.0 and "ratio_mean" in st


def test_engine_rollouts_see_the_live_weights(ckpt, tok):
    """The engine holds the model the optimizer updates: after an in-place weight change its
    greedy rollouts are those of the new weights (prefix cache included), equal to the model's
    plain forward (the reference greedy decode, one prompt at a time)."""
    model = load_pretrained(ckpt)
    prompts = [tok.render_chat([{"role": "user", "content": f"What is {a}+{a + 3}?"}],
                               add_generation_prompt=True)[0] * 2 for a in range(4)]  # > 1 cache block
    eng = EngineSampler(model, tok, 8, 128)

    def reference() -> list[list[int]]:
        out = []
        for p in prompts:
            ids = model.generate(torch.tensor([p]), 6, eos_token_id=tok.eos_id)[0, len(p):].tolist()
            out.append(ids[:ids.index(tok.eos_id) + 1] if tok.eos_id in ids else ids)
        return out

    first = [r.ids for r in eng.generate(prompts, 6, 0.0)]
    assert first == reference()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    second = [r.ids for r in eng.generate(prompts, 6, 0.0)]
    assert second == reference()
    assert second != first


def test_grpo_command_logs_and_warns(ckpt, tmp_path, monkeypatch):
    built = []
    real = G.build_reference
    monkeypatch.setattr(G, "build_reference", lambda m, b: built.append(real(m, b)) or built[-1])
    run = tmp_path / "grpo"
    cfg = GRPOConfig(ckpt=str(ckpt), task="arithmetic", out=str(run), task_args={"digits": 2},
                     max_steps=2, prompts_per_step=2, num_generations=2, max_completion_length=3,
                     eval_steps=1, eval_problems=3, seed=0)
    with pytest.warns(UserWarning) as rec:
        grpo(cfg)
    msgs = " ".join(str(w.message) for w in rec)
    assert "EVERY completion hit max_completion_length" in msgs  # a random model never stops in 3
    assert "EVERY group had equal rewards" in msgs
    assert built == [None]  # beta = 0: no reference model
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for key in ("rewards/accuracy", "rewards/format", "accuracy", "frac_reward_zero_std",
                "completions/mean_length", "completions/clipped_ratio", "tokens_per_s", "reward_std"):
        assert key in steps[0], key
    assert steps[0]["completions/clipped_ratio"] == 1.0 and steps[0]["reward"] == 0.0
    assert "eval_accuracy" in rows[0] and "eval_accuracy" in rows[-1]
    assert (run / "grpo.png").stat().st_size > 1000
    assert (run / "model" / "tokenizer.json").is_file()
    load_pretrained(run / "model")


def interrupt_at(step: int):
    """on_step hook: Ctrl-C right after `step` (the core saves that step and re-raises)."""
    def hook(trainer, metrics):
        if trainer.step == step:
            raise KeyboardInterrupt
    return hook


def length_reward(completions, problems, **kw):
    """Text length: differs within almost every group, so every step has something to learn."""
    return [len(c) / 10 for c in completions]


def test_grpo_resume_continues_exactly(ckpt, tmp_path):
    """4 steps in one go == 2 steps, Ctrl-C, --resume to 4: same weights, same per-step metrics
    (the optimizer, the problem sampler's and the rollouts' random state all come back)."""
    kw = dict(ckpt=str(ckpt), task="arithmetic", task_args={"digits": 2}, prompts_per_step=2, num_generations=2,
              max_completion_length=4, eval_steps=0, eval_problems=2, seed=0, learning_rate=1e-3,
              reward_funcs=["test_grpo:length_reward"], mask_truncated_completions=False, save_steps=1, keep_last=1,
              dtype="float32")  # a random model never stops: unmasked, its truncated completions still train
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grpo(GRPOConfig(out=str(tmp_path / "whole"), max_steps=4, **kw))
        with pytest.raises(KeyboardInterrupt):
            grpo(GRPOConfig(out=str(tmp_path / "split"), max_steps=4, **kw), on_step=interrupt_at(2))
        assert not (tmp_path / "split" / "model").exists()
        grpo(GRPOConfig(out=str(tmp_path / "split"), max_steps=4, resume=True, **kw))

    def trained(run):
        rows = [json.loads(ln) for ln in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["reward"], r["num_sequences_trained"]) for r in rows if "reward" in r]

    assert trained("split") == trained("whole") and len(trained("whole")) == 4
    assert sum(n for *_, n in trained("whole")) > 0  # some steps did update
    a, b = load_pretrained(tmp_path / "whole" / "model"), load_pretrained(tmp_path / "split" / "model")
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    assert [d.name for d in (tmp_path / "split" / "checkpoints").iterdir()] == ["step_000003"]  # keep_last=1
    with pytest.raises(FileExistsError, match="--resume"):  # a fresh run would mix with the old checkpoints
        grpo(GRPOConfig(out=str(tmp_path / "split"), max_steps=4, **kw))
