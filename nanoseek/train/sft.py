"""Chat SFT: teach a base model the chat template and R1's `<think>` habit (the cold start).

`nanoseek sft --ckpt BASE --data builtin:sft-arith --out runs/x/sft`

Data: a chat jsonl (one `{"messages": [...]}` per line, assistant turns may carry
`reasoning_content`), or a built-in cold-start set made by the task generators with worked
traces: `builtin:sft-arith[?n=2000&seed=0&digits=2&ops=+&chain=2]`, `builtin:sft-countdown[?...]`.

Loss on assistant tokens only (render_chat's mask): the model should learn to *answer*, not to
predict the user's question. Several conversations are packed into each row so no compute is
spent on padding; attention is block-diagonal (a conversation never sees the one packed before
it) and positions restart at 0 for each, so a packed row trains exactly what the unpacked
conversations would. MTP is off here (its module has no per-document mask, and SFT is about
the main head's behaviour, not a denser pretraining signal).
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl

import torch
import torch.nn.functional as F

from ..checkpoint import load_pretrained, save_pretrained
from ..tokenizer import Tokenizer

BUILTIN_SETS = {"sft-arith": "arithmetic", "sft-countdown": "countdown"}


@dataclass
class SFTConfig:
    ckpt: str = field(metadata={"help": "base checkpoint directory (with tokenizer.json)"})
    data: str = field(metadata={"help": "chat jsonl with 'messages', or builtin:sft-arith / builtin:sft-countdown[?n=&seed=&KNOB=]"})
    out: str = field(metadata={"help": "run directory: model/ (HF checkpoint + tokenizer), metrics.jsonl, sft_config.json"})
    epochs: float = field(default=2.0, metadata={"help": "passes over the data (fractional ok)"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many steps (0: set by epochs)"})
    batch_size: int = field(default=8, metadata={"help": "packed rows per step"})
    seq_len: int = field(default=256, metadata={"help": "tokens per packed row"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate (cosine to 10%)"})
    warmup_steps: int = field(default=20, metadata={"help": "linear warmup steps"})
    weight_decay: float = 0.0
    pack: bool = field(default=True, metadata={"help": "pack conversations (block-diagonal attention)"})
    seed: int = 0
    device: str = field(default="auto", metadata={"help": "cpu | cuda | auto"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default; 1 on a busy machine)"})
    log_every: int = 10


# ---------------------------------------------------------------------- data
def _parse_builtin(spec: str) -> tuple[str, dict]:
    name, _, query = spec[len("builtin:"):].partition("?")
    if name not in BUILTIN_SETS:
        raise ValueError(f"data spec {spec!r}: unknown built-in SFT set; choose from "
                         f"{', '.join('builtin:' + k for k in BUILTIN_SETS)}")
    args: dict = {}
    for k, v in parse_qsl(query, strict_parsing=bool(query)):
        args[k] = int(v) if v.lstrip("-").isdigit() else v
    return name, args


def load_conversations(spec: str) -> list[list[dict]]:
    """A data spec → list of message lists. Errors name the file and line."""
    if spec.startswith("builtin:"):
        from ..tasks import cold_start_sft, get_task

        name, args = _parse_builtin(spec)
        n, seed = int(args.pop("n", 2000)), int(args.pop("seed", 0))
        task = get_task(BUILTIN_SETS[name], **args)
        return [c["messages"] for c in cold_start_sft(task, n, seed)]
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"data spec {spec!r}: no such file (expected a chat .jsonl or builtin:NAME)")
    convs = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
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


def batches(rows, batch_size: int, seed: int, device):
    """Endless shuffled epochs of collated batches."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(rows)))
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            chunk = [rows[j] for j in order[i:i + batch_size]]
            ids, tgt, pos, doc = (torch.tensor([c[k] for c in chunk], device=device) for k in range(4))
            yield ids, tgt, pos, doc


# ---------------------------------------------------------------------- training
def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_ckpt(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory holding one in `model/` (what sft/grpo write)."""
    p = Path(path)
    if (p / "config.json").is_file():
        return p
    if (p / "model" / "config.json").is_file():
        return p / "model"
    raise FileNotFoundError(f"{p}: neither a checkpoint (config.json) nor a run directory with model/config.json")


def cosine_lr(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def sft_loss(model, ids, tgt, pos, doc) -> torch.Tensor:
    """Mean cross-entropy over assistant tokens of a packed batch."""
    logits = model(ids, positions=pos, mask=block_causal_mask(doc))  # fp32 (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=-100)


def sft(cfg: SFTConfig) -> Path:
    """Supervised fine-tuning on chats (assistant tokens only, packed), saves an HF checkpoint."""
    from ..cli import save_run_config

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    ckpt = resolve_ckpt(cfg.ckpt)
    tok = Tokenizer.load(ckpt)
    model = load_pretrained(ckpt, device=device)
    convs = load_conversations(cfg.data)
    rows = pack(tokenize(convs, tok, cfg.seq_len), cfg.seq_len, tok.pad_id, cfg.pack)
    n_tok = sum(sum(t != -100 for t in r[1]) for r in rows)
    steps_per_epoch = max(1, len(rows) // cfg.batch_size)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    run = Path(cfg.out)
    save_run_config(cfg, run, "sft_config.json")
    print(f"sft: {len(convs)} conversations → {len(rows)} rows of {cfg.seq_len} "
          f"({n_tok} assistant tokens), {total} steps on {device}")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.95),
                            weight_decay=cfg.weight_decay)
    data = batches(rows, cfg.batch_size, cfg.seed, device)
    log = (run / "metrics.jsonl").open("w")
    model.train()
    t0 = time.time()
    for step in range(total):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, total, cfg.learning_rate, cfg.warmup_steps)
        ids, tgt, pos, doc = next(data)
        loss = sft_loss(model, ids, tgt, pos, doc)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        opt.step()
        if step % cfg.log_every == 0 or step == total - 1:
            rec = {"step": step, "loss": round(float(loss.detach()), 4), "grad_norm": round(gnorm, 3),
                   "lr": opt.param_groups[0]["lr"], "elapsed_s": round(time.time() - t0, 1)}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(f"sft step {step}/{total} loss {rec['loss']:.4f} ({rec['elapsed_s']}s)", flush=True)
    log.close()
    model.eval()
    out = save_pretrained(model, run / "model", extra={"tokenizer": lambda d: tok.save(d)})
    print(f"sft: saved {out}")
    return out
