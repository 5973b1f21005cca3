"""`nanoseek compress --method experts`: the experts calibration routes least to (or that add least
when routed, REAP) are dropped per layer, and what is written is a valid, smaller deepseek_v3
checkpoint — transformers runs it with the same logits as nanoseek."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import nanoseek
from nanoseek.checkpoint import save_pretrained
from nanoseek.cli import main
from nanoseek.compress.experts import expert_scores, kept_experts, pruned_config, prune_experts
from nanoseek.config import preset
from nanoseek.model import DeepSeekV3

pytestmark = pytest.mark.usefixtures("one_thread")


def randomised(vocab: int, seed: int = 0, **overrides) -> DeepSeekV3:
    """Random norms and router bias and a sharp router, so routing and parity are not trivial."""
    torch.manual_seed(seed)
    m = DeepSeekV3(preset("tiny", vocab_size=vocab, **overrides)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn(p.shape))
        for moe in m.moe_layers():
            moe.gate.e_score_correction_bias.copy_(0.05 * torch.randn(moe.gate.e_score_correction_bias.shape))
            moe.gate.weight.mul_(20)
    return m


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, tok):
    model = randomised(tok.vocab_size)
    root = tmp_path_factory.mktemp("experts")
    save_pretrained(model, root / "ckpt", extra={"tokenizer": lambda p: tok.save(p)})
    assert main(["compress", "--ckpt", str(root / "ckpt"), "--method", "experts", "--sparsity", "0.25",
                 "--score", "reap", "--calib", "builtin:arith?n=40&chat=0.5", "--calib-samples", "8", "--seq-len", "64",
                 "--out", str(root / "pruned")]) == 0
    return model, root / "pruned"


def test_pruned_checkpoint_is_a_smaller_deepseek_v3_with_the_kept_rows(pruned):
    model, out = pruned
    d = json.loads((out / "config.json").read_text())
    assert (d["model_type"], d["n_routed_experts"], d["n_group"], d["topk_group"]) == ("deepseek_v3", 6, 2, 1)
    summary = json.loads((out / "compression.json").read_text())
    assert summary["method"] == "experts" and summary["n_routed_experts"] == [8, 6]
    small = nanoseek.load_model(out)
    for name, moe in [("layers.1.mlp", model.layers[1].mlp), ("layers.2.mlp", model.layers[2].mlp),
                      ("mtp.0.block.mlp", model.mtp[0].block.mlp)]:
        kept = summary["kept"][name]
        # three of each group of four: groups stay contiguous and equal
        assert len(kept) == 6 and sum(e < 4 for e in kept) == 3, kept
        new = small.get_submodule(name)
        assert torch.equal(new.gate.weight, moe.gate.weight[kept])
        assert torch.equal(new.gate.e_score_correction_bias, moe.gate.e_score_correction_bias[kept])
        assert new.gate.e_score_correction_bias.dtype == torch.float32
        assert torch.equal(new.experts.down_proj, moe.experts.down_proj[kept])
    assert torch.equal(small.layers[0].mlp.gate_proj.weight, model.layers[0].mlp.gate_proj.weight)  # dense layer


def test_pruned_checkpoint_matches_transformers(pruned):
    transformers = pytest.importorskip("transformers")
    _, out = pruned
    ours = nanoseek.load_model(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(ids), theirs(ids).logits
    assert (a - b).abs().max().item() <= 1e-4


def test_scores_find_the_expert_that_adds_nothing_and_the_one_never_chosen(tok):
    model = randomised(tok.vocab_size, n_group=1, topk_group=1, num_nextn_predict_layers=0)
    moe = model.layers[2].mlp
    with torch.no_grad():
        moe.experts.down_proj[5].zero_()  # routed, but its output is zero: REAP scores it 0
        moe.gate.e_score_correction_bias[2] = -10.0  # never selected: frequency 0
    batches = [torch.randint(0, tok.vocab_size, (4, 33), generator=torch.Generator().manual_seed(s)) for s in (2, 3)]
    reap = expert_scores(model, batches, "reap")["layers.2.mlp"]
    freq = expert_scores(model, batches, "frequency")["layers.2.mlp"]
    assert reap[5] == 0 and freq[5] > 0
    assert freq[2] == 0 and reap[2] == 0
    assert freq.sum().item() == pytest.approx(1.0)
    assert 5 not in kept_experts(reap, 6, 1).tolist()
    small, report = prune_experts(model, batches, 0.25, "frequency")
    assert 2 not in report["kept"]["layers.2.mlp"] and small.config.n_routed_experts == 6


def test_kept_experts_keep_each_group_equal_and_in_order():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.8, 0.2, 0.7, 0.6])
    assert kept_experts(scores, 4, 2).tolist() == [1, 2, 4, 6]
    assert kept_experts(scores, 6, 1).tolist() == [1, 2, 3, 4, 6, 7]


def test_a_sparsity_that_breaks_the_routing_is_refused():
    cfg = preset("tiny")  # 8 experts in 2 groups, top-2 within 1 group
    assert pruned_config(cfg, 0.25).n_routed_experts == 6
    assert pruned_config(cfg, 0.2).n_routed_experts == 6  # rounded to whole experts per group
    with pytest.raises(ValueError, match=r"--sparsity 0.75: dropping 6 of 8 .* fewer than 2 per expert group"):
        pruned_config(cfg, 0.75)
    with pytest.raises(ValueError, match="no routed experts"):
        pruned_config(preset("tiny", first_k_dense_replace=3), 0.25)
