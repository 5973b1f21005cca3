"""`nanoseek export --format gguf`: what llama.cpp's deepseek2 reads is what nanoseek computes with —
sigmoid gating, the router bias, MLA's split kv_b, the starcoder pre-tokenizer and the tokens —
read back with the `gguf` package's own reader."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from nanoseek.checkpoint import save_pretrained
from nanoseek.cli import main
from nanoseek.config import preset
from nanoseek.export.gguf import check_representable
from nanoseek.model import DeepSeekV3

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    torch.manual_seed(0)
    # vocab_size past the tokenizer's: the GGUF pads the token list to the embedding's rows
    model = DeepSeekV3(preset("tiny", vocab_size=tok.vocab_size + 12)).eval()
    with torch.no_grad():
        for m in model.moe_layers():
            m.gate.e_score_correction_bias.copy_(0.1 * torch.randn(m.gate.e_score_correction_bias.shape))
    d = tmp_path_factory.mktemp("gguf") / "ckpt"
    save_pretrained(model, d, extra={"tokenizer": lambda p: tok.save(p)})
    return d, model


def export(d, out, *extra) -> gguf.GGUFReader:
    assert main(["export", "--ckpt", str(d), "--out", str(out), *extra]) == 0
    return gguf.GGUFReader(str(out))


def field(r: gguf.GGUFReader, key: str):
    return r.fields[key].contents()


def tensors(r: gguf.GGUFReader) -> dict[str, np.ndarray]:
    return {t.name: np.asarray(t.data) for t in r.tensors}


def test_f32_gguf_carries_the_routing_mla_split_and_vocabulary(model_dir, tok, tmp_path):
    d, model = model_dir
    c = model.config
    r = export(d, tmp_path / "m.gguf")
    assert field(r, "general.architecture") == "deepseek2"
    assert field(r, "deepseek2.expert_gating_func") == gguf.ExpertGatingFuncType.SIGMOID
    hp = {k: field(r, f"deepseek2.{k}") for k in (
        "block_count", "leading_dense_block_count", "expert_count", "expert_used_count", "expert_group_count",
        "expert_group_used_count", "expert_shared_count", "attention.q_lora_rank", "attention.kv_lora_rank",
        "attention.key_length_mla", "attention.value_length_mla", "attention.head_count_kv",
        "rope.dimension_count", "expert_weights_norm")}
    assert hp == {"block_count": 3, "leading_dense_block_count": 1, "expert_count": 8, "expert_used_count": 2,
                  "expert_group_count": 2, "expert_group_used_count": 1, "expert_shared_count": 1,
                  "attention.q_lora_rank": 32, "attention.kv_lora_rank": 32, "attention.key_length_mla": 24,
                  "attention.value_length_mla": 16, "attention.head_count_kv": 1, "rope.dimension_count": 8,
                  "expert_weights_norm": True}
    assert field(r, "deepseek2.expert_weights_scale") == pytest.approx(2.5)

    # vocabulary: the starcoder pre-type, every token by id, specials as control, padding unused
    assert field(r, "tokenizer.ggml.model") == "gpt2"
    assert field(r, "tokenizer.ggml.pre") == "starcoder"
    tokens, types = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == c.vocab_size
    assert tokens[:tok.vocab_size] == [tok.id_to_token(i) for i in range(tok.vocab_size)]
    assert tokens[tok.vocab_size] == f"[PAD{tok.vocab_size}]"
    assert types[:8] == [gguf.TokenType.CONTROL] * 8
    assert types[100] == gguf.TokenType.NORMAL and types[-1] == gguf.TokenType.UNUSED
    merges = json.loads((d / "tokenizer.json").read_text())["model"]["merges"]
    assert field(r, "tokenizer.ggml.merges") == [" ".join(m) for m in merges]
    assert (field(r, "tokenizer.ggml.bos_token_id"), field(r, "tokenizer.ggml.eos_token_id")) == (0, 1)

    t = tensors(r)
    assert not any(".nextn." in n or n.startswith("blk.3.") for n in t)  # MTP not exported
    layer = model.layers[2]
    # the router bias, bit for bit
    np.testing.assert_array_equal(t["blk.2.exp_probs_b.bias"], layer.mlp.gate.e_score_correction_bias.numpy())
    np.testing.assert_array_equal(t["blk.2.ffn_gate_inp.weight"], layer.mlp.gate.weight.detach().numpy())
    # MLA: kv_b per head = [K-nope rows; V rows]; attn_k_b is the K rows transposed, attn_v_b the V rows
    kv_b = layer.self_attn.kv_b_proj.weight.detach().numpy()
    nope, v = c.qk_nope_head_dim, c.v_head_dim
    for h in range(c.num_attention_heads):
        rows = kv_b[h * (nope + v):(h + 1) * (nope + v)]
        np.testing.assert_array_equal(t["blk.2.attn_k_b.weight"][h], rows[:nope].T)
        np.testing.assert_array_equal(t["blk.2.attn_v_b.weight"][h], rows[nope:])
    assert "blk.2.attn_kv_b.weight" not in t
    np.testing.assert_array_equal(t["blk.2.ffn_gate_exps.weight"], layer.mlp.experts.gate_proj.detach().numpy())
    np.testing.assert_array_equal(t["blk.2.ffn_down_exps.weight"][5], layer.mlp.experts.down_proj[5].detach().numpy())
    np.testing.assert_array_equal(t["token_embd.weight"], model.embed_tokens.weight.detach().numpy())
    np.testing.assert_array_equal(t["output.weight"], model.lm_head.weight.detach().numpy())


def test_q8_0_quantizes_matrices_and_keeps_router_and_norms_f32(model_dir, tmp_path):
    d, model = model_dir
    r = export(d, tmp_path / "q.gguf", "--type", "q8_0")
    by_name = {t.name: t for t in r.tensors}
    assert field(r, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    q = by_name["blk.1.attn_q_b.weight"]
    assert q.tensor_type == gguf.GGMLQuantizationType.Q8_0
    want = model.layers[1].self_attn.q_b_proj.weight.detach().numpy()
    got = gguf.quants.dequantize(np.asarray(q.data), q.tensor_type).reshape(want.shape)
    assert np.abs(got - want).max() <= np.abs(want).max() / 127  # one q8_0 step at most
    for name in ("blk.1.ffn_gate_inp.weight", "blk.1.exp_probs_b.bias", "blk.1.attn_kv_a_norm.weight"):
        assert by_name[name].tensor_type == gguf.GGMLQuantizationType.F32, name


def test_a_tokenizer_llama_cpp_would_split_differently_is_refused(model_dir, tmp_path):
    d, _ = model_dir
    other = tmp_path / "ckpt"
    other.mkdir()
    for f in d.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    tj = json.loads((other / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = tj["pre_tokenizer"]["pretokenizers"][1]  # byte-level alone: digits merge
    (other / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ValueError, match="tokenizer.json: pre-tokenizer .* `starcoder`"):
        main(["--debug", "export", "--ckpt", str(other), "--out", str(tmp_path / "x.gguf")])
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".x.gguf*"))


def test_routing_llama_cpp_cannot_express_is_refused():
    cfg = preset("tiny", model_type="deepseek_v2", scoring_func="softmax", topk_method="group_limited_greedy",
                 n_group=4, topk_group=2, num_nextn_predict_layers=0)
    with pytest.raises(ValueError, match="group_limited_greedy"):
        check_representable(cfg)
