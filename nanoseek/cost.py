"""What training and serving a model costs, from first principles.

Training: FLOPs = tokens × FLOPs per token (nanoseek/counting.py: 6 per activated matmul
parameter, causal attention at the sequence length, and the MTP modules when the model has
them); accelerator-seconds = FLOPs ÷ (peak FLOP/s × MFU); money = accelerator-hours × price.
Every stage's token is counted alike, so the stages differ only in their token counts.

The figures that fix the model to the world are DeepSeek's own, kept in the tables below with
their sources: the V3 report's GPU-hours (Table 1: 2,664K pretraining + 119K context extension +
5K post-training H800 GPU-hours, $5.576M at $2 per GPU-hour) and its pretraining rate (180K
GPU-hours per trillion tokens), which fixes the MFU those GPU-hours imply; the throughput of
DeepSeek's online service; the API's prices. On this machine (`--hardware cpu`) nothing is
assumed: the peak is a matmul probe and the throughput a training step (or the engine) measured.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field

import torch

from .config import ModelConfig
from .counting import Counts, count, human, model_config, model_flags

# dense peak FLOP/s (no structured sparsity) from NVIDIA's datasheets, SXM parts
GPUS = {
    "H800": {"bfloat16": 989e12, "float8": 1979e12},
    "H100": {"bfloat16": 989e12, "float8": 1979e12},
    "H200": {"bfloat16": 989e12, "float8": 1979e12},
    "A100": {"bfloat16": 312e12},  # no FP8 units
}
HARDWARE = [*GPUS, "cpu"]

# DeepSeek-V3 technical report (arXiv 2412.19437), Table 1 and §1: H800 GPU-hours by stage; the
# pretraining rate, 180K GPU-hours per trillion tokens (3.7 days on the 2,048-GPU cluster); $2/GPU-hour
V3_GPU_HOURS = {"pretraining": 2664e3, "context extension": 119e3, "post-training": 5e3}
V3_HOURS_PER_TRILLION = 180e3
V3_PRETRAIN_TOKENS = 14.8e12
V3_GPUS = 2048
V3_PRICE = 2.0
V3_SEQ_LEN = 4096

# DeepSeek's online V3/R1 service (its inference-system overview, 2025-03-01): per 8-GPU H800 node,
# 73.7K input tokens/s in prefill (cache hits included) and 14.8K output tokens/s in decode
V3_SERVICE = {"prefill": 73.7e3 / 8, "decode": 14.8e3 / 8}
V3_SERVICE_DATE = "2025-03-01"

# DeepSeek API list prices, USD per million tokens: (input cache hit, input cache miss, output)
API_PRICES_DATE = "2025-01"  # the V3 and R1 launch prices
API_PRICES = {"deepseek-chat": (0.07, 0.27, 1.10), "deepseek-reasoner": (0.14, 0.55, 2.19)}

STAGES = ("pretraining", "context extension", "post-training")


def _demo_recipe() -> dict[str, float]:
    """The demo's `small` run: `nanoseek pretrain`'s defaults, and its one-epoch cold start (87 steps)."""
    from .train.pretrain import PretrainConfig

    p = PretrainConfig()
    return {"pretraining": p.max_steps * p.batch_size * p.seq_len, "context extension": 0,
            "post-training": 87 * p.batch_size * p.seq_len, "seq_len": p.seq_len}


def _v3_recipe() -> dict[str, float]:
    """The V3 report gives tokens for pretraining only; the two later stages are the tokens their
    GPU-hours train at the pretraining rate (4K-token equivalents)."""
    later = {s: V3_GPU_HOURS[s] / V3_HOURS_PER_TRILLION * 1e12 for s in STAGES[1:]}
    return {"pretraining": V3_PRETRAIN_TOKENS, **later, "seq_len": V3_SEQ_LEN}


RECIPES = {"v3-671b": _v3_recipe, "small": _demo_recipe}


def training_flops(c: Counts, mtp: bool = True) -> float:
    """FLOPs of one training token: the main model, plus its MTP modules when they train."""
    return c.train_flops_per_token + (c.mtp_flops_per_token if mtp else 0.0)


@functools.lru_cache(maxsize=None)
def _v3_counts() -> Counts:
    from .config import preset

    return count(preset("v3-671b"), V3_SEQ_LEN)


def v3_mfu(dtype: str = "bfloat16") -> float:
    """The MFU DeepSeek-V3's reported rate implies: its FLOPs per pretraining token (MTP included)
    over 180K H800 GPU-hours per trillion tokens, against the H800's dense peak in `dtype`."""
    return training_flops(_v3_counts()) * 1e12 / (V3_HOURS_PER_TRILLION * 3600 * GPUS["H800"][dtype])


def v3_serving_mfu(phase: str) -> float:
    """The fraction of an H800's BF16 peak DeepSeek's service spends on 2·N FLOPs per token."""
    return V3_SERVICE[phase] * 2 * _v3_counts().matmul_params / GPUS["H800"]["bfloat16"]


# ---------------------------------------------------------------------- this machine, measured
@functools.lru_cache(maxsize=None)
def _matmul_peak(dtype: torch.dtype, threads: int, n: int, reps: int) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def matmul_peak(dtype: torch.dtype = torch.float32, n: int = 2048, reps: int = 3) -> float:
    """FLOP/s of the best of `reps` (n × n) · (n × n) products at torch's present thread count:
    what this CPU's GEMMs reach, the peak its MFU is measured against (once per process)."""
    return _matmul_peak(dtype, torch.get_num_threads(), n, reps)


def measure_training(mc: ModelConfig, batch_size: int, seq_len: int, dtype: str = "float32",
                     steps: int = 3) -> float:
    """Tokens/s of full training steps (V3's loss with MTP, backward, AdamW) of a random model
    of this configuration, through the training core; the best of `steps` after a warm-up."""
    import tempfile

    from .model import DeepSeekV3
    from .train.loop import TrainConfig, Trainer
    from .train.pretrain import lm_loss

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:  # the trainer writes nothing unless asked to save
        trainer = Trainer(TrainConfig(out=tmp, device="cpu", dtype=dtype, progress=False), DeepSeekV3(mc))
        loss = lm_loss(mtp_weight=0.3, balance_alpha=1e-4)
        ids = torch.randint(0, mc.vocab_size, (batch_size, seq_len + 1))
        best = math.inf
        for i in range(steps + 1):
            t = time.perf_counter()
            trainer.train_step([(ids[:, :-1], ids[:, 1:])], loss)
            if i:
                best = min(best, time.perf_counter() - t)
    return batch_size * seq_len / best


def measure_serving(mc: ModelConfig, batch: int = 32, prompt_len: int = 128, new_tokens: int = 32) -> dict:
    """Tokens/s of the engine on a random model of this configuration: prefill (batch prompts of
    prompt_len, one token out) and decode (batch short prompts, new_tokens each, greedy)."""
    from .engine import Engine, SamplingParams
    from .model import DeepSeekV3

    torch.manual_seed(0)
    eng = Engine(DeepSeekV3(mc), device="cpu", dtype=torch.float32, max_num_seqs=batch,
                 enable_prefix_cache=False)
    g = torch.Generator().manual_seed(0)
    prompt_len = min(prompt_len, mc.max_position_embeddings - new_tokens - 8)

    def timed(n_prompt: int, n_out: int) -> float:
        prompts = torch.randint(8, mc.vocab_size, (batch, n_prompt), generator=g).tolist()
        params = SamplingParams(max_tokens=n_out, temperature=0, ignore_eos=True)
        eng.generate(prompts[:2], params)  # warm-up
        t = time.perf_counter()
        eng.generate(prompts, params)
        return time.perf_counter() - t

    return {"prefill": batch * prompt_len / timed(prompt_len, 1), "decode": batch * new_tokens / timed(8, new_tokens)}


def machine(threads: int | None = None, probe: bool = True) -> dict:
    """What runs here: CPU, cores, torch threads, torch, the GPU, and (without one, when `probe`)
    the CPU's matmul peaks at those threads."""
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        m = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__}
        if torch.cuda.is_available():
            m["gpu"] = torch.cuda.get_device_name()
        elif probe:
            m["peak_flops"] = {"float32": matmul_peak(torch.float32), "bfloat16": matmul_peak(torch.bfloat16)}
    finally:
        torch.set_num_threads(before)
    return m


def peak_of(m: dict, dtype: str) -> tuple[float | None, str]:
    """(peak FLOP/s, what it is) of a machine record in `dtype`: a datasheet GPU's, or the probe's."""
    gpu = m.get("gpu")
    if gpu:
        name = next((k for k in GPUS if k in gpu), None)
        if name is None:
            return None, f"{gpu}: no datasheet peak in nanoseek.cost.GPUS"
        dt = "bfloat16" if dtype in ("auto", "float32") else dtype
        return GPUS[name].get(dt), f"{name} dense {dt} peak"
    dt = "float32" if dtype == "auto" else dtype
    peak = m.get("peak_flops", {}).get(dt)
    return peak, f"{dt} matmul probe"


# ---------------------------------------------------------------------- the command
@dataclass
class CostConfig:
    preset: str | None = field(default=None, metadata={"help": "a named preset (v3-671b, small, ...)"})
    ckpt: str | None = field(default=None, metadata={"help": "a checkpoint directory, or any stage's run directory"})
    hardware: str = field(default="H800", metadata={"help": "accelerator profile; cpu = this machine, measured",
                                                    "choices": HARDWARE})
    dtype: str = field(default="auto", metadata={"help": "the precision whose peak the MFU is relative to; auto = "
                                                 "bfloat16 on GPUs, float32 on cpu",
                                                 "choices": ["auto", "float32", "bfloat16", "float8"]})
    mfu: float = field(default=0.0, metadata={"help": "model FLOPs utilisation; 0 = DeepSeek-V3's (what its reported "
                                              "GPU-hours imply), or on cpu the measured one"})
    accelerators: int = field(default=0, metadata={"help": "accelerators training at once, for the days; 0 = 2048 "
                                                   "(V3's cluster), 1 on cpu"})
    price_per_hour: float = field(default=V3_PRICE, metadata={"help": "USD per accelerator-hour (the V3 report: $2 "
                                                              "per H800 GPU-hour)"})
    seq_len: int = field(default=0, metadata={"help": "training sequence length; 0 = the recipe's, else min(4096, "
                                              "the model's context)"})
    pretrain_tokens: float | None = field(default=None, metadata={"help": "pretraining tokens (default: the "
                                                                   "preset's recipe)"})
    context_tokens: float | None = field(default=None, metadata={"help": "context-extension tokens"})
    post_training_tokens: float | None = field(default=None, metadata={"help": "post-training (SFT + RL) tokens"})
    tokens_per_s: float = field(default=0.0, metadata={"help": "serving: output tokens/s per accelerator; 0 = measured "
                                                       "(cpu), DeepSeek's (v3-671b on H800), or estimated"})
    prefill_tokens_per_s: float = field(default=0.0, metadata={"help": "serving: input tokens/s per accelerator; "
                                                               "0 as for --tokens-per-s"})

    def __post_init__(self):
        model_flags(self.preset, self.ckpt)
        if self.dtype == "float8" and self.hardware not in GPUS:
            raise ValueError(f"--dtype float8: {self.hardware} has no FP8 peak; use bfloat16 or float32")
        if self.hardware in GPUS and self.dtype not in ("auto", *GPUS[self.hardware]):
            raise ValueError(f"--dtype {self.dtype}: {self.hardware}'s profile has {', '.join(GPUS[self.hardware])}")
        if not 0 <= self.mfu <= 1:
            raise ValueError(f"--mfu {self.mfu}: must be in [0, 1] (0 = DeepSeek-V3's)")
        if self.accelerators < 0:
            raise ValueError(f"--accelerators {self.accelerators}: must be ≥ 0 (0 = the default)")
        for name in ("price_per_hour", "tokens_per_s", "prefill_tokens_per_s"):
            v = getattr(self, name)
            if not 0 <= v < math.inf:
                raise ValueError(f"--{name.replace('_', '-')} {v}: must be a finite number ≥ 0")
        for name in ("pretrain_tokens", "context_tokens", "post_training_tokens"):
            v = getattr(self, name)
            if v is not None and not 0 <= v < math.inf:
                raise ValueError(f"--{name.replace('_', '-')} {v}: must be a finite number ≥ 0")
        if self.seq_len < 0:
            raise ValueError(f"--seq-len {self.seq_len}: must be ≥ 0 (0 = the recipe's)")


@dataclass
class Estimate:
    """What `cost` computed: per stage (tokens, FLOPs, accelerator-hours, USD) and serving."""

    hardware: str
    peak: float  # FLOP/s per accelerator in the chosen dtype
    mfu: float
    flops_per_token: float
    stages: dict[str, dict] = field(default_factory=dict)
    serving: dict[str, dict] = field(default_factory=dict)

    @property
    def hours(self) -> float:
        return sum(s["hours"] for s in self.stages.values())

    @property
    def usd(self) -> float:
        return sum(s["usd"] for s in self.stages.values())


def _tokens(cfg: CostConfig, mc: ModelConfig) -> tuple[dict[str, float], int]:
    recipe = RECIPES[cfg.preset]() if cfg.preset in RECIPES else {}
    given = {"pretraining": cfg.pretrain_tokens, "context extension": cfg.context_tokens,
             "post-training": cfg.post_training_tokens}
    tokens = {s: given[s] if given[s] is not None else recipe.get(s, 0.0) for s in STAGES}
    if not tokens["pretraining"] and cfg.pretrain_tokens is None:
        raise ValueError(f"--pretrain-tokens: {f'--preset {cfg.preset}' if cfg.preset else cfg.ckpt} has no recipe "
                         f"({', '.join(RECIPES)} do); give the token counts")
    seq = cfg.seq_len or int(recipe.get("seq_len", min(4096, mc.max_position_embeddings)))
    if seq > mc.max_position_embeddings:
        raise ValueError(f"--seq-len {seq}: exceeds the model's context ({mc.max_position_embeddings})")
    return tokens, seq


def estimate(cfg: CostConfig, quiet: bool = False) -> Estimate:
    """The numbers `nanoseek cost` prints."""
    say = (lambda *a: None) if quiet else print
    mc, what = model_config(cfg.preset, cfg.ckpt)
    tokens, seq = _tokens(cfg, mc)
    c = _v3_counts() if cfg.preset == "v3-671b" and seq == V3_SEQ_LEN else count(mc, seq)
    fpt = training_flops(c, mtp=mc.num_nextn_predict_layers > 0)
    cpu = cfg.hardware == "cpu"
    dtype = cfg.dtype if cfg.dtype != "auto" else ("float32" if cpu else "bfloat16")
    unit = "CPU-hours" if cpu else "GPU-hours"
    small = c.total + c.mtp < 50e6  # small enough to build and time here
    say(f"model      {what}: {human(c.total)} parameters, {human(c.activated)} activated per token")
    say(f"FLOPs      per training token at seq {seq}: 6·N {human(6 * c.matmul_params)} + attention "
        f"{human(c.attention_flops_per_token)}" + (f" + MTP {human(c.mtp_flops_per_token)}" if fpt > c.train_flops_per_token
                                                   else "") + f" = {human(fpt)}")
    if cpu:
        m = machine()
        peak = m["peak_flops"][dtype]
        say(f"hardware   cpu: {m['cpu']}, {m['cores']} cores, {m['threads']} torch thread(s), torch {m['torch']}; "
            f"{dtype} matmul probe {peak / 1e9:.1f} GFLOP/s (the peak)")
    else:
        peak = GPUS[cfg.hardware][dtype]
        fp8 = GPUS[cfg.hardware].get("float8")
        say(f"hardware   {cfg.hardware}: dense peak {GPUS[cfg.hardware]['bfloat16'] / 1e12:.0f} TFLOP/s bfloat16"
            + (f", {fp8 / 1e12:.0f} float8" if fp8 else ""))
    if cpu and small and not cfg.mfu:
        from .train.pretrain import PretrainConfig

        bs = PretrainConfig().batch_size
        rate = measure_training(mc, bs, seq, dtype)
        mfu = rate * fpt / peak
        say(f"MFU        {mfu:.1%}, measured: {rate:,.0f} tokens/s in training steps of batch {bs} × {seq} ({dtype})")
    else:
        mfu = cfg.mfu or v3_mfu("bfloat16" if dtype == "float32" else dtype)
        if cfg.mfu:
            say(f"MFU        {mfu:.1%} of the {dtype} peak (--mfu)")
        else:
            say(f"MFU        {v3_mfu('bfloat16'):.1%} of the bfloat16 peak ({v3_mfu('float8'):.1%} of float8): "
                f"DeepSeek-V3's, implied by its reported {V3_HOURS_PER_TRILLION / 1e3:.0f}K H800 GPU-hours per "
                "trillion tokens; --mfu sets another")
        rate = peak * mfu / fpt
    est = Estimate(cfg.hardware, peak, mfu, fpt)
    say("")
    n_acc = cfg.accelerators or (1 if cpu else V3_GPUS)
    say(f"{'stage':<18} {'tokens':>9} {'FLOPs':>9} {unit:>11} {'days on ' + str(n_acc):>12} "
        f"{'USD at $' + format(cfg.price_per_hour, '.2f') + '/h':>16}")
    for s, n in tokens.items():
        hours = n / rate / 3600
        est.stages[s] = {"tokens": n, "flops": n * fpt, "hours": hours, "usd": hours * cfg.price_per_hour}
        say(f"{s:<18} {human(n):>9} {n * fpt:>9.2e} {_hours(hours):>11} {hours / n_acc / 24:>12.3g} "
            f"{usd(hours * cfg.price_per_hour):>16}")
    say(f"{'total':<18} {human(sum(tokens.values())):>9} {sum(tokens.values()) * fpt:>9.2e} {_hours(est.hours):>11} "
        f"{est.hours / n_acc / 24:>12.3g} {usd(est.usd):>16}")
    if cfg.preset == "v3-671b":
        parts = " + ".join(f"{h / 1e3:,.0f}K" for h in V3_GPU_HOURS.values())
        say(f"DeepSeek-V3 report, Table 1: {parts} = {sum(V3_GPU_HOURS.values()) / 1e3:,.0f}K H800 GPU-hours, "
            f"{usd(sum(V3_GPU_HOURS.values()) * V3_PRICE)} at ${V3_PRICE:.0f}/GPU-hour"
            + ("" if tokens == {s: v for s, v in _v3_recipe().items() if s in STAGES} else " (other tokens here)"))
        say("  (the report gives tokens for pretraining only; the later stages' tokens are their GPU-hours at the "
            "pretraining rate)")
    est.serving = serving(cfg, mc, c, peak, dtype, small, say)
    return est


def serving(cfg: CostConfig, mc: ModelConfig, c: Counts, peak: float, dtype: str, small: bool, say) -> dict:
    """Tokens/s per accelerator for prefill and decode, and USD per million tokens at the hourly price."""
    given = {"prefill": cfg.prefill_tokens_per_s, "decode": cfg.tokens_per_s}
    if cfg.hardware == "cpu" and small and not all(given.values()):
        measured, how = measure_serving(mc), "measured by the engine on a random model of this configuration"
    elif cfg.preset == "v3-671b" and cfg.hardware == "H800":
        measured, how = dict(V3_SERVICE), f"DeepSeek's online service ({V3_SERVICE_DATE}), per GPU"
    else:  # DeepSeek's serving efficiency, scaled by this model's FLOPs and this accelerator's peak
        measured = {p: v3_serving_mfu(p) * peak / (2 * c.matmul_params) for p in ("prefill", "decode")}
        how = "estimated: DeepSeek's serving MFU (2·N FLOPs per token) on this model and peak"
    out = {}
    for phase in ("prefill", "decode"):
        rate = given[phase] or measured[phase]
        src = "given" if given[phase] else how
        out[phase] = {"tokens_per_s": rate, "usd_per_million": cfg.price_per_hour / (rate * 3600) * 1e6,
                      "mfu": rate * 2 * c.matmul_params / peak, "source": src}
    say("")
    say(f"serving at ${cfg.price_per_hour:.2f} per accelerator-hour")
    say(f"{'':<18} {'tokens/s':>10} {'USD per 1M tokens':>18} {'MFU':>6}  source")
    for phase, label in (("prefill", "input (prefill)"), ("decode", "output (decode)")):
        o = out[phase]
        say(f"{label:<18} {o['tokens_per_s']:>10,.0f} {o['usd_per_million']:>18.4g} {o['mfu']:>6.1%}  {o['source']}")
    say(f"DeepSeek API list prices ({API_PRICES_DATE}), USD per 1M tokens: cache hit / cache miss / output")
    for model, (hit, miss, outp) in API_PRICES.items():
        say(f"  {model:<18} {hit:.2f} / {miss:.2f} / {outp:.2f}")
    return out


def usd(x: float) -> str:
    """Dollars as a person writes them: $5.576M, $10,000, $0.49, $0.00012."""
    return f"${x / 1e6:,.3f}M" if x >= 1e5 else f"${x:,.0f}" if x >= 100 else f"${x:.2g}" if x < 0.01 else f"${x:.2f}"


def _hours(h: float) -> str:
    return f"{h / 1e3:,.1f}K" if h >= 1e3 else f"{h:.3g}"


def cost(cfg: CostConfig) -> Estimate:
    """Training cost by stage (accelerator-hours, USD, the MFU assumed) and serving cost per 1M tokens."""
    return estimate(cfg)
