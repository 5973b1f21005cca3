"""nanoseek compress: fp8 in DeepSeek's release layout, int8/int4 in compressed-tensors' layout (both
read back by transformers and by nanoseek), the engine's integer kernels, magnitude and Wanda
pruning, and the sweep's Pareto/budget choice."""

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

from conftest import sharp_tiny
from nanoseek.checkpoint import load_pretrained, save_pretrained, to_hf_state_dict
from nanoseek.cli import main
from nanoseek.compress import CompressConfig, compress, parse_pattern
from nanoseek.compress.fp8 import dequantize_fp8, quantize_fp8
from nanoseek.compress.kernels import PackedLinear
from nanoseek.compress.prune import input_norms, layer_matrices, prune_model, prune_scores
from nanoseek.compress.quant import dequantize, quantize
from nanoseek.compress.sweep import pareto, pick, table
from nanoseek.engine import Engine, SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory, tok):
    """A tiny checkpoint whose argmax is robust to rounding noise, with the arithmetic tokenizer."""
    m = sharp_tiny(0, vocab_size=tok.vocab_size)
    d = tmp_path_factory.mktemp("c") / "base"
    save_pretrained(m, d, extra={"tokenizer": lambda p: tok.save(p)})
    return d


def _compress(base, out, method, **kw):
    return compress(CompressConfig(ckpt=str(base), method=method, out=str(out), group_size=32,
                                   calib="builtin:arith?n=40", calib_samples=4, seq_len=64, **kw))


IDS = torch.tensor([[5, 17, 40, 9, 33, 101, 7, 64, 12, 3], [44, 2, 19, 250, 8, 61, 90, 13, 5, 77]])


# ---------------------------------------------------------------------- fp8
def test_fp8_blocks_round_trip_with_ragged_edges():
    torch.manual_seed(0)
    w = torch.randn(200, 300) * torch.logspace(-2, 1, 300)  # columns of very different size
    q, s = quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (200, 300)
    assert s.dtype == torch.float32 and s.shape == (2, 3)  # ⌈200/128⌉ × ⌈300/128⌉
    # each block's largest |w| lands on e4m3's largest value, 448
    assert torch.isclose(s[1, 2], w[128:, 256:].abs().max() / 448)
    back = dequantize_fp8(q, s)
    blockmax = torch.repeat_interleave(torch.repeat_interleave(s * 448, 128, 0), 128, 1)[:200, :300]
    assert ((back - w).abs() <= blockmax * 2**-4 + 1e-12).all()  # e4m3 keeps 3 mantissa bits


def test_fp8_export_loads_in_transformers_and_nanoseek(base, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "fp8"
    _compress(base, out, "fp8")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [128, 128]}
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.layers.1.mlp.experts.3.down_proj.weight").get_dtype() == "F8_E4M3"
        assert f.get_slice("model.layers.1.mlp.gate.weight").get_dtype() == "F32"  # router kept
        assert f.get_slice("lm_head.weight").get_dtype() == "F32"
    assert "model.layers.0.self_attn.kv_b_proj.weight_scale_inv" in keys
    assert "model.embed_tokens.weight_scale_inv" not in keys
    ours = load_pretrained(out)(IDS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(IDS).logits
    assert (theirs - ours).abs().max() < 1e-4
    ref = load_pretrained(base)(IDS)
    assert 0 < (ours - ref).abs().max() < 0.2 * ref.abs().max()  # rounded (3 mantissa bits), not broken


def test_deepseek_release_layout_loads_and_matches_the_dequantized_reference(base, tmp_path):
    """A directory written here key by key in DeepSeek's FP8 release layout (bf16 high-precision
    tensors, e4m3 matrices, a float32 scale_inv per 128×128 block, zero-padded edges) loads in
    nanoseek as the model of its dequantized weights."""
    model = load_pretrained(base)
    state = to_hf_state_dict(model)
    disk, reference = {}, {}
    for k, t in state.items():
        if t.dim() == 2 and not k.endswith(("embed_tokens.weight", "lm_head.weight", "shared_head.head.weight",
                                            "mlp.gate.weight")):
            n, m = t.shape
            pad = torch.zeros(-(-n // 128) * 128, -(-m // 128) * 128)
            pad[:n, :m] = t
            blocks = pad.view(pad.shape[0] // 128, 128, pad.shape[1] // 128, 128)
            scale = blocks.abs().amax(dim=(1, 3)) / 448
            q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn)
            disk[k] = q.view_as(pad)[:n, :m].contiguous()
            disk[k + "_scale_inv"] = scale
            reference[k] = (q.float() * scale[:, None, :, None]).view_as(pad)[:n, :m]
        else:
            disk[k] = t.to(torch.bfloat16) if not k.endswith("e_score_correction_bias") else t
            reference[k] = disk[k].float()
    d = tmp_path / "release"
    d.mkdir()
    cfg = model.config.to_hf_dict()
    cfg.update(torch_dtype="bfloat16", quantization_config={
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]})
    (d / "config.json").write_text(json.dumps(cfg))
    save_file(disk, str(d / "model.safetensors"), metadata={"format": "pt"})
    ref_dir = tmp_path / "reference"
    ref_dir.mkdir()
    (ref_dir / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "quantization_config"}))
    save_file({k: v.contiguous() for k, v in reference.items()}, str(ref_dir / "model.safetensors"))
    loaded, ref = load_pretrained(d), load_pretrained(ref_dir)
    for (name, a), b in zip(loaded.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(loaded(IDS), ref(IDS))


# ---------------------------------------------------------------------- int8 / int4
def test_int_quantize_round_trip():
    torch.manual_seed(0)
    w = torch.randn(48, 64)
    q, s = quantize(w, 8, None)
    assert s.shape == (48, 1) and q.abs().max() == 127
    assert ((dequantize(q, s) - w).abs() <= s / 2 + 1e-7).all()
    q, s = quantize(w, 4, 32)
    assert s.shape == (48, 2) and q.min() >= -7 and q.max() == 7
    assert ((dequantize(q, s) - w).abs() <= s.repeat_interleave(32, 1) / 2 + 1e-7).all()


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_int_export_is_compressed_tensors_that_transformers_loads(base, tmp_path, method):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / method
    summary = _compress(base, out, method)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    args = next(iter(qc["config_groups"].values()))["weights"]
    assert args["num_bits"] == (8 if method == "int8" else 4)
    assert args["strategy"] == ("channel" if method == "int8" else "group")
    ours_model = load_pretrained(out)
    assert ours_model.quantization == ({"bits": 8} if method == "int8" else {"bits": 4, "group_size": 32})
    # the stored integers are exactly our quantizer's
    src = load_pretrained(base)
    w = src.layers[0].self_attn.o_proj.weight
    q, s = quantize(w, 8 if method == "int8" else 4, None if method == "int8" else 32)
    assert torch.allclose(ours_model.layers[0].self_attn.o_proj.weight, dequantize(q, s), atol=1e-7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf(IDS).logits - ours_model(IDS)).abs().max() < 1e-4
    fp32 = 4 * sum(t.numel() for t in to_hf_state_dict(src).values())
    assert summary["bytes"] < fp32 * (0.5 if method == "int8" else 0.4)  # the tiny model's head stays fp32


def test_packed_kernels_match_the_dequantized_matmul():
    torch.manual_seed(0)
    w, x = torch.randn(72, 128), torch.randn(5, 128)
    p8 = PackedLinear(w, 8)
    exact8 = x @ dequantize(*quantize(w, 8, None)).t()
    assert ((p8.mm(x) - exact8).norm() / exact8.norm()) < 0.02  # activations rounded to 8 bits per call
    p4 = PackedLinear(w, 4, 32)  # 72 rows: padded to 80 for the kernel
    exact4 = x @ dequantize(*quantize(w, 4, 32)).t()
    y4 = p4.mm(x)
    assert y4.shape == (5, 72) and ((y4 - exact4).norm() / exact4.norm()) < 0.01  # bf16 activations


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_engine_runs_int_checkpoints_on_integer_kernels(base, tmp_path, method):
    out = tmp_path / method
    _compress(base, out, method)
    engine = Engine(out, device="cpu")
    assert type(engine.paged.layers[0]["w_in"]).__name__ == "PackedLinear"
    assert all(type(w).__name__ == "PackedLinear" for w in engine.paged.layers[1]["moe"]["down"])
    prompts = [IDS[0].tolist(), IDS[1, :6].tolist()]
    got = [o.token_ids for o in engine.generate(prompts, SamplingParams(temperature=0, max_tokens=6))]
    model = load_pretrained(out)  # the same stored weights, dequantized, through the plain forward
    want = [model.generate(torch.tensor([p]), 6)[0, len(p):].tolist() for p in prompts]
    assert got == want


# ---------------------------------------------------------------------- pruning
def test_prune_scores_patterns():
    torch.manual_seed(0)
    s = torch.rand(3, 16, 32)
    keep = prune_scores(s, 0.5, parse_pattern("2:4"), per_row=True)
    assert (keep.view(3, 16, 8, 4).sum(-1) == 2).all()
    kept_min = s.view(3, 16, 8, 4).masked_fill(~keep.view(3, 16, 8, 4), float("inf")).amin(-1)
    drop_max = s.view(3, 16, 8, 4).masked_fill(keep.view(3, 16, 8, 4), -1).amax(-1)
    assert (drop_max <= kept_min).all()  # the two lowest of each four went
    row = prune_scores(s[0], 0.25, None, per_row=True)
    assert (row.sum(-1) == 24).all()  # 8 of each row's 32
    whole = prune_scores(s[0], 0.25, None, per_row=False)
    assert whole.sum() == 384 and s[0][~whole].max() <= s[0][whole].min()


def test_wanda_keeps_a_small_weight_on_a_large_input():
    """|W|·‖X‖ against |W|: the weight on the input that is 100× larger survives under Wanda."""
    w = torch.tensor([[1.0, 0.1, 0.5, 0.4]])
    norms = torch.tensor([1.0, 100.0, 1.0, 1.0])
    keep_mag = prune_scores(w.abs(), 0.5, None, per_row=True)
    keep_wanda = prune_scores(w.abs() * norms, 0.5, None, per_row=True)
    assert keep_mag.tolist() == [[True, False, True, False]]
    assert keep_wanda.tolist() == [[True, True, False, False]]


def test_input_norms_reach_every_prunable_matrix(base, tok):
    from nanoseek.compress.calib import calib_batches

    model = load_pretrained(base)
    cfg = CompressConfig(ckpt=str(base), method="wanda", out="x", calib="builtin:arith?n=40", calib_samples=4, seq_len=64)
    batches = calib_batches(cfg, tok)
    for i, layer in enumerate(model.layers):
        norms = input_norms(model, i, batches)
        for name, w in layer_matrices(layer).items():
            assert norms[name].shape[-1] == w.shape[-1], name
    # a dense projection's norms are exactly Σ x² of its input over the calibration tokens
    seen = []
    h = model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for x in batches:
            model(x)
    h.remove()
    x = torch.cat(seen)
    assert torch.allclose(input_norms(model, 0, batches)["self_attn.o_proj.weight"], (x * x).sum(0), rtol=1e-5)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_prune_checkpoint(base, tmp_path, pattern):
    out = tmp_path / pattern.replace(":", "-")
    summary = _compress(base, out, "wanda", sparsity=0.5, pattern=pattern)
    assert abs(summary["sparsity"] - 0.5) < 0.01
    assert summary["val_loss"] != summary["val_loss_before"] and summary["val_bpb"] > 0
    model = load_pretrained(out)
    w = model.layers[1].mlp.experts.gate_proj
    assert abs((w == 0).float().mean().item() - 0.5) < 0.01
    if pattern == "2:4":
        assert ((w.view(*w.shape[:-1], -1, 4) == 0).sum(-1) == 2).all()
    assert (model.layers[1].mlp.gate.weight != 0).all()  # the router is never pruned
    assert (model.mtp[0].eh_proj.weight != 0).all()


def test_prune_model_magnitude_is_per_matrix():
    m = sharp_tiny(1)
    info = prune_model(m, "magnitude", 0.3, "unstructured")
    w = m.layers[0].self_attn.o_proj.weight
    assert abs((w == 0).float().mean().item() - 0.3) < 0.01 and abs(info["sparsity"] - 0.3) < 0.01


# ---------------------------------------------------------------------- the sweep's choice, the CLI
def test_pareto_and_budget():
    rows = [dict(variant="original", mib=4, peak_mib=300, tok_s_b1=100, tok_s_b32=900, accuracy=98.0, val_loss=0.2, val_bpb=0.3),
            dict(variant="int8", mib=1, peak_mib=290, tok_s_b1=180, tok_s_b32=1500, accuracy=97.5, val_loss=0.21, val_bpb=0.31),
            dict(variant="int4", mib=0.6, peak_mib=280, tok_s_b1=220, tok_s_b32=1400, accuracy=90.0, val_loss=0.3, val_bpb=0.4),
            dict(variant="wanda", mib=4, peak_mib=300, tok_s_b1=95, tok_s_b32=880, accuracy=96.0, val_loss=0.22, val_bpb=0.33)]
    assert [r["variant"] for r in pareto(rows)] == ["original", "int8", "int4"]
    assert pick(rows, 1.0)["variant"] == "int8"
    assert pick(rows, 0.0)["variant"] == "original"
    assert pick(rows, 10.0)["variant"] == "int4"
    assert table(rows).splitlines()[2].startswith("| original | 4.00 | 300 | 100.0 |")


@pytest.mark.parametrize("args,msg", [
    (["--method", "zip", "--out", "o"], "--method 'zip': expected one of fp8, int8"),
    (["--out", "o"], "--method: required"),
    (["--sweep", "--method", "int8"], "--method: not with --sweep"),
    (["--method", "wanda", "--out", "o", "--pattern", "4:2"], "--pattern '4:2'"),
    (["--method", "int4", "--out", "o", "--group-size", "48"], "--group-size 48"),
    (["--method", "int8", "--out", "o", "--budget", "1"], "--budget: only with --sweep"),
])
def test_bad_flags_are_one_line(base, capsys, args, msg):
    assert main(["compress", "--ckpt", str(base), *args]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]  # (an import elsewhere may warn first)
    assert line.startswith("nanoseek compress: error: ") and msg in line


def test_sweep_writes_table_plot_and_budget_pick(base, tmp_path, monkeypatch, capsys):
    from nanoseek.compress import sweep as sweep_mod

    monkeypatch.setattr(sweep_mod, "SWEEP", [("int8", "int8", {})])
    monkeypatch.setattr(sweep_mod, "DECODE_TOKENS", 4)
    monkeypatch.setattr(sweep_mod, "BATCHES", (1, 4))
    out = tmp_path / "sweep"
    res = compress(CompressConfig(ckpt=str(base), sweep=True, out=str(out), budget=100.0, n=2,
                                  calib="builtin:arith?n=40", calib_samples=4, seq_len=64, val_tokens=512))
    assert [r["variant"] for r in res["rows"]] == ["original", "int8"]
    for r in res["rows"]:
        assert r["tok_s_b1"] > 0 and r["tok_s_b4"] > 0 and r["peak_mib"] > 100 and 0 <= r["accuracy"] <= 100
    assert res["rows"][1]["mib"] < res["rows"][0]["mib"] / 2
    assert res["budget"]["pick"] == max(res["rows"], key=lambda r: r["tok_s_b1"])["variant"]  # 100 points: any
    assert json.loads((out / "sweep.json").read_text())["rows"] == res["rows"]
    assert len((out / "sweep.md").read_text().splitlines()) == 4
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "variants" / "int8" / "config.json").is_file()


def test_unreadable_quantized_directories_are_one_line(base, tmp_path):
    import shutil

    from safetensors import safe_open

    d = tmp_path / "gptq"
    shutil.copytree(base, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(ValueError, match=r"config.json: quantization_config.quant_method 'gptq'"):
        load_pretrained(d)
    out = tmp_path / "fp8"
    _compress(base, out, "fp8")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys() if k != "model.layers.0.self_attn.o_proj.weight_scale_inv"}
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.o_proj.weight' is quantized but no weight "
                                         r"file holds its 'model.layers.0.self_attn.o_proj.weight_scale_inv'"):
        load_pretrained(out)
