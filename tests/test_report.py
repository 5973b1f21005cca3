"""The report cards: a tiny pipeline (tokenizer → pretrain → SFT → GRPO, a few steps each) gets a
card with every stage's real figures, rebuilt by `nanoseek report` from the runs' own files."""

from __future__ import annotations

import json
import re
import warnings

import pytest

from nanoseek import cli
from nanoseek.config import ModelConfig
from nanoseek.counting import count, human
from nanoseek.report import read_stage
from nanoseek.tokenizer import Tokenizer, TokenizerTrainConfig, train_tokenizer
from nanoseek.train.grpo import GRPOConfig, grpo
from nanoseek.train.pretrain import PretrainConfig, pretrain
from nanoseek.train.sft import SFTConfig, sft


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs") / "demo"
    tok = root / "tokenizer"
    train_tokenizer(TokenizerTrainConfig(data="builtin:arith?n=200", out=str(tok), vocab_size=300))
    pretrain(PretrainConfig(preset="tiny", data="builtin:arith?n=150", tokenizer=str(tok), out=str(root / "pretrain"),
                            max_steps=4, batch_size=4, seq_len=32, warmup_steps=1, logging_steps=1, val_tokens=128,
                            arith_eval=4, arith_digits=2, progress=False))
    sft(SFTConfig(ckpt=str(root / "pretrain"), data="builtin:sft-arith?n=16&seed=0", out=str(root / "sft"),
                  max_steps=3, batch_size=4, seq_len=128, warmup_steps=1, logging_steps=1, progress=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a random model's completions: truncated, equal rewards
        grpo(GRPOConfig(ckpt=str(root / "sft"), task="arithmetic", out=str(root / "grpo"), task_args={"digits": 2},
                        max_steps=2, prompts_per_step=2, num_generations=2, max_completion_length=3, eval_steps=1,
                        eval_problems=3, seed=0))
    (root / "summary.json").write_text(json.dumps([
        {"stage": "pretrain", "figure": "FIGURE-P", "minutes": 0.1},
        {"stage": "sft", "figure": "FIGURE-S", "minutes": 0.1}]))
    return root


def row(md: str, what: str) -> str:
    m = re.search(rf"^\| {re.escape(what)} \| (.*) \|$", md, re.M)
    assert m, (what, md)
    return m.group(1)


def test_every_stage_records_its_machine_and_writes_a_card(pipeline):
    for stage in ("pretrain", "sft", "grpo"):
        m = json.loads((pipeline / stage / "machine.json").read_text())
        assert m["cores"] >= 1 and m["torch"] and m["peak_flops"]["float32"] > 1e8
        md = (pipeline / stage / "report.md").read_text()
        assert row(md, "command").startswith(f"`nanoseek {stage} ")
        assert "not recorded" not in row(md, "machine")
        assert "MFU" in md and "CPU-hours" in row(md, "cost")


def test_pipeline_card_has_every_stage_with_real_figures(pipeline, capsys):
    assert cli.main(["report", str(pipeline)]) == 0
    md = (pipeline / "report.md").read_text()
    assert md.startswith("# Report card: demo")
    for stage in ("tokenizer", "pretrain", "sft", "grpo"):
        assert re.search(rf"^## {stage}", md, re.M), stage
    assert row(md, "tokenizer").startswith(f"vocab {Tokenizer.load(pipeline / 'tokenizer').vocab_size} |")
    assert md.index("## tokenizer") < md.index("## pretrain") < md.index("## sft") < md.index("## grpo")

    for stage, steps, tokens in (("pretrain", 4, 4 * 4 * 32), ("sft", 3, 3 * 4 * 128), ("grpo", 2, None)):
        st = read_stage(pipeline / stage)
        last = st.train[-1]
        assert last["step"] == steps and (tokens is None or last["tokens"] == tokens)
        c = count(ModelConfig.load(pipeline / stage / "model" / "config.json"), 32)
        cells = row(md, f"[{stage}]({stage}/report.md)").split(" | ")
        assert cells[1] == f"{human(c.total)} ({human(c.activated)})"  # parameters (activated)
        assert cells[2] == human(last["tokens"])
        mfu = float(cells[4].rstrip("%")) / 100
        assert 0 < mfu < 5  # a tiny model's small matmuls, against a big GEMM's probe
        assert cells[5].startswith("$")
        section = md[md.index(f"## {stage}"):]
        assert f"{last['tokens']:,}" in row(section, "tokens")
        for png in re.findall(r"\]\(((?:%s)/[^)]+\.png)\)" % stage, section.split("\n## ")[0]):
            assert (pipeline / png).is_file()
    assert row(md, "[pretrain](pretrain/report.md)").startswith("FIGURE-P")  # the pipeline's own figure
    grpo_cells = row(md, "[grpo](grpo/report.md)")
    assert "eval accuracy" in grpo_cells  # no summary row: the run's own held-out figures
    pre = md[md.index("## pretrain"):md.index("## sft")]
    ev = json.loads((pipeline / "pretrain" / "eval.json").read_text())
    assert row(pre, "held-out accuracy") == f"{ev['accuracy']:.1%} of 4"
    assert "--preset tiny" in row(pre, "command") and "--max-steps 4" in row(pre, "command")
    assert "](pretrain/loss.png)" in pre and "](grpo/grpo.png)" in md


def test_report_rebuilds_one_stage_and_refuses_what_is_not_a_run(pipeline, tmp_path, capsys):
    card = pipeline / "sft" / "report.md"
    card.write_text("# sft: tiny\n")
    assert cli.main(["report", str(pipeline / "sft")]) == 0
    md = card.read_text()
    assert md.startswith("# sft: tiny\n") and "## Config" in md and row(md, "tokens").startswith("1,536 tokens")
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "holds no stage run directories" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path / "nope")]) == 2
    assert "RUN" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    assert cli.main(["report", str(bad)]) == 2
    assert f"{bad / 'config.json'}: not valid JSON" in capsys.readouterr().err


def test_pretrain_card_throughput_is_the_whole_runs_and_its_loss_names_the_next_token_part(pipeline):
    # the last record's tokens_per_s is one logging interval's; the card's figure is the run's
    md = (pipeline / "pretrain" / "report.md").read_text()
    last = read_stage(pipeline / "pretrain").train[-1]
    assert row(md, "throughput") == f"{last['tokens'] / last['elapsed_s']:,.0f} tokens/s"
    assert last["loss"] != last["lm_loss"]  # the total carries λ·MTP and α·balance
    assert row(md, "final training loss") == f"{last['loss']:.4g} (next-token {last['lm_loss']:.4g})"
