"""`nanoseek distill`: train a small student on the teacher — sequence-level KD (SFT on its
verified traces), logit KD (the teacher's distribution at every trace token), or on-policy
distillation (the student's own samples, scored token by token by the teacher).

    nanoseek distill --teacher runs/demo/grpo --student dense-small --data traces/traces.jsonl \\
        --loss kl --out runs/distill

Option names are TRL's (GKDTrainer): `beta` (the generalized JSD's interpolation, see
`losses`), `lmbda` (the fraction of batches sampled from the student), `temperature` (of the
divergence and of the samples), `seq_kd` (off-policy batches sampled from the teacher instead
of read from --data), `max_new_tokens` (the length of those samples).

    --loss sft         cross-entropy on the traces (what DeepSeek did for R1-Distill)
    --loss kl          forward KL(teacher ‖ student) on the trace tokens        (β = 0)
    --loss reverse_kl  reverse KL(student ‖ teacher) on the trace tokens        (β = 1)
    --loss jsd         generalized JSD_β on the trace tokens                     (β = --beta, 0.5)
    --loss on_policy   a fraction --lmbda (1) of the batches is the student's own completions of
                       the traces' prompts, sampled through the engine from the live weights;
                       every batch is scored by JSD_β (β = --beta, 1: reverse KL, the teacher
                       judging each token the student chose)

The tokens that carry a loss are the SFT loss's: assistant tokens of the traces, completion
tokens of the samples; the prompt never does. The data is `nanoseek sft`'s (a chat jsonl or a
built-in set, read and, with --pack, packed the same way); the run is the shared training
core's (resume, dtype, torchrun, metrics, RUN/model, report).

A student is a preset (`dense-small`, any nanoseek preset) built with the teacher's tokenizer
and vocabulary size, or a checkpoint whose tokenizer is the teacher's: the divergence compares
the two models' distributions over the same token ids.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..checkpoint import ckpt_flag, load_pretrained
from ..config import PRESETS, SET_HELP, ModelConfig, parse_overrides, preset_with
from ..tokenizer import Tokenizer
from ..train.loop import Trainer, TrainConfig, balance_loss, start_run
from ..train.sft import (PackedBatches, attention_mask, load_conversations, pack, sft_step_loss, steps_for_epochs,
                         tokenize, trim)
from .losses import generalized_jsd_loss

LOSSES = ("sft", "kl", "reverse_kl", "jsd", "on_policy")
FIXED_BETA = {"kl": 0.0, "reverse_kl": 1.0}
DEFAULT_BETA = {"jsd": 0.5, "on_policy": 1.0}


@dataclass(kw_only=True)
class DistillConfig(TrainConfig):
    """`nanoseek distill`: the shared training knobs, the teacher, the student and TRL's GKD options."""

    SCHEDULE_FIELDS: ClassVar[tuple[str, ...]] = (*TrainConfig.SCHEDULE_FIELDS, "batch_size", "seq_len", "epochs")
    MIN_STEPS: ClassVar[int] = 0

    teacher: str = field(metadata={"help": "teacher checkpoint (with tokenizer.json), or any stage's run directory"})
    student: str = field(metadata={"help": f"a preset ({', '.join(p for p in PRESETS if p.startswith('dense'))}, "
                                           "or any other), built with the teacher's tokenizer; or a checkpoint "
                                           "directory sharing the teacher's tokenizer"})
    set: list[str] = field(default_factory=list, metadata={"help": "a preset student: " + SET_HELP, "repeatable": True})
    data: str = field(metadata={"help": "traces: a chat jsonl (`nanoseek distill traces` writes OUT/traces.jsonl; "
                                        "its directory works too) or builtin:sft-arith / builtin:sft-countdown[?...]"})
    out: str = field(metadata={"help": "run directory: model/ (the student, HF checkpoint + tokenizer), config.json, "
                                       "metrics.jsonl, report.md"})
    loss: str = field(default="kl", metadata={"help": "sft: sequence-level KD; kl / reverse_kl / jsd: logit KD on the "
                                                      "traces; on_policy: on the student's own samples",
                                              "choices": list(LOSSES)})
    beta: float | None = field(default=None, metadata={
        "help": "generalized JSD interpolation in [0, 1]: 0 = forward KL, 1 = reverse KL (default: 0.5 for jsd, "
                "1 for on_policy; kl and reverse_kl are 0 and 1)"})
    lmbda: float | None = field(default=None, metadata={
        "help": "on_policy: fraction of batches sampled from the student, in [0, 1] (default 1; the rest are "
                "the --data traces, or teacher samples with --seq-kd)"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature of the divergence and of the samples"})
    seq_kd: bool = field(default=False, metadata={"help": "off-policy batches are sampled from the teacher on the fly "
                                                          "(the traces' prompts) instead of read from --data"})
    max_new_tokens: int = field(default=128, metadata={"help": "tokens per sampled completion (on_policy, --seq-kd)"})
    epochs: float = field(default=2.0, metadata={"help": "passes over the data (fractional ok); sets the steps when --max-steps is 0"})
    max_steps: int = field(default=0, metadata={"help": "optimizer steps; 0 = as many as --epochs take"})
    batch_size: int = field(default=16, metadata={"help": "rows per optimizer step (all ranks): conversations, "
                                                          "or with --pack packed rows"})
    seq_len: int = field(default=256, metadata={"help": "tokens per row at most (a longer conversation is cut)"})
    learning_rate: float = field(default=3e-3, metadata={"help": "peak AdamW learning rate (cosine to --min-lr-ratio of it)"})
    warmup_steps: int = field(default=20, metadata={"help": "linear warmup steps"})
    router_gamma: float = field(default=0.0, metadata={"help": "γ of the aux-loss-free router-bias update (MoE students); 0 = off"})
    balance_alpha: float = field(default=0.0, metadata={"help": "α of the sequence-wise balance loss (MoE students); 0 = off"})
    pack: bool = field(default=False, metadata={
        "help": "pack several conversations per row (block-diagonal attention); off: one per row, cut to the "
                "batch's longest, on the model's faster causal path (best for short traces)"})

    def __post_init__(self) -> None:
        """The shared checks, then distillation's, each one line naming the flag, before a
        model is loaded or the run directory written."""
        super().__post_init__()
        if self.loss not in LOSSES:
            raise ValueError(f"--loss {self.loss!r}: choose one of {', '.join(LOSSES)}")
        if not (0 < self.epochs < math.inf) and not self.max_steps:
            raise ValueError(f"--epochs {self.epochs}: must be a finite number > 0 (or give --max-steps)")
        ckpt_flag(self.teacher, "--teacher")
        if self.student not in PRESETS:
            if not Path(self.student).exists():
                raise FileNotFoundError(f"--student {self.student}: neither a preset ({', '.join(PRESETS)}) "
                                        "nor a checkpoint directory")
            ckpt_flag(self.student, "--student")
            if self.set:
                raise ValueError(f"--set {' '.join(self.set)}: changes a preset student; --student {self.student} "
                                 "is a checkpoint, whose shape is its own")
        else:
            preset_with(self.student, self.set)  # a bad field or value is one line here
        if self.beta is not None and not 0 <= self.beta <= 1:
            raise ValueError(f"--beta {self.beta}: must be in [0, 1] (0 = forward KL, 1 = reverse KL)")
        if self.loss in FIXED_BETA and self.beta not in (None, FIXED_BETA[self.loss]):
            raise ValueError(f"--beta {self.beta}: --loss {self.loss} is β = {FIXED_BETA[self.loss]:g}; "
                             "use --loss jsd for another β")
        if self.loss == "sft" and self.beta is not None:
            raise ValueError(f"--beta {self.beta}: --loss sft has no divergence (choose kl, reverse_kl, jsd or on_policy)")
        if self.lmbda is not None:
            if self.loss != "on_policy":
                raise ValueError(f"--lmbda {self.lmbda}: the on-policy fraction applies to --loss on_policy only")
            if not 0 <= self.lmbda <= 1:
                raise ValueError(f"--lmbda {self.lmbda}: must be in [0, 1]")
        if not 0 < self.temperature < math.inf:
            raise ValueError(f"--temperature {self.temperature}: must be a finite number > 0")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens {self.max_new_tokens}: must be ≥ 1")
        if (self.on_policy_fraction or self.seq_kd) and self.max_new_tokens >= self.seq_len:
            raise ValueError(f"--max-new-tokens {self.max_new_tokens}: must be below --seq-len {self.seq_len} "
                             "(a prompt and its sampled completion share a row)")
        if self.data.startswith("builtin:"):
            from ..train.sft import _builtin_task

            _builtin_task(self.data)

    @property
    def divergence_beta(self) -> float | None:
        """β of the generalized JSD this loss uses (None: --loss sft)."""
        if self.loss == "sft":
            return None
        return FIXED_BETA.get(self.loss, self.beta if self.beta is not None else DEFAULT_BETA.get(self.loss))

    @property
    def on_policy_fraction(self) -> float:
        if self.loss != "on_policy":
            return 0.0
        return 1.0 if self.lmbda is None else self.lmbda


# ---------------------------------------------------------------------- the student
def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    return a.vocab_size == b.vocab_size and all(a.id_to_token(i) == b.id_to_token(i) for i in range(a.vocab_size))


def check_student(spec: str, tok: Tokenizer, teacher_vocab: int, seq_len: int, overrides: list[str] = ()):
    """The student's config (a preset with the --set ``overrides`` and the teacher's vocabulary)
    and its directory (None for a preset), or one line saying why this student cannot learn from
    this teacher."""
    if spec in PRESETS:
        if "vocab_size" in parse_overrides(overrides):
            raise ValueError("--set vocab_size: a preset student takes the teacher's vocabulary")
        cfg = preset_with(spec, list(overrides), vocab_size=teacher_vocab)
        path = None
    else:
        path = ckpt_flag(spec, "--student")
        cfg = ModelConfig.load(path / "config.json")
        if (path / "tokenizer.json").is_file() and not same_tokenizer(Tokenizer.load(path), tok):
            raise ValueError(f"--student {spec}: its tokenizer is not the teacher's; logits over different "
                             "vocabularies cannot be compared (start from a preset, which takes the teacher's)")
    if cfg.vocab_size < tok.vocab_size:
        raise ValueError(f"--student {spec}: vocab_size={cfg.vocab_size} is smaller than the teacher's tokenizer "
                         f"({tok.vocab_size} tokens)")
    if seq_len > cfg.max_position_embeddings:
        raise ValueError(f"--seq-len {seq_len} exceeds the student's context (max_position_embeddings="
                         f"{cfg.max_position_embeddings})")
    return cfg, path


def compared_vocab(student_vocab: int, teacher_vocab: int, tok: Tokenizer) -> int:
    """How many logits the divergence compares: all of them when the two models' vocabularies
    are the same size (as TRL requires), else the tokenizer's ids (what differs is padding rows
    no token ever uses)."""
    return student_vocab if student_vocab == teacher_vocab else tok.vocab_size


# ---------------------------------------------------------------------- losses
def token_logits(model, ids, pos, doc, keep) -> torch.Tensor:
    """Logits (N, V) at the positions `keep` marks only: one forward of the packed rows, then the
    final norm and head on the positions that carry a loss (prompt and padding skip the head)."""
    h = model.hidden_states(ids, positions=pos, mask=attention_mask(doc))[keep]
    return model.lm_head(model.norm(h))


def kd_step_loss(teacher, beta: float, temperature: float, vocab: int, balance_alpha: float = 0.0):
    """loss_fn for Trainer: mean generalized JSD_β (losses.py) between student and teacher over
    the target tokens of a packed batch; the student's cross-entropy on them is logged beside it."""

    def fn(model, batch):
        ids, tgt, pos, doc = trim(batch)
        keep = tgt != -100
        s = token_logits(model, ids, pos, doc, keep)[:, :vocab]
        with torch.no_grad():
            t = token_logits(teacher, ids, pos, doc, keep)[:, :vocab]
        loss = generalized_jsd_loss(s, t, beta=beta, temperature=temperature)
        named = {"ce": F.cross_entropy(s.float().detach(), tgt[keep]) if keep.any() else None}
        bal = balance_loss(model) if balance_alpha else None
        if bal is not None:
            named["balance_loss"] = bal
            return loss + balance_alpha * bal, {"kd_loss": loss, **named}
        return loss, named

    return fn


# ---------------------------------------------------------------------- batches
def prompts_of(batch) -> list[list[int]]:
    """The prompt of every conversation packed in a batch: its tokens up to the one that predicts
    its first target (the `<|assistant|>` that opens the answer)."""
    ids, tgt, _, doc = batch
    out = []
    for b in range(ids.shape[0]):
        for d in doc[b].unique().tolist():
            if d < 0:
                continue
            where = (doc[b] == d).nonzero().flatten()
            first = (tgt[b, where] != -100).nonzero()
            if len(first):
                out.append(ids[b, where[0]:where[0] + int(first[0]) + 1].tolist())
    return out


def sampled_batch(sampler, prompts: list[list[int]], cfg: DistillConfig, pad_id: int, seed: int):
    """The prompts completed by `sampler`'s model, packed like the traces (targets: the
    completion tokens) → (the batch's rows, completion lengths)."""
    rollouts = sampler.generate(prompts, cfg.max_new_tokens, cfg.temperature, 1.0, seed=seed)
    examples = []
    for p, r in zip(prompts, rollouts):
        ids, mask = p + r.ids, [0] * len(p) + [1] * len(r.ids)
        examples.append((ids[:cfg.seq_len], mask[:cfg.seq_len]))
    rows = pack(examples, cfg.seq_len, pad_id, cfg.pack)
    return tuple(torch.tensor([r[k] for r in rows]) for k in range(4)), [len(r.ids) for r in rollouts]


def micro_batches(batch, k: int) -> list:
    """`batch`'s rows in at most k near-equal micro-batches (a sampled batch has as many rows as
    its completions need, not necessarily a multiple of k)."""
    n = batch[0].shape[0]
    bounds = [round(i * n / min(k, n)) for i in range(min(k, n) + 1)]
    return [tuple(t[a:b] for t in batch) for a, b in zip(bounds, bounds[1:])]


class DistillStream:
    """The data position: the packed traces' order, and the draws that pick each batch's source
    (on-policy or not) and its samples' seed — saved with every checkpoint, so a resumed run
    draws what the uninterrupted one would."""

    def __init__(self, batches: PackedBatches, seed: int):
        self.batches, self.rng = batches, random.Random(seed)

    def next(self):
        return self.batches.next(), self.rng.random(), self.rng.randrange(2**31)

    def state_dict(self) -> dict:
        return {"batches": self.batches.state_dict(), "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state["batches"])
        self.rng.setstate(state["rng"])


# ---------------------------------------------------------------------- the command
def data_file(spec: str) -> str:
    """--data as load_conversations reads it: a `distill traces` directory means its traces.jsonl."""
    from .traces import TRACES

    return str(Path(spec) / TRACES) if Path(spec).is_dir() and (Path(spec) / TRACES).is_file() else spec


def distill(cfg: DistillConfig, on_step=None) -> Path:
    """Distil the teacher into a student: sequence-level, logit or on-policy KD; returns RUN/model."""
    from ..counting import count, human
    from ..model import DeepSeekV3
    from ..report import write_report
    from ..train.grpo import EngineSampler

    teacher_path = ckpt_flag(cfg.teacher, "--teacher")
    tok = Tokenizer.load(teacher_path)
    teacher_cfg = ModelConfig.load(teacher_path / "config.json")
    student_cfg, student_path = check_student(cfg.student, tok, teacher_cfg.vocab_size, cfg.seq_len, cfg.set)
    if cfg.seq_len > teacher_cfg.max_position_embeddings:
        raise ValueError(f"--seq-len {cfg.seq_len} exceeds the teacher's context (max_position_embeddings="
                         f"{teacher_cfg.max_position_embeddings} in {teacher_path / 'config.json'})")
    convs = load_conversations(data_file(cfg.data))
    rows = pack(tokenize(convs, tok, cfg.seq_len), cfg.seq_len, tok.pad_id, cfg.pack)
    cfg = steps_for_epochs(cfg, len(rows))
    rt = start_run(cfg)
    student = (DeepSeekV3(student_cfg) if student_path is None else load_pretrained(student_path)).to(rt.device)
    needs_teacher = cfg.loss != "sft" or cfg.seq_kd
    teacher = load_pretrained(teacher_path, device=rt.device).requires_grad_(False) if needs_teacher else None
    beta = cfg.divergence_beta
    if rt.is_main:
        tc, sc = count(teacher_cfg), count(student.config)
        how = ["cross-entropy on the traces" if beta is None else f"generalized JSD β={beta:g}, τ={cfg.temperature:g}",
               *([f"λ={cfg.on_policy_fraction:g} on-policy"] if cfg.loss == "on_policy" else []),
               *(["seq_kd"] if cfg.seq_kd else [])]
        print(f"distill: --loss {cfg.loss} ({', '.join(how)}); student {cfg.student}: {human(sc.total)} parameters "
              f"({sc.total / tc.total:.2f}× the teacher's {human(tc.total)}); {len(convs)} conversations → "
              f"{len(rows)} rows of {cfg.seq_len}, {cfg.max_steps} steps on {rt.device}", flush=True)
    # data parallel by one all-reduce: the KD forward (hidden_states + head on the target tokens)
    # is not the module's own forward, which DDP's reducer needs
    trainer = Trainer(cfg, student, tokenizer=tok, rt=rt, grad_sync="all_reduce")
    vocab = compared_vocab(student_cfg.vocab_size, teacher_cfg.vocab_size, tok)
    loss_fn = (sft_step_loss(cfg.balance_alpha) if beta is None
               else kd_step_loss(teacher, beta, cfg.temperature, vocab, cfg.balance_alpha))
    samplers = {}
    if cfg.on_policy_fraction:  # the engine holds the live student: update_weights() before each use
        samplers["student"] = EngineSampler(student, tok, max_num_seqs=64, max_len=cfg.seq_len)
    if cfg.seq_kd:
        samplers["teacher"] = EngineSampler(teacher, tok, max_num_seqs=64, max_len=cfg.seq_len)
    student.train()
    stream = DistillStream(PackedBatches(rows, cfg.batch_size, cfg.seed, rt.rank, rt.world_size), cfg.seed)

    def step_fn(tr: Trainer) -> dict:
        batch, draw, seed = stream.next()
        source = "student" if draw < cfg.on_policy_fraction else "teacher" if cfg.seq_kd else "data"
        lens = None
        if source == "data":
            parts = tr.split(trim(batch))  # cut first, so the core counts the tokens that are run
        else:
            batch, lens = sampled_batch(samplers[source], prompts_of(batch), cfg, tok.pad_id, seed + rt.rank)
            parts = micro_batches(batch, cfg.gradient_accumulation_steps)
        m = tr.train_step(parts, loss_fn)
        m["on_policy"] = float(source == "student")
        if lens:
            m["completions/mean_length"] = sum(lens) / len(lens)
        return m

    out = trainer.fit(stream, step_fn=step_fn, on_step=on_step)
    if rt.is_main:
        write_report(cfg.out, title=f"distill --loss {cfg.loss}: {cfg.student} from {cfg.teacher}")
        print(f"distill: saved {out}")
    return out
