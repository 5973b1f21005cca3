"""`nanoseek generate` and `nanoseek chat`: the engine from a terminal.

`chat` keeps the conversation, renders it with the tokenizer's chat template, and streams the
reply; a reasoner's thinking (between <think> and </think>) is shown dimmed, apart from the
answer, and — as the DeepSeek API asks — is not sent back to the model in later turns.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

from ..tokenizer import END_THINK, THINK
from .speculative import SPECULATIVE_TOKENS_HELP, check_speculative_tokens

DIM, RESET = "\033[2m", "\033[0m"
DTYPES = (None, "float32", "fp32", "bfloat16", "bf16")


@dataclass
class _Sampling:
    ckpt: str = field(metadata={"help": "checkpoint directory (config.json, model.safetensors, tokenizer.json), "
                                        "or any stage's run directory (its model/)"})
    max_tokens: int = field(default=256, metadata={"help": "most tokens to generate"})
    temperature: float = field(default=0.7, metadata={"help": "0 = greedy"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling mass"})
    top_k: int = field(default=0, metadata={"help": "sample from the k most likely tokens (0 = all)"})
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = field(default=None, metadata={"help": "makes sampling reproducible"})
    stop: list[str] = field(default_factory=list, metadata={"help": "stop strings"})
    device: str | None = field(default=None, metadata={"help": "cpu | cuda (default: cuda if available)"})
    dtype: str | None = field(default=None, metadata={"help": "float32 | bfloat16 (default: fp32 on CPU, bf16 on GPU)"})
    speculative_tokens: int = field(default=0, metadata={"help": SPECULATIVE_TOKENS_HELP})

    def __post_init__(self) -> None:
        """Bad values fail here, as one line naming the flag, before the checkpoint is read."""
        from ..checkpoint import ckpt_flag
        from .engine import check_device

        def finite(name, lo=None, hi=None, lo_open=False):
            v = getattr(self, name)
            ok = math.isfinite(v) and (lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or v <= hi)
            if not ok:
                rng = f"({lo}, ∞)" if lo_open else (f"[{lo}, {hi}]" if hi is not None else f"[{lo}, ∞)")
                raise ValueError(f"--{name.replace('_', '-')} {v}: must be a finite number in {rng}")

        if self.max_tokens < 1:
            raise ValueError(f"--max-tokens {self.max_tokens}: must be ≥ 1")
        finite("temperature", 0)
        finite("top_p", 0, 1)
        if self.top_k < 0:
            raise ValueError(f"--top-k {self.top_k}: must be ≥ 0 (0 = off)")
        finite("frequency_penalty", -2, 2)
        finite("presence_penalty", -2, 2)
        finite("repetition_penalty", 0, lo_open=True)
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise ValueError(f"--seed {self.seed}: must be in [-2^63, 2^63)")
        check_speculative_tokens(self.speculative_tokens)
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r}: expected float32 or bfloat16")
        ckpt_flag(self.ckpt)  # a file, a missing or empty directory, a run without model/
        check_device(self.device)
        # argv bytes that are not UTF-8 arrive as lone surrogates, which no tokenizer can encode
        for name in ("prompt", "suffix", "system", "stop"):
            values = getattr(self, name, None)
            for v in [values] if isinstance(values, str) else (values or []):
                if not _valid_unicode(v):
                    raise ValueError(f"--{name} is not valid UTF-8 text")

    def params(self):
        from .sampling import SamplingParams

        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, frequency_penalty=self.frequency_penalty,
                              presence_penalty=self.presence_penalty, repetition_penalty=self.repetition_penalty,
                              seed=self.seed, stop=list(self.stop), token_healing=getattr(self, "token_healing", False))

    def engine(self):
        import torch

        from .engine import Engine

        from ..checkpoint import ckpt_flag

        ckpt = ckpt_flag(self.ckpt)  # a run directory → its model/
        if not (ckpt / "tokenizer.json").is_file():  # before the weights are read, not after
            raise FileNotFoundError(f"--ckpt {self.ckpt}: no tokenizer.json in {ckpt} beside the weights")
        dtypes = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                  "bf16": torch.bfloat16}
        return Engine(ckpt, device=self.device, dtype=dtypes.get(self.dtype), max_num_seqs=4,
                      speculative_tokens=self.speculative_tokens)


@dataclass
class GenerateConfig(_Sampling):
    """`nanoseek generate`: complete one prompt, streaming the text."""

    prompt: str = field(default="", metadata={"help": "the text to continue"})
    suffix: str | None = field(default=None, metadata={"help": "fill in the middle between --prompt and this text "
                                                       "(FIM: the model's tokenizer needs FIM tokens)"})
    chat: bool = field(default=False, metadata={"help": "wrap the prompt as a user turn of the chat template"})
    think: bool = field(default=False, metadata={"help": "with --chat: open a <think> block for the reply"})
    token_healing: bool = field(default=False, metadata={
        "help": "back up the prompt's last token and let the first generated token(s) spell it (for a prompt "
                "that ends mid-token, e.g. in indentation); the output starts after the prompt"})


@dataclass
class ChatConfig(_Sampling):
    """`nanoseek chat`: an interactive terminal chat."""

    system: str | None = field(default=None, metadata={"help": "system prompt"})
    think: bool = field(default=False, metadata={"help": "start each reply inside <think> (reasoner models)"})
    max_tokens: int = field(default=512, metadata={"help": "most tokens per reply"})


def _valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class ThinkPrinter:
    """Writes streamed text, dimming what lies between <think> and </think>."""

    def __init__(self, out=None, in_think: bool = False):
        # sys.stdout looked up now, not when the class was defined: it may have been replaced since
        self.out, self.in_think = out if out is not None else sys.stdout, in_think
        self.color = getattr(out, "isatty", lambda: False)()
        self.answer = ""
        if in_think:
            self._style(True)

    def _style(self, dim: bool) -> None:
        if self.color:
            self.out.write(DIM if dim else RESET)

    def write(self, text: str) -> None:
        while text:
            tag = END_THINK if self.in_think else THINK
            head, found, text = text.partition(tag)
            self.out.write(head)
            if not self.in_think:
                self.answer += head
            if found:
                self.in_think = not self.in_think
                self._style(self.in_think)
                self.out.write("\n" if not self.in_think else "")
        self.out.flush()

    def close(self) -> None:
        if self.in_think:
            self._style(False)
        self.out.write("\n")
        self.out.flush()


def generate_cmd(cfg: GenerateConfig) -> str:
    """Complete one prompt with a checkpoint, streaming the text to the terminal."""
    if not cfg.prompt and cfg.suffix is None:
        raise ValueError("--prompt is required")
    if cfg.chat and cfg.suffix is not None:
        raise ValueError("--suffix fills in plain text; it does not go with --chat")
    eng = cfg.engine()
    tok = eng.tokenizer
    if cfg.suffix is not None:
        try:
            ids = tok.fim_prompt(cfg.prompt, cfg.suffix)
        except ValueError as e:
            raise ValueError(f"--suffix: {e}") from None
        sys.stdout.write(cfg.prompt)
    elif cfg.chat:
        ids = tok.render_chat([{"role": "user", "content": cfg.prompt}], add_generation_prompt=True, think=cfg.think)[0]
    else:
        ids = tok.encode(cfg.prompt)
        sys.stdout.write(cfg.prompt)
    printer = ThinkPrinter(in_think=cfg.chat and cfg.think)
    last = None
    for last in eng.stream(ids, cfg.params()):
        printer.write(last.text_delta)
    if cfg.suffix is not None:
        sys.stdout.write(cfg.suffix)
    printer.close()
    if last is not None:
        print(f"[{last.num_completion_tokens} tokens, finish: {last.finish_reason}]", file=sys.stderr)
    return printer.answer


def chat(cfg: ChatConfig) -> None:
    """Chat with a checkpoint in the terminal (/reset clears the conversation, /exit or Ctrl-D quits)."""
    eng = cfg.engine()
    tok = eng.tokenizer
    base = [{"role": "system", "content": cfg.system}] if cfg.system else []
    messages = list(base)
    print(f"nanoseek chat — {cfg.ckpt} (context {eng.max_context} tokens). /reset, /exit", file=sys.stderr)
    while True:
        try:
            user = input("\nyou> ")
        except EOFError:
            print()
            return
        if user.strip() in ("/exit", "/quit"):
            return
        if user.strip() == "/reset":
            messages = list(base)
            continue
        if not _valid_unicode(user):
            print("(that line is not valid UTF-8 text; type it again)", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": user})
        ids = tok.render_chat(messages, add_generation_prompt=True, think=cfg.think)[0]
        while len(ids) >= eng.max_context - 16 and len(messages) > len(base) + 1:
            messages = base + messages[len(base) + 2:]  # forget the oldest exchange
            ids = tok.render_chat(messages, add_generation_prompt=True, think=cfg.think)[0]
        sys.stdout.write("bot> ")
        printer = ThinkPrinter(in_think=cfg.think)
        try:
            for ev in eng.stream(ids, cfg.params()):
                printer.write(ev.text_delta)
        except KeyboardInterrupt:  # stop this reply, keep the chat
            pass
        printer.close()
        messages.append({"role": "assistant", "content": printer.answer.strip()})
