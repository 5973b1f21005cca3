"""GRPO with verifiable rewards (DeepSeekMath / R1), option names as TRL's GRPOTrainer.

`nanoseek grpo --ckpt runs/x/sft --task arithmetic --task-args '{"digits": 3}' --out runs/x/grpo`

One step:
  1. take `prompts_per_step` training problems; render each as a chat prompt (or, with
     `--template r1-zero`, the R1-Zero base-model prompt);
  2. roll out G = `num_generations` completions per prompt, all in one batch, through the
     inference engine holding the *live* policy (so step k samples from the weights of step k);
  3. score them with rule rewards (`reward_funcs`, `reward_weights`), turn rewards into
     group-relative advantages (`scale_rewards`), drop groups whose rewards are all equal
     (`dynamic_sampling`: their advantage is zero, they only dilute the batch), and zero the
     loss mask of completions that hit the length limit (`mask_truncated_completions`: a cut-off
     answer is scored 0 for being cut, not for being wrong, so it carries no signal);
  4. `num_iterations` optimizer passes over that batch with the clipped surrogate
     (`epsilon`, `epsilon_high`) and, when `beta` > 0, the k3 KL to a frozen reference that is
     reset to the policy every `ref_model_sync_steps` (R1-Zero: 400). beta = 0 builds no reference.

Everything the R1 paper and TRL users look at is logged per step to metrics.jsonl (reward per
component, accuracy, frac_reward_zero_std, completion length, clip fractions, KL, entropy,
tokens/s), with a loud warning on the two silent failures: every completion truncated (zero
reward, zero gradient) and every group with equal rewards (zero advantage). A held-out eval
with pinned sampling runs every `eval_steps`; the run ends with a reward/accuracy plot.

Under torchrun (DDP: gloo on CPU, nccl on CUDA) each rank rolls out whole prompt groups — its
slice of the very problems and per-completion seeds one process draws — so the advantages stay
within a rank; the normalisers (the tokens or sequences of the whole batch, the groups dynamic
sampling keeps) and the logged metrics are reduced over ranks, so the update and the figures
are a single process's, to float rounding.
"""
from __future__ import annotations

import copy
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..checkpoint import ckpt_flag, load_pretrained
from ..engine.speculative import SPECULATIVE_TOKENS_HELP
from ..model.shared_prefix import SharedPrefixBatch, shared_prefix_hidden_states
from ..tasks import get_task, r1_zero_prompt
from ..tasks.rewards import load_reward, weighted
from ..tokenizer import Tokenizer
from .grpo_loss import filter_equal_reward_groups, frac_reward_zero_std, group_advantages, grpo_loss
from .loop import Trainer, TrainConfig, balance_loss, start_run
from .rundir import read_metrics
from .runtime import Runtime, all_reduce_sum, gather_rows

# grpo_loss's token-mean stats (and "kl" with a reference): under torchrun summed over ranks by
# name, since a rank whose groups were all dropped computed none of them
LOSS_STATS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "ratio_mean")


@dataclass(kw_only=True)
class GRPOConfig(TrainConfig):
    """`nanoseek grpo`: the shared training knobs, with GRPO's defaults, and TRL's GRPO options."""

    SCHEDULE_FIELDS: ClassVar[tuple[str, ...]] = (*TrainConfig.SCHEDULE_FIELDS, "prompts_per_step", "num_generations")

    ckpt: str = field(metadata={"help": "policy checkpoint, or any stage's run directory (its model/)"})
    task: str = field(metadata={"help": "arithmetic | countdown | gsm8k"})
    out: str = field(metadata={"help": "run directory: model/, config.json, metrics.jsonl, checkpoints/, grpo.png, report.md"})
    task_args: dict = field(default_factory=dict, metadata={"help": 'task knobs as JSON, e.g. {"digits": 3}'})
    template: str = field(default="chat", metadata={"help": "chat prompt (SFT models) or the R1-Zero text prompt (base models)",
                                                    "choices": ["chat", "r1-zero"]})
    max_steps: int = field(default=100, metadata={"help": "optimizer steps (rollout batches)"})
    learning_rate: float = field(default=1e-4, metadata={"help": "peak AdamW learning rate"})
    schedule: str = field(default="constant", metadata={"help": "lr schedule after warmup", "choices": ["cosine", "wsd", "constant"]})
    warmup_steps: int = field(default=0, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decay on matrices (not norms/embeddings/biases)"})
    beta2: float = field(default=0.99, metadata={"help": "AdamW β2"})
    gradient_accumulation_steps: int = field(default=2, metadata={
        "help": "micro-batches the update of a rollout batch is split into: each holds ⌈prompts·G / this⌉ "
                "sequences (fewer micro-batches when dynamic sampling drops groups)"})
    router_gamma: float = field(default=0.0, metadata={"help": "γ of the aux-loss-free router-bias update after each step; 0 = off"})
    balance_alpha: float = field(default=0.0, metadata={"help": "α of the sequence-wise balance loss; 0 = off"})
    logging_steps: int = field(default=1, metadata={"help": "steps between metrics.jsonl records"})
    eval_steps: int = field(default=10, metadata={"help": "held-out eval every N steps (0: start and end only)"})
    save_steps: int = field(default=50, metadata={"help": "steps between resumable checkpoints; 0 = only RUN/model at the end"})
    progress: bool = field(default=False, metadata={"help": "show a progress bar (instead of a line per step)"})
    prompts_per_step: int = field(default=16, metadata={"help": "distinct prompts per step"})
    num_generations: int = field(default=8, metadata={"help": "G: completions per prompt"})
    max_completion_length: int = field(default=128, metadata={"help": "tokens per completion at most"})
    temperature: float = field(default=1.0, metadata={"help": "rollout sampling temperature (log-probs use logits / it, as TRL)"})
    top_p: float = field(default=1.0, metadata={"help": "rollout nucleus sampling"})
    beta: float = field(default=0.0, metadata={"help": "k3 KL weight; 0 ⇒ no reference model"})
    epsilon: float = field(default=0.2, metadata={"help": "clip range of the ratio (1 − ε, 1 + ε)"})
    epsilon_high: float | None = field(default=None, metadata={"help": "DAPO clip-higher (e.g. 0.28); None = epsilon"})
    loss_type: str = field(default="dapo", metadata={"help": "per-sequence mean / constant normaliser / token mean",
                                                     "choices": ["grpo", "dr_grpo", "dapo"]})
    scale_rewards: str = field(default="group", metadata={"help": "divide advantages by the group std, the batch std, or nothing",
                                                          "choices": ["group", "batch", "none"]})
    num_iterations: int = field(default=1, metadata={"help": "updates per rollout batch (μ)"})
    ref_model_sync_steps: int = field(default=0, metadata={"help": "reset the reference to the policy every N steps (0: never)"})
    dynamic_sampling: bool = field(default=True, metadata={"help": "drop groups whose rewards are all equal"})
    mask_truncated_completions: bool = field(default=True, metadata={"help": "completions cut at the length limit carry no loss"})
    reward_funcs: list[str] = field(default_factory=lambda: ["accuracy", "format"],
                                    metadata={"help": "accuracy, format, or pkg.module:function"})
    reward_weights: list[float] = field(default_factory=list, metadata={"help": "one per reward (default all 1)"})
    eval_problems: int = field(default=200, metadata={"help": "held-out problems per evaluation"})
    eval_temperature: float = field(default=0.0, metadata={"help": "pinned eval sampling (0 = greedy)"})
    eval_seed: int = field(default=1234, metadata={"help": "pins the held-out problems and the eval samples"})
    mtp_weight: float = field(default=0.0, metadata={"help": "λ of the MTP loss on the rollouts trained on (their "
                                                     "completions, the policy's hidden states detached: the policy "
                                                     "gradient stays GRPO's); keeps the MTP module a good draft; 0 = off"})
    speculative_tokens: int = field(default=0, metadata={"help": "rollouts and evals: " + SPECULATIVE_TOKENS_HELP})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_generations < 2:
            raise ValueError("--num-generations must be >= 2 (advantages are relative to the group)")
        if self.prompts_per_step < 1:
            raise ValueError(f"--prompts-per-step {self.prompts_per_step}: must be ≥ 1")
        if self.max_completion_length < 1:
            raise ValueError(f"--max-completion-length {self.max_completion_length}: must be ≥ 1")
        if self.reward_weights and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"--reward-weights has {len(self.reward_weights)} values for "
                             f"{len(self.reward_funcs)} --reward-funcs")
        if self.num_iterations < 1:
            raise ValueError("--num-iterations must be >= 1")
        check_grpo_flags(self)

    @property
    def micro_batch_size(self) -> int:
        """Sequences per forward/backward of the update in one process (under torchrun the
        same split of each rank's share: grpo_update)."""
        return math.ceil(self.prompts_per_step * self.num_generations / self.gradient_accumulation_steps)


def check_grpo_flags(cfg: GRPOConfig) -> None:
    """The rest of GRPOConfig's checks, each one line naming the flag and its range: the task and
    its knobs, the sampling and loss knobs. (The checkpoint is checked when grpo() resolves it: a
    config that only carries the loss knobs, as for grpo_update, has none.)"""
    from ..tasks import task_from_flags

    def need(ok: bool, name: str, msg: str) -> None:
        if not ok:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: {msg}")

    need(0 < cfg.temperature < math.inf, "temperature", "must be a finite number > 0 (log-probs divide by it)")
    need(0 <= cfg.eval_temperature < math.inf, "eval_temperature", "must be a finite number ≥ 0 (0 = greedy)")
    need(0 < cfg.top_p <= 1, "top_p", "must be in (0, 1]")
    need(0 <= cfg.beta < math.inf, "beta", "must be a finite number ≥ 0")
    need(0 <= cfg.epsilon < 1, "epsilon", "must be in [0, 1)")
    need(cfg.epsilon_high is None or cfg.epsilon <= cfg.epsilon_high < math.inf, "epsilon_high",
         f"must be a finite number ≥ --epsilon {cfg.epsilon}")
    need(cfg.eval_problems >= 1, "eval_problems", "must be ≥ 1")
    need(cfg.ref_model_sync_steps >= 0, "ref_model_sync_steps", "must be ≥ 0 (0 = never)")
    need(cfg.speculative_tokens >= 0, "speculative_tokens", "must be ≥ 0 (0 = off)")
    need(0 <= cfg.mtp_weight < math.inf, "mtp_weight", "must be a finite number ≥ 0")
    task_from_flags(cfg.task, cfg.task_args)


# ---------------------------------------------------------------------- prompts
def build_prompt(problem, tok: Tokenizer, template: str) -> list[int]:
    """Prompt ids. chat: the user turn then `<|assistant|>` (the model opens <think> itself —
    a template that pre-opens it must score with think_preopened, or format never fires);
    r1-zero: the R1-Zero text prompt after <|bos|>, for base models."""
    if template == "chat":
        return tok.render_chat([{"role": "user", "content": problem.prompt}], add_generation_prompt=True)[0]
    if template == "r1-zero":
        return tok.encode(r1_zero_prompt(problem), add_bos=True, allow_special=False)
    raise ValueError(f"--template must be chat or r1-zero, got {template!r}")


def reward_kwargs(template: str) -> dict:
    """How the answer contract reads completions in each mode (see tasks.base)."""
    return {"answer_tags": True} if template == "r1-zero" else {"answer_tags": False}


# ---------------------------------------------------------------------- rollouts
@dataclass
class Rollout:
    prompt_ids: list[int]
    ids: list[int]          # completion tokens (the stop token included when it was generated)
    truncated: bool         # hit max_completion_length without stopping


class EngineSampler:
    """Rollouts through nanoseek.engine around the live policy object.

    The engine holds the same nn.Module the optimizer updates (no weight copy per step). What
    it keeps across calls — pre-folded decode weights, the prefix cache's latents — was computed
    from *earlier* weights, so it is refreshed before every rollout; within one call the G
    samples of a prompt still share the prompt's cached blocks.
    """

    def __init__(self, model, tok: Tokenizer, max_num_seqs: int, max_len: int, speculative_tokens: int = 0):
        from ..engine import Engine

        self.engine = Engine(model, tok, max_num_seqs=max_num_seqs,
                             max_batch_tokens=max(2048, max_num_seqs * 32),
                             cache_tokens=max_num_seqs * max_len, enable_prefix_cache=True,
                             speculative_tokens=speculative_tokens)
        self.model, self.tok = model, tok

    def generate(self, prompts, max_tokens, temperature, top_p=1.0, seed=None, skip: int = 0) -> list[Rollout]:
        """Sample a completion of each prompt, each with its own seed from `seed`'s stream.

        `skip` seeds of that stream are passed over first: a rank holding the prompts from
        position `skip` of the whole batch gives each the seed it has in one process, so one
        and several processes sample the same completions."""
        from ..engine import SamplingParams

        was_training = self.model.training
        self.model.eval()
        # the engine keeps weight-derived state (pre-folded decode weights, cached prefixes):
        # refresh it, or this step would sample from the previous step's policy
        self.engine.update_weights()
        base = random.Random(seed)
        for _ in range(skip):
            base.randrange(2**31)
        params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                 seed=base.randrange(2**31), stop_token_ids=[self.tok.eos_id])
                  for _ in prompts]
        outs = self.engine.generate([list(p) for p in prompts], params)
        if was_training:
            self.model.train()
        res = []
        for p, o in zip(prompts, outs):
            ids = list(o.token_ids)
            if o.finish_reason == "stop" and (not ids or ids[-1] != self.tok.eos_id):
                ids.append(self.tok.eos_id)
            res.append(Rollout(p, ids, o.finish_reason == "length"))
        return res


# ---------------------------------------------------------------------- log-probs
@dataclass
class RolloutBatch:
    """Rollouts as the update's forward reads them: each distinct prompt once and every real
    token once (`SharedPrefixBatch`: a completion's last token is no input, it predicts nothing),
    the completions right-padded (N, C) as targets with their lengths, and for each target the
    flat token whose hidden state predicts it (the prompt's last for slot 0; padding: 0). For
    the MTP loss (built with mtp=True), each whole sequence (prompt + completion) right-padded
    (N, L): the flat token of every position, its id, and its next token where that is a
    completion token (else −100)."""
    flat: SharedPrefixBatch
    comp: torch.Tensor
    lens: torch.Tensor
    source: torch.Tensor
    seq_rows: torch.Tensor | None = None  # None unless built with mtp=True
    seq_ids: torch.Tensor | None = None
    seq_targets: torch.Tensor | None = None

    @classmethod
    def of(cls, rollouts: list[Rollout], pad_id: int, device, mtp: bool = False) -> "RolloutBatch":
        index: dict[tuple[int, ...], int] = {}
        group = [index.setdefault(tuple(r.prompt_ids), len(index)) for r in rollouts]
        flat = SharedPrefixBatch.of([list(p) for p in index], [r.ids[:-1] for r in rollouts], group, device)
        C = max(1, max(len(r.ids) for r in rollouts))
        comp = torch.full((len(rollouts), C), pad_id, dtype=torch.long)
        for i, r in enumerate(rollouts):
            comp[i, :len(r.ids)] = torch.tensor(r.ids, dtype=torch.long)
        # row_slots is max(1, C − 1) wide, so there are always ≥ C columns to keep
        source = torch.cat((flat.last[flat.group][:, None], flat.row_slots), 1)[:, :C]
        lens = torch.tensor([len(r.ids) for r in rollouts], device=device)
        if not mtp:
            return cls(flat, comp.to(device), lens, source)
        starts = [0]
        for p in index:
            starts.append(starts[-1] + len(p))
        L = max(len(r.prompt_ids) + len(r.ids) - 1 for r in rollouts)
        rows = torch.zeros(len(rollouts), L, dtype=torch.long)
        ids = torch.full((len(rollouts), L), pad_id, dtype=torch.long)
        tgt = torch.full((len(rollouts), L), -100, dtype=torch.long)
        slots = flat.row_slots.cpu()
        for i, (r, g) in enumerate(zip(rollouts, group)):
            P, n = len(r.prompt_ids), len(r.ids) - 1
            rows[i, :P] = torch.arange(starts[g], starts[g] + P)
            rows[i, P:P + n] = slots[i, :n]
            ids[i, :P + n] = torch.tensor((list(r.prompt_ids) + r.ids)[:P + n])
            tgt[i, P - 1:P + n] = torch.tensor(r.ids)
        return cls(flat, comp.to(device), lens, source, rows.to(device), ids.to(device), tgt.to(device))


def completion_logprobs(model, b: RolloutBatch, with_entropy: bool = False, temperature: float = 1.0,
                        hidden: torch.Tensor | None = None):
    """log π(completion token | prefix) for every completion slot, (N, C); optional entropy.

    One forward of the batch's real tokens, each distinct prompt once
    (`shared_prefix_hidden_states`, or its result `hidden`); the final norm, lm_head and
    log-softmax then run on the N·C hidden states that predict completion tokens only. The
    logits are divided by the sampling temperature, as TRL does: the policy being optimised is
    the one the rollouts were drawn from."""
    if hidden is None:
        hidden = shared_prefix_hidden_states(model, b.flat)
    h = hidden.index_select(0, b.source.flatten()).unflatten(0, b.source.shape)
    logits = model.lm_head(model.norm(h)).float()
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    logp_all = logits.log_softmax(-1)
    logp = logp_all.gather(-1, b.comp[..., None]).squeeze(-1)
    if not with_entropy:
        return logp, None
    with torch.no_grad():
        ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, ent


def rollout_mtp_loss(model, b: RolloutBatch, hidden: torch.Tensor) -> torch.Tensor | None:
    """V3's MTP loss (eq. 25) on the batch's whole sequences, predicting their completion
    tokens, from the policy's flat hidden states `hidden` detached and its embedding and head
    read without gradient: it trains the MTP module(s) to draft what the policy writes, and
    leaves the policy's gradient to GRPO's loss."""
    return model.mtp_loss(hidden.detach()[b.seq_rows], b.seq_ids, b.seq_targets, train_shared=False)


# ---------------------------------------------------------------------- one step
def score(rollouts: list[Rollout], problems, tok: Tokenizer, reward_fn, rkw: dict):
    texts = [tok.decode(r.ids) for r in rollouts]
    total, comps = reward_fn(texts, problems, **rkw)
    return torch.tensor(total, dtype=torch.float32), comps, texts


def grpo_update(trainer: Trainer, ref_model, rollouts: list[Rollout], rewards: torch.Tensor, cfg: GRPOConfig,
                pad_id: int) -> dict:
    """Advantages, masks and `num_iterations` optimizer passes (`trainer.train_step`) for one
    rollout batch: one step of the schedule.

    Returns the step's stats (TRL names where they exist); also exposes the tensors the tests
    recompute by hand under 'debug'.

    Under torchrun `rollouts` and `rewards` are this rank's: whole prompt groups, rank r holding
    the r-th contiguous slice of the step's batch. The advantages and dynamic sampling read the
    whole batch's rewards (gathered: a batch std needs them all), and the normalisers — the kept
    sequences N, the tokens that count — are the whole batch's (summed over ranks), so the
    averaged gradient is the one a single process computes."""
    rt = trainer.rt
    G = cfg.num_generations
    model = trainer.model
    device = trainer.device
    everyone = gather_rows(rewards, rt)  # the whole batch's rewards (these very ones in one process)
    adv = group_advantages(everyone, G, cfg.scale_rewards)
    keep = filter_equal_reward_groups(everyone, G) if cfg.dynamic_sampling else torch.ones_like(everyone, dtype=torch.bool)
    stats: dict = {"frac_reward_zero_std": frac_reward_zero_std(everyone, G),
                   "num_sequences_trained": int(keep.sum())}
    N = int(keep.sum())
    mine = slice(rt.rank * rewards.numel(), (rt.rank + 1) * rewards.numel())
    adv, keep = adv[mine][keep[mine]], keep[mine]
    kept = [r for r, k in zip(rollouts, keep.tolist()) if k]
    # the loss normalisers count every kept sequence: N, and the tokens that count (dapo)
    def counts(rs: list[Rollout]) -> int:
        return sum(0 if cfg.mask_truncated_completions and r.truncated else len(r.ids) for r in rs)

    # A sequence with advantage 0 adds exactly 0 to the loss and to its gradient when beta = 0
    # (−min(ρ·0, clip(ρ)·0) = 0 for any ρ), so its forward and backward are skipped; it still
    # counts in the normalisers, so the update is the one over the whole batch.
    live = adv != 0 if cfg.beta == 0 else torch.ones_like(adv, dtype=torch.bool)
    sel = [r for r, k in zip(kept, live.tolist()) if k]
    n_tok_kept, n_live, n_tok_live = all_reduce_sum([counts(kept), len(sel), counts(sel)], rt)
    n_tok_total = float(max(1, n_tok_kept))
    stats["num_sequences_skipped_zero_adv"] = int(N - n_live)
    if not n_live:
        stats["skipped"] = True
        stats.update(trainer.train_step([], None))  # nothing to learn from: the step still counts
        return stats
    adv = adv[live].to(device)
    # sequences per forward: ⌈prompts · G / gradient_accumulation_steps⌉ of this rank's share
    mb = max(1, math.ceil(cfg.prompts_per_step // rt.world_size * G / cfg.gradient_accumulation_steps))
    chunks = [slice(i, min(len(sel), i + mb)) for i in range(0, len(sel), mb)]
    batches = [RolloutBatch.of(sel[c], pad_id, device, mtp=cfg.mtp_weight > 0) for c in chunks]
    masks = []  # (n, C) per micro-batch: the completion tokens that count
    for c, b in zip(chunks, batches):
        m = (torch.arange(b.comp.shape[1], device=device)[None] < b.lens[:, None]).float()
        if cfg.mask_truncated_completions:
            m = m * (~torch.tensor([r.truncated for r in sel[c]], device=device)).float()[:, None]
        masks.append(m)
    toks = [float(m.sum()) for m in masks]  # tokens that count, per micro-batch
    n_tok_live = float(n_tok_live) or 1.0  # the whole batch's: Σ toks in one process

    T = cfg.temperature
    old = ref = None
    if cfg.num_iterations > 1 or cfg.beta:
        with torch.no_grad(), trainer.autocast():
            if cfg.num_iterations > 1:
                model.eval()
                old = [completion_logprobs(model, b, temperature=T)[0] for b in batches]
            if cfg.beta:
                ref = [completion_logprobs(ref_model, b, temperature=T)[0] for b in batches]
    model.train()
    agg: dict[str, float] = {}
    ent_sum = 0.0
    debug_logp = []
    # each loss_type normalises over the whole batch: the micro-batch means are re-weighted (× the
    # world size: the ranks' gradients are averaged, and the whole batch's loss is their sum)
    W = rt.world_size
    weights = [W * tok_c / n_tok_total if cfg.loss_type == "dapo" else W * (c.stop - c.start) / N
               for c, tok_c in zip(chunks, toks)]
    for it in range(cfg.num_iterations):
        def loss_fn(_, j: int):
            nonlocal ent_sum
            c, b, m, tok_c = chunks[j], batches[j], masks[j], toks[j]
            hidden = shared_prefix_hidden_states(model, b.flat)
            logp, ent = completion_logprobs(model, b, with_entropy=(it == 0), temperature=T, hidden=hidden)
            loss, st = grpo_loss(logp, None if old is None else old[j], None if ref is None else ref[j],
                                 adv[c], m, loss_type=cfg.loss_type, epsilon=cfg.epsilon,
                                 epsilon_high=cfg.epsilon_high, beta=cfg.beta,
                                 max_completion_length=cfg.max_completion_length)
            for k, v in st.items():  # token means over the sequences trained on
                agg[k] = agg.get(k, 0.0) + v * tok_c / n_tok_live / cfg.num_iterations
            if it == 0:
                ent_sum += float((ent * m).sum())
                debug_logp.append(logp.detach())
            bal = balance_loss(model) if cfg.balance_alpha else None
            if bal is not None:
                loss = loss + cfg.balance_alpha * bal
            mtp = rollout_mtp_loss(model, b, hidden) if cfg.mtp_weight else None
            if mtp is not None:
                return loss + cfg.mtp_weight * mtp, {"mtp_loss": mtp}
            return loss, {}

        step = trainer.train_step(list(range(len(batches))), loss_fn, weights=weights,
                                  advance=it == cfg.num_iterations - 1)
        agg["loss"] = agg.get("loss", 0.0) + step["loss"] / cfg.num_iterations
        if "mtp_loss" in step:
            agg["mtp_loss"] = agg.get("mtp_loss", 0.0) + step["mtp_loss"] / cfg.num_iterations
    if rt.distributed:  # token means over the whole batch: each rank summed its share
        names = [*LOSS_STATS, *(["kl"] if ref is not None else [])]
        *sums, ent_sum = all_reduce_sum([agg.get(k, 0.0) for k in names] + [ent_sum], rt)
        agg.update(zip(names, sums))
    stats.update(agg)
    stats.update(lr=step["lr"], grad_norm=step["grad_norm"], **({"max_violation": step["max_violation"]}
                                                              if "max_violation" in step else {}))
    stats["entropy"] = ent_sum / n_tok_live
    C = max((m.shape[1] for m in masks), default=0)  # micro-batches are padded to their own longest completion
    stats["debug"] = {"advantages": adv.cpu(), "keep": keep.cpu(),
                      "mask": torch.cat([F.pad(m, (0, C - m.shape[1])) for m in masks]).cpu() if masks else None,
                      "logp": torch.cat([F.pad(x, (0, C - x.shape[1])) for x in debug_logp]).cpu() if masks else None}
    return stats


# ---------------------------------------------------------------------- eval
@torch.no_grad()
def evaluate(sampler, problems, tok: Tokenizer, cfg: GRPOConfig, task, rt: Runtime | None = None) -> dict:
    """Held-out accuracy and format with pinned sampling (eval_temperature, eval_seed).

    Under torchrun each rank samples a contiguous share of the problems (each with the seed it
    has in one process) and the per-problem scores are gathered, so every rank returns the
    figures one process would."""
    from ..tasks.rewards import format_reward

    rt = rt or Runtime()
    n, share = len(problems), math.ceil(len(problems) / rt.world_size)
    lo, hi = min(n, rt.rank * share), min(n, (rt.rank + 1) * share)
    prompts = [build_prompt(p, tok, cfg.template) for p in problems[lo:hi]]
    outs = sampler.generate(prompts, cfg.max_completion_length, cfg.eval_temperature, 1.0, cfg.eval_seed,
                            skip=lo) if prompts else []
    texts = [tok.decode(o.ids) for o in outs]
    acc = [float(task.check(task.parse(t), p)) for t, p in zip(texts, problems[lo:hi])]
    fmt = format_reward(texts, problems[lo:hi], **reward_kwargs(cfg.template))
    trunc = [o.truncated for o in outs]
    if rt.distributed:  # each rank's rows padded to one share (NaN), gathered, the padding dropped
        rows = torch.full((share, 3), float("nan"), dtype=torch.float64)
        rows[:len(outs)] = torch.tensor([acc, fmt, trunc], dtype=torch.float64).T.reshape(-1, 3)
        every = gather_rows(rows, rt)
        acc, fmt, trunc = every[~every[:, 0].isnan()].T.tolist()
    return {"eval_accuracy": sum(acc) / len(acc), "eval_format": sum(fmt) / len(fmt),
            "eval_truncated": sum(trunc) / len(trunc)}


# ---------------------------------------------------------------------- the command
def build_reference(model, beta: float):
    """The frozen reference policy for the KL term — only when beta != 0 (it costs a model's
    memory and a forward per step; TRL and DAPO/Dr. GRPO run with beta = 0 and none at all)."""
    if not beta:
        return None
    return copy.deepcopy(model).eval().requires_grad_(False)


class ProblemStream:
    """GRPO's data position: the problem sampler's and the rollout seeds' random state, and the
    reference policy (it moves with --ref-model-sync-steps), saved with every checkpoint."""

    def __init__(self, seed: int, ref_model=None):
        self.rng = random.Random(seed)
        self.ref_model = ref_model

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(),
                "reference": None if self.ref_model is None else self.ref_model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
        if self.ref_model is not None and state.get("reference") is not None:
            self.ref_model.load_state_dict(state["reference"])


def grpo(cfg: GRPOConfig, on_step=None) -> Path:
    """GRPO on a verifiable task: engine rollouts, rule rewards, clipped surrogate (+ k3 KL)."""
    from ..report import write_report

    ckpt = ckpt_flag(cfg.ckpt)
    task = get_task(cfg.task, **cfg.task_args)  # a bad task or knob fails before the run starts
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.prompts_per_step % world:
        raise ValueError(f"--prompts-per-step {cfg.prompts_per_step}: must divide by the {world} processes "
                         "(each rolls out whole prompt groups)")
    if world > 1 and cfg.fsdp:
        raise ValueError("--fsdp: grpo's update forward is not the module's own, so it cannot be sharded; "
                         "under torchrun it runs data parallel (drop --fsdp)")
    rt = start_run(cfg)
    tok = Tokenizer.load(ckpt)
    model = load_pretrained(ckpt, device=rt.device)
    weights = cfg.reward_weights or [1.0] * len(cfg.reward_funcs)
    reward_fn = weighted({name: (load_reward(name), w) for name, w in zip(cfg.reward_funcs, weights)})
    rkw = reward_kwargs(cfg.template)
    ref_model = build_reference(model, cfg.beta)
    # data parallel under torchrun: each rank rolls out and trains on its whole prompt groups
    trainer = Trainer(cfg, model, tokenizer=tok, rt=rt, grad_sync="all_reduce")
    G = cfg.num_generations
    per_rank = cfg.prompts_per_step // rt.world_size
    n_batch = per_rank * G
    sampler = EngineSampler(model, tok, max(n_batch, math.ceil(cfg.eval_problems / rt.world_size)),
                            min(model.config.max_position_embeddings, cfg.max_completion_length + 384),
                            cfg.speculative_tokens)
    train_pool = task.make(max(2000, cfg.prompts_per_step * 50), cfg.seed, split="train")
    heldout = task.make(cfg.eval_problems, cfg.eval_seed, split="test")
    stream = ProblemStream(cfg.seed, ref_model)
    if rt.is_main:
        print(f"grpo: {cfg.task} {cfg.task_args} template={cfg.template}, {cfg.prompts_per_step} prompts × "
              f"G={G} per step{f' ({per_rank} on each of {rt.world_size} ranks)' if rt.distributed else ''}, "
              f"beta={cfg.beta} ({'reference model' if ref_model is not None else 'no reference model'}) "
              f"on {rt.device}")

    def step_fn(tr: Trainer) -> dict:
        step = tr.step + 1
        # every rank draws the step's problems and rollout seed alike and takes its slice of them
        problems = stream.rng.sample(train_pool, cfg.prompts_per_step)[rt.rank * per_rank:(rt.rank + 1) * per_rank]
        expanded = [p for p in problems for _ in range(G)]
        prompts = [build_prompt(p, tok, cfg.template) for p in expanded]
        t0 = time.time()
        rollouts = sampler.generate(prompts, cfg.max_completion_length, cfg.temperature, cfg.top_p,
                                    seed=stream.rng.randrange(2**31), skip=rt.rank * n_batch)
        t_gen = time.time() - t0
        rewards, comps, _ = score(rollouts, expanded, tok, reward_fn, rkw)
        t1 = time.time()
        st = grpo_update(tr, ref_model, rollouts, rewards, cfg, tok.pad_id)
        st.pop("debug", None)
        if ref_model is not None and cfg.ref_model_sync_steps and step % cfg.ref_model_sync_steps == 0:
            ref_model.load_state_dict(model.state_dict())
        t_upd = time.time() - t1
        lens, truncs = [len(r.ids) for r in rollouts], [r.truncated for r in rollouts]
        if rt.distributed:  # the metrics are the whole batch's: every rank's completions, in rank order
            cols = gather_rows(torch.tensor([lens, truncs, *comps.values()], dtype=torch.float64).T, rt).T.tolist()
            lens, truncs = [int(x) for x in cols[0]], [bool(x) for x in cols[1]]
            comps = dict(zip(comps, cols[2:]))
            rewards = gather_rows(rewards, rt)
        n_gen_tok = sum(lens)
        tr.tokens_seen += n_gen_tok
        trunc = sum(truncs) / len(truncs)
        rec = {"reward": float(rewards.mean()), "reward_std": float(rewards.std()),
               **{f"rewards/{k}": sum(v) / len(v) for k, v in comps.items()},
               "accuracy": sum(comps["accuracy"]) / len(lens) if "accuracy" in comps else None,
               "completions/mean_length": n_gen_tok / len(lens),
               "completions/clipped_ratio": trunc,
               "tokens_per_s": round(n_gen_tok / max(1e-9, t_gen + t_upd), 1),
               "rollout_s": round(t_gen, 2), "update_s": round(t_upd, 2), **st}
        if not rt.is_main:  # every rank holds the same figures; one says them
            return rec
        if trunc == 1.0:
            warnings.warn(f"grpo step {step}: EVERY completion hit max_completion_length="
                          f"{cfg.max_completion_length}: rewards are 0 and the gradient is 0 — "
                          "raise --max-completion-length or shorten the answers", stacklevel=1)
        if rec["frac_reward_zero_std"] == 1.0:
            warnings.warn(f"grpo step {step}: EVERY group had equal rewards (advantage 0, nothing "
                          "learned) — the task is too hard or too easy for this model, or the "
                          "reward never fires (format/template mismatch?)", stacklevel=1)
        if not cfg.progress:
            acc = "" if rec["accuracy"] is None else f" acc {rec['accuracy']:.3f}"  # custom rewards may have none
            print(f"grpo step {step}: reward {rec['reward']:.3f}{acc} "
                  f"fmt {rec.get('rewards/format', float('nan')):.3f} zero_std {rec['frac_reward_zero_std']:.2f} "
                  f"len {rec['completions/mean_length']:.0f} kl {rec.get('kl', 0):.4f} "
                  f"ent {rec.get('entropy', float('nan')):.3f} {rec['tokens_per_s']} tok/s", flush=True)
        return rec

    def eval_fn(tr: Trainer) -> dict:
        ev = evaluate(sampler, heldout, tok, cfg, task, rt)
        if rt.is_main:
            print(f"grpo eval step {tr.step}: accuracy {ev['eval_accuracy']:.3f} format {ev['eval_format']:.3f}",
                  flush=True)
        return ev

    out = trainer.fit(stream, step_fn=step_fn, evaluate=eval_fn, on_step=on_step, eval_at_start=True)
    if not rt.is_main:  # the main rank writes the run's files
        return out
    title = f"GRPO {cfg.task} {cfg.task_args} ({cfg.template})"
    plot(read_metrics(cfg.out), Path(cfg.out) / "grpo.png", title=title)
    write_report(cfg.out, title=title)
    print(f"grpo: saved {out}, metrics {Path(cfg.out) / 'metrics.jsonl'}, plot {Path(cfg.out) / 'grpo.png'}")
    return out


def plot(history: list[dict], path: Path, title: str = "GRPO") -> Path:
    """Training reward / format and held-out accuracy against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    tr = [h for h in history if "reward" in h]
    if tr:
        ax.plot([h["step"] for h in tr], [h["accuracy"] for h in tr], alpha=0.5, label="train accuracy (rollouts)")
        if "rewards/format" in tr[0]:
            ax.plot([h["step"] for h in tr], [h["rewards/format"] for h in tr], alpha=0.5, label="train format reward")
    ev = [h for h in history if "eval_accuracy" in h]
    ax.plot([h["step"] for h in ev], [h["eval_accuracy"] for h in ev], "o-", lw=2, label="held-out accuracy")
    ax.plot([h["step"] for h in ev], [h["eval_format"] for h in ev], "s--", label="held-out format")
    ax.set_xlabel("GRPO step")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
