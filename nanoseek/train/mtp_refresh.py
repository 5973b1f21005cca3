"""`nanoseek mtp-refresh`: re-fit the MTP module(s) to what the final model writes.

    nanoseek mtp-refresh --ckpt runs/demo/grpo --out runs/demo/mtp --task arithmetic

The MTP module is trained in pretraining, then SFT and RL move the main model away from it: the
chat template, the reasoning trace, the RL-sharpened answers are text it never learnt to draft,
and as a speculative-decoding draft its acceptance falls. This stage fixes that cheaply: the
model writes completions of a task's training prompts (or of a chat jsonl's prompts) through the
engine — greedy by default, as it is served — and only the MTP module(s) are trained on them,
with V3's MTP loss (eq. 25) on the completion tokens, the main model frozen (its hidden states
are computed without gradient, so its weights leave the stage exactly as they came in).
`--reuse R` also trains the last module fed its own output R times, which is how the engine
drafts past the D modules (`--speculative-tokens k > D`).

The measure is acceptance: before training and at the end the engine decodes held-out prompts
with `--speculative-tokens` drafts, and the share of drafts kept at each position is logged
(eval_acceptance_pos1 …, eval_mean_accepted_length) and is the report card's held-out figure.
The sequences are packed as SFT packs conversations, on the same training core.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from ..checkpoint import ckpt_flag, load_pretrained
from ..tokenizer import Tokenizer
from .loop import Trainer, TrainConfig, start_run
from .sft import PackedBatches, attention_mask, load_conversations, pack, trim


@dataclass(kw_only=True)
class MTPRefreshConfig(TrainConfig):
    """`nanoseek mtp-refresh`: the shared training knobs with this stage's defaults, the prompts
    the model writes on, how it writes them, and the acceptance measure."""

    SCHEDULE_FIELDS: ClassVar[tuple[str, ...]] = (*TrainConfig.SCHEDULE_FIELDS, "batch_size", "seq_len")

    ckpt: str = field(metadata={"help": "the final model: a checkpoint directory or any stage's run directory"})
    out: str = field(metadata={"help": "run directory: model/ (the checkpoint with the re-fitted MTP), config.json, "
                                       "metrics.jsonl, report.md"})
    task: str = field(default="arithmetic", metadata={"help": "the task whose training prompts the model writes on "
                                                              "(arithmetic | countdown | gsm8k); ignored with --data"})
    task_args: dict = field(default_factory=dict, metadata={"help": 'task knobs as JSON, e.g. {"digits": 3}'})
    data: str | None = field(default=None, metadata={"help": "a chat jsonl instead of a task: each conversation up "
                                                             "to its last assistant turn is a prompt"})
    template: str = field(default="chat", metadata={"help": "prompt template of a task's problems",
                                                    "choices": ["chat", "r1-zero"]})
    num_prompts: int = field(default=1024, metadata={"help": "prompts the model writes completions of"})
    eval_prompts: int = field(default=64, metadata={"help": "held-out prompts the acceptance is measured on"})
    max_new_tokens: int = field(default=128, metadata={"help": "tokens per completion at most"})
    temperature: float = field(default=0.0, metadata={"help": "the model's sampling while it writes and while "
                                                               "acceptance is measured (0 = greedy)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass (with --temperature > 0)"})
    speculative_tokens: int = field(default=2, metadata={"help": "draft tokens per step in the acceptance measure"})
    reuse: int = field(default=1, metadata={"help": "depths of the last module fed its own output also trained "
                                                    "(the drafts past the D modules); 0 = the MTP chain only"})
    max_steps: int = field(default=300, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=16, metadata={"help": "packed rows per optimizer step (all ranks)"})
    seq_len: int = field(default=256, metadata={"help": "tokens per packed row"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate"})
    warmup_steps: int = field(default=10, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decay on matrices (not norms/embeddings/biases)"})
    router_gamma: float = field(default=0.0, metadata={"help": "γ of the router-bias update; 0 = off (the main "
                                                               "model's routers must not move)"})
    balance_alpha: float = field(default=0.0, metadata={"help": "α of the sequence-wise balance loss; 0 = off"})
    eval_steps: int = field(default=0, metadata={"help": "steps between acceptance measures; 0 = at the start and the end"})
    save_steps: int = field(default=0, metadata={"help": "steps between resumable checkpoints; 0 = only RUN/model at the end"})

    def __post_init__(self) -> None:
        """The shared checks, then this stage's, each one line naming the flag."""
        super().__post_init__()
        from ..tasks import task_from_flags

        def need(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: {msg}")

        for name in ("num_prompts", "eval_prompts", "max_new_tokens", "speculative_tokens"):
            need(getattr(self, name) >= 1, name, "must be ≥ 1")
        need(self.reuse >= 0, "reuse", "must be ≥ 0")
        need(0 <= self.temperature < math.inf, "temperature", "must be a finite number ≥ 0 (0 = greedy)")
        need(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        if self.data is None:
            task_from_flags(self.task, self.task_args)
        elif not Path(self.data).is_file():
            raise FileNotFoundError(f"--data {self.data}: no such file (expected a chat .jsonl)")
        ckpt_flag(self.ckpt)


def prompts_of(cfg: MTPRefreshConfig, tok: Tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """(training prompts, held-out prompts): a task's train and test problems, or a chat jsonl's
    conversations up to their last assistant turn (its last `eval_prompts` held out)."""
    if cfg.data is None:
        from ..tasks import get_task
        from .grpo import build_prompt

        task = get_task(cfg.task, **cfg.task_args)
        train = [build_prompt(p, tok, cfg.template) for p in task.make(cfg.num_prompts, cfg.seed, split="train")]
        test = [build_prompt(p, tok, cfg.template) for p in task.make(cfg.eval_prompts, cfg.seed, split="test")]
        return train, test
    prompts = []
    for msgs in load_conversations(cfg.data):
        last = max(i for i, m in enumerate(msgs) if m.get("role") == "assistant")
        prompts.append(tok.render_chat(msgs[:last], add_generation_prompt=True)[0])
    if len(prompts) <= cfg.eval_prompts:
        raise ValueError(f"--data {cfg.data}: {len(prompts)} conversations, but --eval-prompts {cfg.eval_prompts} "
                         "are held out; give more conversations or fewer --eval-prompts")
    return prompts[:-cfg.eval_prompts][:cfg.num_prompts], prompts[-cfg.eval_prompts:]


def _generate(model, tok: Tokenizer, prompts: list[list[int]], max_new_tokens: int, temperature: float,
              top_p: float, seed: int, k: int = 0):
    """The model (put in eval mode) writes after each prompt through the engine, prompt i seeded
    seed + i, with k drafts per step → (the engine, its outputs)."""
    from ..engine import Engine, SamplingParams

    model.eval()
    eng = Engine(model, tok, max_num_seqs=64, speculative_tokens=k)
    outs = eng.generate(prompts, [SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                                 seed=seed + i) for i in range(len(prompts))])
    return eng, outs


def acceptance(model, tok: Tokenizer, prompts: list[list[int]], k: int, max_new_tokens: int,
               temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> dict:
    """Decode `prompts` with k drafts per step → the share of drafts kept at each position
    (acceptance_pos1 …), overall, and the mean accepted length (tokens a verifying step emits)."""
    was = model.training
    st = _generate(model, tok, prompts, max_new_tokens, temperature, top_p, seed, k)[0].stats
    model.train(was)
    out = {f"acceptance_pos{i + 1}": a / d if d else 0.0
           for i, (a, d) in enumerate(zip(st["spec_num_accepted_tokens_per_pos"], st["spec_num_draft_tokens_per_pos"]))}
    out.update(acceptance=st["spec_acceptance_rate"], mean_accepted_length=st["spec_mean_accepted_length"])
    return out


def completions(model, tok: Tokenizer, prompts: list[list[int]], cfg: MTPRefreshConfig) -> list[tuple[list[int], list[int]]]:
    """What the model writes after each prompt → (prompt + completion, loss mask on the completion)."""
    outs = _generate(model, tok, prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed)[1]
    rows = []
    for p, o in zip(prompts, outs):
        ids = (p + o.token_ids)[:cfg.seq_len]
        rows.append((ids, ([0] * len(p) + [1] * len(o.token_ids))[:cfg.seq_len]))
    return rows


def mtp_step_loss(reuse: int):
    """loss_fn for Trainer: the MTP loss of a packed batch from the frozen main model's hidden states."""

    def fn(model, batch):
        ids, tgt, pos, doc = trim(batch)
        mask = attention_mask(doc)
        with torch.no_grad():
            h = model.hidden_states(ids, positions=pos, mask=mask)
        loss = model.mtp_loss(h, ids, tgt, positions=pos, mask=mask, reuse=reuse)
        return loss, {"mtp_loss": loss}

    return fn


def mtp_refresh(cfg: MTPRefreshConfig, on_step=None) -> Path:
    """Re-fit the MTP module(s) on the model's own outputs (main model frozen); report acceptance."""
    from ..report import write_report

    ckpt = ckpt_flag(cfg.ckpt)
    rt = start_run(cfg)
    tok = Tokenizer.load(ckpt)
    model = load_pretrained(ckpt, device=rt.device)
    if not model.config.num_nextn_predict_layers:
        raise ValueError(f"--ckpt {cfg.ckpt}: the model has no MTP module (num_nextn_predict_layers = 0)")
    train, test = prompts_of(cfg, tok)
    rows = pack(completions(model, tok, train, cfg), cfg.seq_len, tok.pad_id)
    model.requires_grad_(False)
    model.mtp.requires_grad_(True)
    if rt.is_main:
        print(f"mtp-refresh: {len(train)} completions by {cfg.ckpt} → {len(rows)} rows of {cfg.seq_len}; "
              f"{cfg.max_steps} steps on the MTP module(s) only (reuse {cfg.reuse}), acceptance on {len(test)} "
              f"held-out prompts with {cfg.speculative_tokens} drafts", flush=True)
    # the forward is the frozen trunk's hidden states and then the MTP modules, not the module's
    # own: data parallel by one all-reduce of the MTP gradients
    trainer = Trainer(cfg, model, tokenizer=tok, rt=rt, grad_sync="all_reduce")

    def evaluate(tr: Trainer) -> dict:
        acc = acceptance(model, tok, test, cfg.speculative_tokens, cfg.max_new_tokens, cfg.temperature,
                         cfg.top_p, cfg.seed)
        if rt.is_main:
            per = " ".join(f"{acc[f'acceptance_pos{i + 1}']:.1%}" for i in range(cfg.speculative_tokens))
            print(f"mtp-refresh step {tr.step}: acceptance by draft position {per}, "
                  f"mean accepted length {acc['mean_accepted_length']:.2f}", flush=True)
        return {f"eval_{k}": v for k, v in acc.items()}

    data = PackedBatches(rows, cfg.batch_size, cfg.seed, rt.rank, rt.world_size)
    out = trainer.fit(data, mtp_step_loss(cfg.reuse), evaluate=evaluate, on_step=on_step, eval_at_start=True)
    if rt.is_main:
        write_report(cfg.out, title=f"mtp-refresh: {cfg.data or cfg.task} from {cfg.ckpt}")
        print(f"mtp-refresh: saved {out}")
    return out
