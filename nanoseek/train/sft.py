"""Chat SFT: teach a base model the chat template and R1's `<think>` habit (the cold start).

`nanoseek sft --ckpt BASE --data builtin:sft-arith --out runs/x/sft`

Data: a chat jsonl (one `{"messages": [...]}` per line, assistant turns may carry
`reasoning_content`), or a built-in cold-start set made by the task generators with worked
traces: `builtin:sft-arith[?n=2000&seed=0&digits=2&ops=+&chain=2]`, `builtin:sft-countdown[?...]`.

Loss on assistant tokens only (render_chat's mask): the model should learn to *answer*, not to
predict the user's question. Several conversations are packed into each row so no compute is
spent on padding; attention is block-diagonal (a conversation never sees the one packed before
it) and positions restart at 0 for each, so a packed row trains exactly what the unpacked
conversations would. `--mtp-weight λ` adds V3's MTP loss on the same packed rows (per-conversation
positions and mask; a pair that spans two conversations predicts nothing), as pretraining does:
without it the MTP module never sees the chat template, and as a speculative-decoding draft it
falls behind the model it drafts for.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar
from urllib.parse import parse_qsl

import torch
import torch.nn.functional as F

from ..checkpoint import ckpt_flag, load_pretrained, resolve_ckpt
from ..tokenizer import Tokenizer
from .loop import Trainer, TrainConfig, balance_loss, start_run

BUILTIN_SETS = {"sft-arith": "arithmetic", "sft-countdown": "countdown"}


@dataclass(kw_only=True)
class SFTConfig(TrainConfig):
    """`nanoseek sft`: the shared training knobs, with SFT's defaults, and the chat data."""

    SCHEDULE_FIELDS: ClassVar[tuple[str, ...]] = (*TrainConfig.SCHEDULE_FIELDS, "batch_size", "seq_len", "epochs")
    MIN_STEPS: ClassVar[int] = 0

    ckpt: str = field(metadata={"help": "base checkpoint directory (with tokenizer.json), or any stage's run directory"})
    data: str = field(metadata={"help": "chat jsonl with 'messages', or builtin:sft-arith / builtin:sft-countdown[?n=&seed=&KNOB=]"})
    out: str = field(metadata={"help": "run directory: model/ (HF checkpoint + tokenizer), config.json, metrics.jsonl, report.md"})
    epochs: float = field(default=2.0, metadata={"help": "passes over the data (fractional ok); sets the steps when --max-steps is 0"})
    max_steps: int = field(default=0, metadata={"help": "optimizer steps; 0 = as many as --epochs take"})
    batch_size: int = field(default=8, metadata={"help": "packed rows per optimizer step (all ranks)"})
    seq_len: int = field(default=256, metadata={"help": "tokens per packed row"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate (cosine to --min-lr-ratio of it)"})
    warmup_steps: int = field(default=20, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decay on matrices (not norms/embeddings/biases)"})
    router_gamma: float = field(default=0.0, metadata={"help": "γ of the aux-loss-free router-bias update after each step; "
                                                       "0 = off (DeepSeek ends pretraining with γ = 0)"})
    balance_alpha: float = field(default=0.0, metadata={"help": "α of the sequence-wise balance loss; 0 = off"})
    mtp_weight: float = field(default=0.0, metadata={"help": "λ of the MTP loss on the same rows, as in pretraining "
                                                     "(keeps the MTP module a good draft for --speculative-tokens); 0 = off"})
    pack: bool = field(default=True, metadata={"help": "pack conversations (block-diagonal attention)"})

    def __post_init__(self) -> None:
        """The shared checks, then SFT's: the epochs, the checkpoint (a run directory is fine), a
        seq-len the checkpoint's context holds, and a built-in data spec's knobs, all before
        anything is read beyond config.json or written."""
        super().__post_init__()
        if not 0 <= self.mtp_weight < math.inf:
            raise ValueError(f"--mtp-weight {self.mtp_weight}: must be a finite number ≥ 0")
        if not (0 < self.epochs < math.inf) and not self.max_steps:
            raise ValueError(f"--epochs {self.epochs}: must be a finite number > 0 (or give --max-steps)")
        ckpt = ckpt_flag(self.ckpt)
        if (ckpt / "config.json").is_file():  # a missing or broken one is the loader's one line
            try:
                ctx = json.loads((ckpt / "config.json").read_text()).get("max_position_embeddings")
            except (ValueError, OSError, AttributeError):
                ctx = None
            if isinstance(ctx, int) and self.seq_len > ctx:
                raise ValueError(f"--seq-len {self.seq_len} exceeds the checkpoint's context "
                                 f"(max_position_embeddings={ctx} in {ckpt / 'config.json'})")
        if self.data.startswith("builtin:"):
            _builtin_task(self.data)


# ---------------------------------------------------------------------- data
def _parse_builtin(spec: str) -> tuple[str, dict]:
    name, _, query = spec[len("builtin:"):].partition("?")
    if name not in BUILTIN_SETS:
        raise ValueError(f"--data {spec!r}: unknown built-in SFT set; choose from "
                         f"{', '.join('builtin:' + k for k in BUILTIN_SETS)}")
    args: dict = {}
    try:
        pairs = parse_qsl(query, strict_parsing=bool(query))
    except ValueError:
        raise ValueError(f"--data {spec!r}: cannot read the parameters after '?' (expected k=v&k=v)") from None
    for k, v in pairs:
        args[k] = int(v) if v.lstrip("-").isdigit() else v
    return name, args


def _builtin_task(spec: str):
    """builtin:sft-NAME?n=&seed=&KNOB= → (task, n, seed); every bad value names the spec."""
    from ..tasks import get_task

    name, args = _parse_builtin(spec)
    n, seed = args.pop("n", 2000), args.pop("seed", 0)
    for key, v, lo in (("n", n, 1), ("seed", seed, None)):
        if not isinstance(v, int) or (lo is not None and v < lo):
            raise ValueError(f"--data {spec!r}: {key}={v} must be an integer{f' ≥ {lo}' if lo else ''}")
    try:
        return get_task(BUILTIN_SETS[name], **args), n, seed
    except (ValueError, TypeError) as e:
        raise ValueError(f"--data {spec!r}: {e}") from None


def load_conversations(spec: str) -> list[list[dict]]:
    """A data spec → list of message lists. Errors name the file and line."""
    if spec.startswith("builtin:"):
        from ..tasks import cold_start_sft

        task, n, seed = _builtin_task(spec)
        return [c["messages"] for c in cold_start_sft(task, n, seed)]
    path = Path(spec)
    if path.is_dir():
        raise ValueError(f"--data {spec!r}: is a directory; expected a chat .jsonl file or builtin:NAME")
    if not path.is_file():
        raise FileNotFoundError(f"--data {spec!r}: no such file (expected a chat .jsonl or builtin:NAME)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not valid UTF-8 (byte {e.start}); expected a chat .jsonl text file") from None
    convs = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid JSON ({e})") from None
        msgs = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f"{path}:{i}: expected an object with a non-empty 'messages' list")
        if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in msgs):
            raise ValueError(f"{path}:{i}: no assistant message, nothing to train on")
        convs.append(msgs)
    if not convs:
        raise ValueError(f"{path}: no conversations")
    return convs


def tokenize(convs: list[list[dict]], tok: Tokenizer, seq_len: int) -> list[tuple[list[int], list[int]]]:
    """(ids, loss_mask) per conversation; ones longer than a row are cut (and counted)."""
    out, cut = [], 0
    for msgs in convs:
        ids, mask = tok.render_chat(msgs)
        if len(ids) > seq_len:
            ids, mask, cut = ids[:seq_len], mask[:seq_len], cut + 1
        out.append((ids, mask))
    if cut:
        print(f"sft: {cut} of {len(convs)} conversations were longer than seq_len={seq_len} and cut")
    return out


def pack(examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int, packed: bool = True):
    """Greedy first-fit packing → rows of (input_ids, targets, positions, doc_ids), all (T,).

    targets[i] = ids[i+1] where that next token is an assistant token of the same conversation,
    else -100. doc_ids mark which conversation a slot belongs to (-1: padding), for the mask.
    """
    rows: list[list[tuple[list[int], list[int]]]] = []
    space: list[int] = []
    for ex in examples:
        n = len(ex[0])
        for r, left in enumerate(space):
            if packed and n <= left:
                rows[r].append(ex)
                space[r] -= n
                break
        else:
            rows.append([ex])
            space.append(seq_len - n)
    out = []
    for row in rows:
        ids, tgt, pos, doc = [], [], [], []
        for d, (x, m) in enumerate(row):
            ids += x
            tgt += [x[i + 1] if m[i + 1] else -100 for i in range(len(x) - 1)] + [-100]
            pos += list(range(len(x)))
            doc += [d] * len(x)
        pad = seq_len - len(ids)
        out.append((ids + [pad_id] * pad, tgt + [-100] * pad, pos + [0] * pad, doc + [-1] * pad))
    return out


def block_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) conversation ids → bool (B, 1, T, T): attend to earlier tokens of the same
    conversation only (padding attends to itself, so no row is all-masked)."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (causal & same)[:, None]


def attention_mask(doc_ids: torch.Tensor) -> torch.Tensor | None:
    """The mask a batch of `pack`'s rows needs: block_causal_mask, or None — plain causal
    attention, the model's faster path that skips the masked half — when every row holds a
    single conversation (from column 0, padding after it: its tokens then see exactly what the
    block mask would let them see, and padding is never a target)."""
    return None if bool((doc_ids <= 0).all()) else block_causal_mask(doc_ids)


def trim(batch):
    """A batch of `pack`'s rows without the columns that are padding in every row."""
    n = max(1, int((batch[3] >= 0).sum(1).max()))
    return tuple(t[:, :n] for t in batch)


class PackedBatches:
    """Endless shuffled epochs of packed rows, collated; this rank's slice of each global batch.

    The position is the shuffler's state at the start of the epoch and the index into it, so a
    resume re-draws the same order and continues at the next batch."""

    def __init__(self, rows, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"--batch-size {batch_size} is not divisible by the {world_size} processes")
        self.rows, self.batch_size, self.rank, self.world_size = rows, batch_size, rank, world_size
        self.rng = random.Random(seed)
        self._new_epoch()

    def _new_epoch(self) -> None:
        self._epoch_rng = self.rng.getstate()
        self.order = list(range(len(self.rows)))
        self.rng.shuffle(self.order)
        self.index = 0

    def next(self):
        B = self.batch_size
        if self.index >= (len(self.order) - B + 1 if len(self.order) >= B else 1):  # full batches only
            self._new_epoch()
        chunk = self.order[self.index:self.index + B]
        self.index += B
        per = len(chunk) // self.world_size or len(chunk)
        chunk = chunk[self.rank * per:(self.rank + 1) * per] or chunk
        return tuple(torch.tensor([self.rows[j][k] for j in chunk]) for k in range(4))

    def state_dict(self) -> dict:
        return {"rng": self._epoch_rng, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
        self._new_epoch()
        self.index = int(state["index"])


def steps_for_epochs(cfg, n_rows: int):
    """With --max-steps 0, the config with the steps --epochs take over `n_rows` packed rows
    (the resolved config is what RUN/config.json records); otherwise `cfg` as it is."""
    if cfg.max_steps:
        return cfg
    steps = max(1, math.ceil(cfg.epochs * max(1, n_rows // cfg.batch_size)))
    if cfg.warmup_steps > steps:
        raise ValueError(f"--warmup-steps {cfg.warmup_steps}: more than the {steps} steps --epochs {cfg.epochs} "
                         f"gives ({n_rows} rows, --batch-size {cfg.batch_size}); lower it or give --max-steps")
    return dataclasses.replace(cfg, max_steps=steps)


# ---------------------------------------------------------------------- training
def sft_loss(model, ids, tgt, pos, doc) -> torch.Tensor:
    """Mean cross-entropy over assistant tokens of a packed batch."""
    ids, tgt, pos, doc = trim((ids, tgt, pos, doc))
    logits = model(ids, positions=pos, mask=attention_mask(doc))  # fp32 (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=-100)


def sft_step_loss(balance_alpha: float, mtp_weight: float = 0.0):
    """loss_fn for Trainer: the assistant-token loss of a packed batch (+ α·L_Bal when α > 0,
    + λ·L_MTP when λ > 0: the model's own V3 loss, eqs. 20 and 25, on the packed rows)."""

    def fn(model, batch):
        if mtp_weight:
            ids, tgt, pos, doc = trim(batch)
            out = model(ids, tgt, positions=pos, mask=attention_mask(doc), mtp_weight=mtp_weight,
                        balance_alpha=balance_alpha)
            return out.loss, {"sft_loss": out.lm_loss, "mtp_loss": out.mtp_loss, "balance_loss": out.balance_loss}
        loss = sft_loss(model, *batch)
        bal = balance_loss(model)
        if balance_alpha and bal is not None:
            return loss + balance_alpha * bal, {"sft_loss": loss, "balance_loss": bal}
        return loss, {"balance_loss": bal}

    return fn


def sft(cfg: SFTConfig, on_step=None) -> Path:
    """Supervised fine-tuning on chats (assistant tokens only, packed); returns RUN/model."""
    from ..report import write_report

    ckpt = resolve_ckpt(cfg.ckpt)
    tok = Tokenizer.load(ckpt)
    convs = load_conversations(cfg.data)
    rows = pack(tokenize(convs, tok, cfg.seq_len), cfg.seq_len, tok.pad_id, cfg.pack)
    n_tok = sum(sum(t != -100 for t in r[1]) for r in rows)
    cfg = steps_for_epochs(cfg, len(rows))
    rt = start_run(cfg)
    model = load_pretrained(ckpt, device=rt.device)
    if rt.is_main:
        print(f"sft: {len(convs)} conversations → {len(rows)} rows of {cfg.seq_len} "
              f"({n_tok} assistant tokens), {cfg.max_steps} steps on {rt.device}")
    # without --mtp-weight the MTP module gets no gradient: DDP must not wait for it
    trainer = Trainer(cfg, model, tokenizer=tok, rt=rt,
                      find_unused_parameters=model.config.num_nextn_predict_layers > 0 and not cfg.mtp_weight)
    data = PackedBatches(rows, cfg.batch_size, cfg.seed, rt.rank, rt.world_size)
    out = trainer.fit(data, sft_step_loss(cfg.balance_alpha, cfg.mtp_weight), on_step=on_step)
    if rt.is_main:
        write_report(cfg.out, title=f"sft: {cfg.data} from {cfg.ckpt}")
        print(f"sft: saved {out}")
    return out
