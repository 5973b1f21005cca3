"""Expert pruning: drop the routed experts a calibration set uses least, and write a smaller
`deepseek_v3` checkpoint (fewer `n_routed_experts`; router rows and bias rewritten to match).

Why per layer and by routing statistics: in a fine-grained MoE each layer's experts specialise
differently, and what an expert contributes is visible only through the router. Two scores:

* `frequency`: how many calibration tokens choose expert j (its share of the top-k slots);
* `reap` (Router-weighted Expert Activation Pruning, Lasby et al. 2025): the mean, over the
  tokens routed to j, of g_j(x)·‖E_j(x)‖₂ — the gate value times the norm of the expert's
  output, i.e. how much j actually adds to the residual stream when it is chosen.

The router then picks among the experts that remain (top-k of the same affinities, renormalised
by eq. 13), so no weight is changed — only rows are removed. With expert groups (n_group > 1,
V3's node-limited routing) each group loses the same number of experts, the least useful of that
group: groups stay contiguous blocks of equal size, so the group-limited choice keeps its
meaning, and `n_routed_experts` stays divisible by `n_group`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..checkpoint import cast
from ..config import ModelConfig
from ..model import DeepSeekV3
from ..model.moe import MoE

SCORES = ("reap", "frequency")


@torch.no_grad()
def expert_scores(model: DeepSeekV3, batches: Iterable[torch.Tensor], score: str = "reap") -> dict[str, torch.Tensor]:
    """MoE module name ("layers.3.mlp", "mtp.0.block.mlp") → (n_routed_experts,) usefulness of
    each routed expert on `batches` of token ids (higher = more useful), from the model's own
    routing. The batches run with next-token targets, so the MTP modules route them too."""
    if score not in SCORES:
        raise ValueError(f"--score {score!r}: expected one of {', '.join(SCORES)}")
    moes = {name: m for name, m in model.named_modules() if isinstance(m, MoE)}
    E = model.config.n_routed_experts
    total = {name: torch.zeros(E, dtype=torch.float64) for name in moes}
    hits = {name: torch.zeros(E, dtype=torch.float64) for name in moes}

    def hook(name: str):
        def record(moe: MoE, args, _out) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])
            w, idx, _ = moe.gate(x)
            hits[name] += torch.bincount(idx.flatten(), minlength=E).double()
            if score == "reap":  # Σ over routed tokens of g_j(x)·‖E_j(x)‖₂
                for e in idx.unique().tolist():
                    tok, slot = (idx == e).nonzero(as_tuple=True)
                    one = torch.ones(len(tok), 1)  # E_j(x) alone: gate value 1, expert j only
                    out = moe.experts(x[tok], one, torch.full_like(one, e, dtype=torch.long))
                    total[name][e] += (w[tok, slot].double() * out.double().norm(dim=-1)).sum()
        return record

    handles = [moe.register_forward_hook(hook(name)) for name, moe in moes.items()]
    was_training = model.training
    model.eval()
    try:
        for ids in batches:
            model(ids[:, :-1], ids[:, 1:], mtp_weight=1.0)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if score == "frequency":
        return {name: hits[name] / hits[name].sum().clamp_min(1) for name in moes}
    return {name: total[name] / hits[name].clamp_min(1) for name in moes}  # never chosen: 0


def kept_experts(scores: torch.Tensor, n_keep: int, n_group: int) -> torch.Tensor:
    """The n_keep experts to keep (ascending ids): in each of the n_group contiguous groups, its
    n_keep / n_group best by score (ties: the lower id)."""
    E = scores.shape[0]
    per = E // n_group
    keep_per = n_keep // n_group
    kept = []
    for g in range(n_group):
        s = scores[g * per:(g + 1) * per]
        order = sorted(range(per), key=lambda j: (-float(s[j]), j))[:keep_per]
        kept += [g * per + j for j in sorted(order)]
    return torch.tensor(kept, dtype=torch.long)


def pruned_config(c: ModelConfig, sparsity: float) -> ModelConfig:
    """The config with round(sparsity · E) routed experts fewer, the count a multiple of n_group
    (each group loses the same number) — refused in one line where that leaves too few."""
    E, G = c.n_routed_experts, c.n_group
    if not E or not any(c.is_moe_layer(i) for i in range(c.num_hidden_layers)):
        raise ValueError("--method experts: this model has no routed experts to prune")
    drop = round(sparsity * E / G) * G
    keep = E - drop
    why = None
    if keep < c.num_experts_per_tok:
        why = f"fewer than num_experts_per_tok={c.num_experts_per_tok}"
    elif G > 1 and keep // G < 2:
        why = "fewer than 2 per expert group (a group is scored by its top-2 experts)"
    elif keep // G * c.topk_group < c.num_experts_per_tok:
        why = (f"fewer than num_experts_per_tok={c.num_experts_per_tok} within topk_group={c.topk_group} "
               f"of n_group={G} groups")
    if why:
        raise ValueError(f"--sparsity {sparsity}: dropping {drop} of {E} routed experts ({drop // G} per group "
                         f"of n_group={G}) leaves {keep}, {why}")
    return c.replace(n_routed_experts=keep)


@torch.no_grad()
def prune_experts(model: DeepSeekV3, batches: Iterable[torch.Tensor], sparsity: float = 0.25,
                  score: str = "reap") -> tuple[DeepSeekV3, dict]:
    """A copy of `model` with the least useful routed experts of every MoE layer removed (the
    same number per layer, as n_routed_experts is one number; the MTP modules' too), and what
    was kept and why."""
    cfg = pruned_config(model.config, sparsity)
    scores = expert_scores(model, batches, score)
    kept = {name: kept_experts(s, cfg.n_routed_experts, cfg.n_group) for name, s in scores.items()}
    pruned = keep_only(model, kept)
    report = {
        "score": score,
        "n_routed_experts": [model.config.n_routed_experts, cfg.n_routed_experts],
        "kept": {name: k.tolist() for name, k in kept.items()},
        "scores": {name: [round(float(v), 6) for v in s] for name, s in scores.items()},
    }
    return pruned, report


@torch.no_grad()
def keep_only(model: DeepSeekV3, kept: dict[str, torch.Tensor]) -> DeepSeekV3:
    """A copy of `model` whose MoE module `name` keeps only the routed experts kept[name] (the
    same number for every module): router rows, bias entries, stacked expert weights."""
    cfg = model.config.replace(n_routed_experts=len(next(iter(kept.values()))))
    pruned = DeepSeekV3(cfg)
    own = model.state_dict()
    state = {}
    for name, t in pruned.state_dict().items():
        src = own[name]
        if src.shape != t.shape:  # indexed by expert: "layers.3.mlp" + ".gate.weight", ".experts.up_proj", ...
            src = src.index_select(0, kept[name.rsplit(".", 2)[0]])
        state[name] = src
    pruned.load_state_dict(state)
    return cast(pruned, next(model.parameters()).dtype).eval()


def compress_experts(cfg) -> dict:
    """`--method experts`: drop cfg.sparsity of each layer's routed experts, least useful by --score."""
    from ..checkpoint import ckpt_flag, load_pretrained, save_pretrained
    from ..tokenizer import Tokenizer
    from .calib import calib_batches
    from .save import copy_side_files, weight_bytes

    src = ckpt_flag(cfg.ckpt)
    model = load_pretrained(src)
    pruned_config(model.config, cfg.sparsity)  # refused before calibration runs
    pruned, report = prune_experts(model, calib_batches(cfg, Tokenizer.load(src)), cfg.sparsity, cfg.score)
    save_pretrained(pruned, cfg.out, extra={"side": lambda d: copy_side_files(src, d)})
    return {**report, "bytes": weight_bytes(cfg.out), "source_bytes": weight_bytes(src)}
