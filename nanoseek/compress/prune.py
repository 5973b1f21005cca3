"""Pruning: magnitude, and Wanda (Sun et al., 2023: "A Simple and Effective Pruning Approach for LLMs").

Both set a fraction of each matrix's weights to zero without retraining, and differ only in the
score that decides which go:

* magnitude: S_ij = |W_ij|, compared across the whole matrix;
* Wanda: S_ij = |W_ij| · ‖X_j‖₂, where ‖X_j‖₂ is the norm of input feature j over the calibration
  tokens, compared within each output row (the paper's eq. 1 and its per-output comparison
  group). A small weight on an input that is always large matters more than a large weight on
  an input that is nearly always zero.

`--pattern N:M` zeroes the N lowest-scoring weights of every M consecutive inputs of a row
(2:4 is what sparse tensor cores run), instead of an unstructured fraction.

What is pruned: every matrix of the main decoder layers (attention projections, dense FFNs,
shared and routed experts). The router, the embeddings, the output head and the MTP module stay
dense. A routed expert's input norms are taken over the tokens routed to it (the down
projection's input includes the gate value, as the MoE computes it); an expert no calibration
token reached falls back to the magnitude score. Wanda calibrates layer by layer, each layer's
inputs coming from the layers before it already pruned, as the paper does.

The result is a plain `deepseek_v3` checkpoint whose zeros are stored as zeros: no smaller on
disk and, on CPU, no faster — the sweep measures exactly that. The summary gives the validation
loss on `--calib`'s held-out stream before and after.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import parse_pattern


def prune_scores(score: torch.Tensor, sparsity: float, pattern: tuple[int, int] | None, per_row: bool) -> torch.Tensor:
    """score (…, out, in) → a bool mask of the weights to keep."""
    *lead, n, k = score.shape
    if pattern is not None:
        drop_n, m = pattern
        if k % m:
            raise ValueError(f"--pattern {drop_n}:{m}: a matrix has {k} inputs, not a multiple of {m}")
        g = score.reshape(*lead, n, k // m, m)
        drop = g.topk(drop_n, dim=-1, largest=False).indices
        return torch.ones_like(g, dtype=torch.bool).scatter_(-1, drop, False).reshape(score.shape)
    flat = score.reshape(*lead, n, k) if per_row else score.reshape(*lead, 1, n * k)
    n_drop = int(flat.shape[-1] * sparsity)
    keep = torch.ones_like(flat, dtype=torch.bool)
    if n_drop:
        keep.scatter_(-1, flat.topk(n_drop, dim=-1, largest=False).indices, False)
    return keep.reshape(score.shape)


def layer_matrices(layer) -> dict[str, torch.Tensor]:
    """A DecoderLayer's prunable weights, by their name inside the layer."""
    return {name: p for name, p in layer.named_parameters()
            if p.dim() >= 2 and not name.endswith("mlp.gate.weight")}


class _Stop(Exception):
    pass


@torch.no_grad()
def input_norms(model, i: int, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Σ over calibration tokens of x_j² for the input of every prunable matrix of layer i:
    (in,) for a matrix, (E, in) for stacked routed experts."""
    layer = model.layers[i]
    sq: dict[str, torch.Tensor] = {}

    def add(name, x, row=None):
        x = x.detach().float().reshape(-1, x.shape[-1])
        s = (x * x).sum(0)
        if row is None:
            sq[name] = sq.get(name, 0) + s
        else:
            if name not in sq:
                sq[name] = torch.zeros(row[1], x.shape[-1])
            sq[name][row[0]] += s

    hooks = []
    attn, mlp = layer.self_attn, layer.mlp
    first = "q_a_proj" if hasattr(attn, "q_a_proj") else "q_proj"

    def after_norm(_m, _inp, out):  # q's first projection and [W_DKV; W_KR] read the normed x
        add(f"self_attn.{first}.weight", out)
        add("self_attn.kv_a_proj_with_mqa.weight", out)

    hooks.append(layer.input_layernorm.register_forward_hook(after_norm))
    linears = {f"self_attn.{n}": getattr(attn, n) for n in ("q_b_proj", "kv_b_proj", "o_proj") if hasattr(attn, n)}
    ffn = getattr(mlp, "shared_experts", None) if hasattr(mlp, "experts") else mlp
    prefix = "mlp.shared_experts" if hasattr(mlp, "experts") else "mlp"
    if ffn is not None:
        linears[f"{prefix}.down_proj"] = ffn.down_proj

        def gate_up(_m, a):  # gate and up read the same x
            add(f"{prefix}.gate_proj.weight", a[0])
            add(f"{prefix}.up_proj.weight", a[0])

        hooks.append(ffn.gate_proj.register_forward_pre_hook(gate_up))
    def before(name):  # a pre-hook that returns None leaves the module's input as it is
        def hook(_m, a):
            add(name + ".weight", a[0])
        return hook

    for name, mod in linears.items():
        hooks.append(mod.register_forward_pre_hook(before(name)))
    if hasattr(mlp, "experts"):
        ex = mlp.experts
        E = ex.gate_proj.shape[0]

        def experts(_m, a):  # the routed experts' inputs, token by token as Experts.forward has them
            flat = a[0].reshape(-1, a[0].shape[-1])
            w, idx, _ = mlp.gate(flat)
            for e in range(E):
                tok, slot = (idx == e).nonzero(as_tuple=True)
                if not len(tok):
                    continue
                xe = flat[tok]
                add("mlp.experts.gate_proj", xe, (e, E))
                add("mlp.experts.up_proj", xe, (e, E))
                h = F.silu(xe @ ex.gate_proj[e].t()) * (xe @ ex.up_proj[e].t()) * w[tok, slot, None].to(xe.dtype)
                add("mlp.experts.down_proj", h, (e, E))

        hooks.append(mlp.register_forward_pre_hook(experts))

    def stop(*_):
        raise _Stop

    hooks.append(layer.register_forward_hook(stop))
    try:
        for x in batches:
            try:
                model(x)
            except _Stop:
                pass
    finally:
        for h in hooks:
            h.remove()
    return sq


@torch.no_grad()
def prune_model(model, method: str, sparsity: float, pattern: str, batches: list[torch.Tensor] | None = None) -> dict:
    """Prune `model` in place (magnitude or wanda); returns the fraction of prunable weights now zero."""
    nm = parse_pattern(pattern)
    model.eval()
    zeros = total = 0
    for i, layer in enumerate(model.layers):
        norms = input_norms(model, i, batches) if method == "wanda" else {}
        for name, w in layer_matrices(layer).items():
            score = w.abs().float()
            if method == "wanda":
                if name not in norms:
                    raise RuntimeError(f"wanda: no calibration inputs reached layers.{i}.{name}")
                n = norms[name].sqrt()
                if n.dim() == 2:  # stacked experts: (E, in); an expert no token reached: magnitude
                    n = torch.where(n.sum(-1, keepdim=True) > 0, n, torch.ones_like(n))[:, None, :]
                score = score * n
            keep = prune_scores(score, sparsity, nm, per_row=method == "wanda")
            w.mul_(keep.to(w.dtype))
            zeros += int((~keep).sum())
            total += keep.numel()
    return {"sparsity": zeros / max(total, 1), "pattern": pattern, "weights_pruned": zeros}


def _compress(cfg, method: str) -> dict:
    from ..checkpoint import ckpt_flag, load_pretrained, save_pretrained
    from ..tokenizer import Tokenizer
    from .calib import calib_batches, validation
    from .save import copy_side_files, weight_bytes

    src = ckpt_flag(cfg.ckpt)
    model = load_pretrained(src)
    tok = Tokenizer.load(src)
    before = validation(model, tok, cfg)["val_loss"]
    batches = calib_batches(cfg, tok) if method == "wanda" else None
    info = prune_model(model, method, cfg.sparsity, cfg.pattern, batches)
    after = validation(model, tok, cfg)
    save_pretrained(model, cfg.out, extra={"side": lambda d: copy_side_files(src, d)})
    return {**info, "val_loss_before": before, "val_loss": after["val_loss"], "val_bpb": after["val_bpb"],
            "bytes": weight_bytes(cfg.out), "source_bytes": weight_bytes(src)}


def compress_magnitude(cfg) -> dict:
    """`--method magnitude`: the smallest |W| of each matrix set to zero."""
    return _compress(cfg, "magnitude")


def compress_wanda(cfg) -> dict:
    """`--method wanda`: the smallest |W|·‖X‖ of each output row set to zero (calibrated on --calib)."""
    return _compress(cfg, "wanda")
