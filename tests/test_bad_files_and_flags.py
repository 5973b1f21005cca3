"""Corrupt checkpoints and bad flag values: each is one line naming the file and the key or field
(or the flag and its range), for `load_model`, `nanoseek generate` and `nanoseek serve`, and the
model is never built when the config or the headers already say the load cannot work."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import nanoseek
from nanoseek import checkpoint, cli
from nanoseek.checkpoint import save_pretrained
from nanoseek.config import preset
from nanoseek.model import DeepSeekV3
from nanoseek.tokenizer import Tokenizer

WEIGHTS = "model.safetensors"
KEY = "model.layers.0.self_attn.kv_b_proj.weight"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    torch.manual_seed(0)
    tok = Tokenizer.train(["the cat sat on the mat 12+34=46"] * 20, vocab_size=300)
    model = DeepSeekV3(preset("tiny", vocab_size=tok.vocab_size))
    return save_pretrained(model, tmp_path_factory.mktemp("good") / "ckpt", extra={"tokenizer": tok.save})


def _edit_weights(d, fn):
    sd = load_file(str(d / WEIGHTS))
    fn(sd)
    save_file(sd, str(d / WEIGHTS), metadata={"format": "pt"})


def _edit_config(d, fn):
    cfg = json.loads((d / "config.json").read_text())
    cfg = fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def _truncate(d):
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(data[: len(data) // 2])


def _flip_header(d):
    data = bytearray((d / WEIGHTS).read_bytes())
    data[20:40] = b"\xff" * 20  # inside the JSON header
    (d / WEIGHTS).write_bytes(bytes(data))


def _flip_data(d):
    data = bytearray((d / WEIGHTS).read_bytes())
    data[-64:] = b"\xff" * 64  # the last tensor's last values: 0xffffffff is a NaN in fp32
    (d / WEIGHTS).write_bytes(bytes(data))


def _nan(d):
    _edit_weights(d, lambda sd: sd[KEY].view(-1).__setitem__(3, float("nan")))


def _wrong_shape(d):
    _edit_weights(d, lambda sd: sd.__setitem__(KEY, torch.zeros(3, 3)))


def _int_dtype(d):
    _edit_weights(d, lambda sd: sd.__setitem__(KEY, sd[KEY].to(torch.int32)))


def _one_layer_short(d):
    _edit_config(d, lambda c: {**c, "num_hidden_layers": c["num_hidden_layers"] - 1})


def _huge(d):
    preset("v3-671b").save(d / "config.json")


def _bad_field(d):
    _edit_config(d, lambda c: {**c, "hidden_size": 0})


def _indivisible(d):
    _edit_config(d, lambda c: {**c, "n_group": 3})


# (how to break it, what the one line says); in every case the model is never built
CASES = {
    "truncated": (_truncate, r"model\.safetensors: cannot read safetensors file"),
    "flipped header": (_flip_header, r"model\.safetensors: cannot read safetensors file"),
    "flipped data": (_flip_data, r"model\.safetensors: key 'model\.[\w.]+' holds NaN or infinite values"),
    "NaN": (_nan, rf"model\.safetensors: key '{KEY}' holds NaN or infinite values"),
    "missing config": (lambda d: (d / "config.json").unlink(), r"config\.json: no config\.json here"),
    "{} config": (lambda d: (d / "config.json").write_text("{}"),
                  r"config\.json: lacks required field\(s\) vocab_size, hidden_size"),
    "zero size": (_bad_field, r"config\.json: invalid ModelConfig: hidden_size must be a positive integer"),
    "experts not divisible by groups": (_indivisible, r"config\.json: .*n_routed_experts=8 is not divisible by "
                                                      r"n_group=3"),
    "wrong shape": (_wrong_shape, rf"model\.safetensors: key '{KEY}' has shape \(3, 3\), config\.json implies"),
    "int dtype": (_int_dtype, rf"model\.safetensors: key '{KEY}' has dtype I32"),
    "one layer short": (_one_layer_short, r"model\.safetensors: holds 3 decoder layers \(model\.layers\.0-2\) but "
                                          r".*config\.json says num_hidden_layers=2"),
    "671B config": (_huge, r"config\.json: this config describes a 6\d\d\.\d+B-parameter model, \d+\.\d GiB to build"),
    "missing weights file": (lambda d: (d / WEIGHTS).unlink(), r"no model\.safetensors or model\.safetensors\.index"),
}


@pytest.fixture
def broken(good, tmp_path, request):
    d = tmp_path / "ckpt"
    shutil.copytree(good, d)
    break_it, match = CASES[request.param]
    break_it(d)
    return d, match


def _never_built(monkeypatch):
    """The real model must not be built: only the meta-device one that sizes it."""
    real = checkpoint.DeepSeekV3

    def guarded(cfg):
        if torch.empty(0).device.type != "meta":
            raise AssertionError("the model was built before the checkpoint was validated")
        return real(cfg)

    monkeypatch.setattr(checkpoint, "DeepSeekV3", guarded)


@pytest.mark.parametrize("broken", list(CASES), indirect=True)
def test_load_model_names_file_and_key(broken, monkeypatch):
    d, match = broken
    _never_built(monkeypatch)
    with pytest.raises((ValueError, FileNotFoundError), match=match) as e:
        nanoseek.load_model(d)
    assert "\n" not in str(e.value) and str(d) in str(e.value)


@pytest.mark.parametrize("command", ["generate", "serve"])
@pytest.mark.parametrize("broken", ["truncated", "NaN", "{} config", "one layer short", "671B config",
                                    "wrong shape", "missing config"], indirect=True)
def test_generate_and_serve_print_one_line(broken, command, monkeypatch, capsys):
    d, match = broken
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: pytest.fail("served a broken checkpoint"))
    argv = [command, "--ckpt", str(d)] + (["--prompt", "hi"] if command == "generate" else [])
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"nanoseek {command}: error: "), err
    assert __import__("re").search(match, err), err


@pytest.mark.parametrize("command", ["generate", "serve", "chat"])
def test_missing_tokenizer_is_refused_before_loading(good, tmp_path, command, monkeypatch, capsys):
    d = tmp_path / "ckpt"
    shutil.copytree(good, d)
    (d / "tokenizer.json").unlink()
    assert isinstance(nanoseek.load_model(d), DeepSeekV3)  # the weights alone are fine
    _never_built(monkeypatch)
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: pytest.fail("served without a tokenizer"))
    argv = [command, "--ckpt", str(d)] + (["--prompt", "hi"] if command == "generate" else [])
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tokenizer.json" in err and str(d) in err, err


def _flags(good, tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    ck = ["--ckpt", str(good)]
    gen = ["generate", *ck, "--prompt", "hi"]
    rows = [
        (gen + ["--temperature", "nan"], "--temperature nan: must be a finite number in [0, ∞)"),
        (gen + ["--temperature", "-1"], "--temperature -1.0: must be a finite number in [0, ∞)"),
        (gen + ["--top-p", "1.5"], r"--top-p 1.5: must be a finite number in [0, 1]"),
        (gen + ["--top-k", "-2"], "--top-k -2: must be ≥ 0"),
        (gen + ["--max-tokens", "0"], "--max-tokens 0: must be ≥ 1"),
        (gen + ["--repetition-penalty", "0"], "--repetition-penalty 0.0: must be a finite number in (0, ∞)"),
        (gen + ["--frequency-penalty", "inf"], "--frequency-penalty inf: must be a finite number in [-2, 2]"),
        (gen + ["--seed", str(2**64)], "--seed 18446744073709551616: must be in [-2^63, 2^63)"),
        (gen + ["--dtype", "int8"], "--dtype 'int8': expected float32 or bfloat16"),
        (["generate", *ck, "--prompt", "caf\udce9"], "--prompt is not valid UTF-8 text"),
        (gen + ["--stop", "ok", "\udcff"], "--stop is not valid UTF-8 text"),
        (["chat", *ck, "--system", "\udcff"], "--system is not valid UTF-8 text"),
        (["generate", "--ckpt", str(f), "--prompt", "hi"], f"--ckpt {f}: is a file; expected a checkpoint directory"),
        (["chat", "--ckpt", str(f)], f"--ckpt {f}: is a file; expected a checkpoint directory"),
        (["chat", *ck, "--temperature", "nan"], "--temperature nan: must be a finite number"),
        (["serve", *ck, "--port", "99999"], "--port 99999: must be in [0, 65535]"),
        (["serve", *ck, "--port", "-1"], "--port -1: must be in [0, 65535]"),
        (["serve", *ck, "--block-size", "0"], "--block-size 0: must be ≥ 1"),
        (["serve", *ck, "--max-num-seqs", "0"], "--max-num-seqs 0: must be ≥ 1"),
        (["serve", *ck, "--max-batch-tokens", "-5"], "--max-batch-tokens -5: must be ≥ 1"),
        (["serve", *ck, "--cache-tokens", "0"], "--cache-tokens 0: must be ≥ 1"),
        (["serve", *ck, "--max-queue", "-1"], "--max-queue -1: must be ≥ 0"),
        (["serve", *ck, "--keepalive-s", "nan"], "--keepalive-s nan: must be a finite number of seconds > 0"),
        (["serve", *ck, "--price-output", "-1"], "--price-output -1.0: must be a finite price ≥ 0"),
        (["serve", *ck, "--max-body-bytes", "0"], "--max-body-bytes 0: must be ≥ 1"),
        (["serve", *ck, "--dtype", "int8"], "--dtype 'int8': expected one of float32"),
        (["serve", "--ckpt", str(f)], f"--ckpt {f}: is a file; expected a checkpoint directory"),
        (["serve", "--ckpt", str(tmp_path / "nope")], f"--ckpt {tmp_path / 'nope'}: no such checkpoint directory"),
        (["generate", "--ckpt", str(tmp_path / "nope"), "--prompt", "hi"], "no such checkpoint directory"),
        (["serve", *ck, "--log-level", "loud"], "argument --log-level: invalid choice: 'loud'"),
        (["serve", *ck, "--port", "eighty"], "argument --port: invalid int value: 'eighty'"),
        (["serve", *ck, "--device", "tpu9"], "--device 'tpu9': not a device name; expected cpu, cuda or cuda:N"),
        (["serve", *ck, "--device", "meta"], "--device meta: expected cpu, cuda or cuda:N"),
        (["generate", *ck, "--prompt", "hi", "--device", "banana"], "--device 'banana': not a device name"),
    ]
    if not torch.cuda.is_available():
        rows += [(["serve", *ck, "--device", "cuda"], "--device cuda: no CUDA device on this machine"),
                 (gen + ["--device", "cuda:1"], "--device cuda:1: no CUDA device on this machine")]
    return rows


def test_bad_flag_values_are_one_line_naming_the_flag(good, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: pytest.fail("started with a bad flag"))
    monkeypatch.delenv("NANOSEEK_API_KEYS", raising=False)
    _never_built(monkeypatch)
    for argv, message in _flags(good, tmp_path):
        try:
            rc = cli.main(argv)
        except SystemExit as e:  # argparse's own errors: usage line + one error line
            rc = e.code
        err = capsys.readouterr().err
        assert rc == 2, (argv, err)
        assert message in err and "Traceback" not in err, (argv, err)
        errors = [ln for ln in err.splitlines() if ln.startswith("nanoseek ") and ": error: " in ln]
        assert len(errors) == 1 and message in errors[0], (argv, err)  # argparse adds only its usage lines


def test_the_python_api_checks_too():
    from nanoseek.engine import SamplingParams
    from nanoseek.serve import ServeConfig

    with pytest.raises(ValueError, match="temperature=nan must be a finite number"):
        SamplingParams(temperature=float("nan"))
    with pytest.raises(ValueError, match="--port 70000"):
        ServeConfig(ckpt=".", port=70000)
