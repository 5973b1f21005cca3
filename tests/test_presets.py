"""Model sizes: the presets between `small` and `v2-lite`, and `--set FIELD=VALUE` overrides
(pretrain, distill's preset student, info), checked as every config is."""

import json

import pytest
import torch

from nanoseek.cli import main
from nanoseek.config import PRESETS, parse_overrides, preset, preset_with
from nanoseek.counting import count


@pytest.mark.parametrize("name, total, activated", [
    ("v3-15m", 14_788_992, 6_056_576), ("v3-60m", 59_747_840, 26_587_136), ("v3-250m", 237_738_240, 82_811_904)])
def test_size_presets_are_deepseek_v3_shapes(name, total, activated):
    cfg = preset(name)
    c = count(cfg)
    assert (c.total, c.activated) == (total, activated)
    small, lite = count(preset("small")).total, count(preset("v2-lite")).total
    assert small < c.total < lite
    # V3's recipe at another size: MLA with low-rank q, sigmoid routing over 8 groups (4 searched),
    # 8 experts per token, one shared expert, the first layer dense, one MTP module
    assert (cfg.model_type, cfg.scoring_func, cfg.topk_method) == ("deepseek_v3", "sigmoid", "noaux_tc")
    assert (cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok, cfg.n_shared_experts) == (8, 4, 8, 1)
    assert cfg.q_lora_rank and cfg.first_k_dense_replace == 1 and cfg.num_nextn_predict_layers == 1
    assert cfg.num_key_value_heads == cfg.num_attention_heads


def test_smallest_size_preset_builds_and_runs():
    from nanoseek.model import DeepSeekV3

    torch.manual_seed(0)
    model = DeepSeekV3(preset("v3-15m", vocab_size=512)).eval()
    x = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (1, 16, 512) and torch.isfinite(logits).all()
    main_model = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    assert main_model == count(model.config).total


def test_overrides_parse_as_json_and_validate():
    assert parse_overrides(["num_hidden_layers=8", "q_lora_rank=null", "rope_scaling={\"type\": \"yarn\", "
                            "\"factor\": 2}", "model_type=deepseek_v3", "norm_topk_prob=false"]) == {
        "num_hidden_layers": 8, "q_lora_rank": None, "rope_scaling": {"type": "yarn", "factor": 2},
        "model_type": "deepseek_v3", "norm_topk_prob": False}
    cfg = preset_with("small", ["num_hidden_layers=8", "num_attention_heads=8"])
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (8, 8, 8)
    assert cfg.hidden_size == preset("small").hidden_size  # the rest is the preset's
    # a dense preset stays dense when it gets deeper
    deep = preset_with("dense-tiny", ["num_hidden_layers=4"])
    assert deep.first_k_dense_replace == 4 and not any(deep.is_moe_layer(i) for i in range(4))
    for items, msg in [
        (["num_hiden_layers=8"], "no model config field 'num_hiden_layers' (did you mean num_hidden_layers?)"),
        (["num_hidden_layers"], "expected FIELD=VALUE"),
        (["num_hidden_layers=0"], "num_hidden_layers must be a positive integer, got 0"),
        (["hidden_size=1.5"], "hidden_size must be a positive integer, got 1.5"),
        (["n_group=3"], "n_routed_experts=8 is not divisible by n_group=3"),
        (["qk_rope_head_dim=15"], "qk_rope_head_dim must be even"),
        (["num_experts_per_tok=9"], "num_experts_per_tok exceeds the experts"),
        (["scoring_func=softmax"], "other routings are deepseek_v2"),
        (["num_key_value_heads=2"], "must equal num_attention_heads=4"),
    ]:
        with pytest.raises(ValueError) as e:
            preset_with("small", items)
        assert msg in str(e.value) and str(e.value).startswith(f"--set {items[0]}") and "\n" not in str(e.value)


def test_pretrain_builds_the_overridden_preset(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--preset", "tiny", "--set", "num_hidden_layers=2", "--set", "hidden_size=48",
                 "--data", "builtin:arith?n=200", "--out", str(out), "--max-steps", "2", "--batch-size", "2",
                 "--seq-len", "32", "--warmup-steps", "1", "--eval-steps", "0", "--save-steps", "0",
                 "--val-tokens", "64", "--arith-eval", "0", "--progress", "false"]) == 0
    saved = json.loads((out / "model" / "config.json").read_text())
    assert (saved["num_hidden_layers"], saved["hidden_size"]) == (2, 48)
    assert json.loads((out / "config.json").read_text())["set"] == ["num_hidden_layers=2", "hidden_size=48"]
    capsys.readouterr()
    for argv, msg in [
        (["--set", "layers=2"], "--set layers=2: no model config field 'layers'"),
        (["--set", "max_position_embeddings=16"], "--seq-len 256 exceeds the tiny preset's context"),
        (["--set", "kv_lora_rank=-1"], "kv_lora_rank must be a positive integer"),
    ]:
        assert main(["pretrain", "--preset", "tiny", "--out", str(tmp_path / "bad"), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
    assert not (tmp_path / "bad").exists()


def test_distill_student_and_info_take_overrides(tok, ckpt, capsys):
    from nanoseek.distill.train import DistillConfig, check_student

    cfg, path = check_student("dense-tiny", tok, 512, 64, ["num_hidden_layers=3", "intermediate_size=96"])
    assert path is None and (cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size) == (3, 96, 512)
    assert cfg.first_k_dense_replace == 3
    with pytest.raises(ValueError, match="--set vocab_size: a preset student takes the teacher's vocabulary"):
        check_student("dense-tiny", tok, 512, 64, ["vocab_size=1024"])
    common = dict(teacher=str(ckpt), data="builtin:sft-arith", out="unused")
    with pytest.raises(ValueError, match="--set num_hidden_layers=1: changes a preset student"):
        DistillConfig(student=str(ckpt), set=["num_hidden_layers=1"], **common)
    with pytest.raises(ValueError, match="no model config field 'depth'"):
        DistillConfig(student="dense-tiny", set=["depth=1"], **common)
    assert main(["info", "--preset", "small", "--set", "num_hidden_layers=8"]) == 0
    out = capsys.readouterr().out
    assert "preset small --set num_hidden_layers=8" in out
    total = count(preset_with("small", ["num_hidden_layers=8"])).total
    assert f"({total:,})" in out and total > count(preset("small")).total
    assert main(["info", "--ckpt", str(ckpt), "--set", "num_hidden_layers=8"]) == 2


def test_every_preset_is_valid():
    for name in PRESETS:
        preset(name).validate()
