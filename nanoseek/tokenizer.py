"""Byte-level BPE tokenizer, special tokens and the chat template.

Why these choices:

* Byte-level BPE (HF ``tokenizers``) so any Unicode string round-trips: there is
  no unknown token and no normalizer that could change the text.
* Digits are split one per token *before* byte-level pre-tokenization. The demo
  model learns arithmetic, and a tokenizer that merges "123" into one token
  hides the place-value structure the model has to learn.
* The special tokens sit at fixed ids 0..7 so every module (SFT masks, the
  engine's stop tokens, GRPO's ``<think>`` parsing) can rely on them.
* Fill-in-the-middle uses DeepSeek-Coder's three tokens (``FIM_TOKENS``). Every vocabulary trained
  now has them, right after the fixed eight; they are found by name, not by id, so a tokenizer
  trained before them still loads (``fim_ids`` is None and FIM is refused with a clear error).

FIM format (DeepSeek-Coder's PSM; SPM puts the suffix first so the middle continues the prefix)::

    PSM: <｜fim▁begin｜>{prefix}<｜fim▁hole｜>{suffix}<｜fim▁end｜>{middle}
    SPM: <｜fim▁begin｜><｜fim▁hole｜>{suffix}<｜fim▁end｜>{prefix}{middle}

Chat format (the project-wide contract)::

    <|bos|>[<|system|>{system}]
    per message:  <|user|>{content}    or    <|assistant|>{content}<|eos|>
    generation prompt: <|assistant|>   (+ "<think>\\n" when think=True)

An assistant message with ``reasoning_content`` renders its content as
``<think>\\n{reasoning}\\n</think>\\n{content}``. No other whitespace is added.

Tool calls use DeepSeek-V3's tokens (``TOOL_TOKENS``, trained in after the FIM tokens and found by
name like them)::

    tools:       <|system|>{tools_text(tools)}                      (right after <|bos|>)
    tool calls:  <|assistant|>{content}<｜tool▁calls▁begin｜>CALL[\\nCALL…]<｜tool▁calls▁end｜><|eos|>
    CALL:        <｜tool▁call▁begin｜>function<｜tool▁sep｜>{name}\\n```json\\n{arguments}\\n```<｜tool▁call▁end｜>
    tool results (consecutive role "tool" messages):
                 <｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>{content}<｜tool▁output▁end｜>[\\n…]<｜tool▁outputs▁end｜>
Message text is plain text: a "<|assistant|>" typed into a message is those characters, never a
control id (render_chat encodes only the template's own tags as special tokens).

The same format is saved as a Jinja ``chat_template`` so that
``transformers.AutoTokenizer.from_pretrained(dir).apply_chat_template`` gives
exactly the ids of :meth:`Tokenizer.render_chat` for messages free of special-token strings
(transformers' tokenizer would read those as control tokens; render_chat does not).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
THINK, END_THINK = "<think>", "</think>"
SPECIAL_TOKENS = [BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, THINK, END_THINK]
# DeepSeek-Coder's fill-in-the-middle tokens: begin = before the prefix, hole = where the middle
# was cut out (the suffix follows), end = the middle follows
FIM_BEGIN, FIM_HOLE, FIM_END = "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"
FIM_TOKENS = [FIM_BEGIN, FIM_HOLE, FIM_END]
# DeepSeek-V3's tool-call tokens (its chat template's shape: see the module docstring)
TOOL_CALLS_BEGIN, TOOL_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
TOOL_OUTPUTS_BEGIN, TOOL_OUTPUTS_END = "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>"
TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"
TOOL_TOKENS = [TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP,
               TOOL_OUTPUTS_BEGIN, TOOL_OUTPUTS_END, TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END]
# trained into every new vocabulary after SPECIAL_TOKENS, looked up by name (older tokenizers lack them)
EXTRA_TOKENS = [*FIM_TOKENS, *TOOL_TOKENS]
N_BYTES = 256  # byte-level alphabet: every byte must be a token

# The Jinja twin of Tokenizer.render_chat_text. Written on one line with
# explicit '\n' string literals so Jinja's trim_blocks/lstrip_blocks (which HF
# enables) cannot eat or add whitespace.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools is defined and tools %}{{ '<|system|>## Tools\\nCall a tool with its name and JSON arguments.\\n' }}"
    "{% for t in tools %}{% set f = t['function'] if t['function'] is defined else t %}"
    "{{ '\\n### ' + f['name'] + '\\n' }}"
    "{% if f['description'] is defined and f['description'] %}{{ f['description'] + '\\n' }}{% endif %}"
    "{{ 'Parameters: ' + ((f['parameters'] if f['parameters'] is defined and f['parameters'] is not none else {}) | tojson) + '\\n' }}"
    "{% endfor %}{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ '<|system|>' + m['content'] }}"
    "{% elif m['role'] == 'user' %}{{ '<|user|>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ '<|assistant|>' }}"
    "{% if m.reasoning_content is defined and m.reasoning_content is not none %}"
    "{{ '<think>\\n' + m.reasoning_content + '\\n</think>\\n' }}{% endif %}"
    "{% if m['content'] is string %}{{ m['content'] }}{% endif %}"
    "{% if m.tool_calls is defined and m.tool_calls %}{{ '<｜tool▁calls▁begin｜>' }}"
    "{% for c in m.tool_calls %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{% set a = c['function']['arguments'] %}"
    "{{ '<｜tool▁call▁begin｜>' + (c['type'] if c['type'] is defined else 'function') + '<｜tool▁sep｜>'"
    " + c['function']['name'] + '\\n```json\\n' + (a if a is string else a | tojson) + '\\n```<｜tool▁call▁end｜>' }}"
    "{% endfor %}{{ '<｜tool▁calls▁end｜>' }}{% endif %}"
    "{{ '<|eos|>' }}"
    "{% elif m['role'] == 'tool' %}"
    "{% if loop.first or loop.previtem['role'] != 'tool' %}{{ '<｜tool▁outputs▁begin｜>' }}{% else %}{{ '\\n' }}{% endif %}"
    "{{ '<｜tool▁output▁begin｜>' + m['content'] + '<｜tool▁output▁end｜>' }}"
    "{% if loop.last or loop.nextitem['role'] != 'tool' %}{{ '<｜tool▁outputs▁end｜>' }}{% endif %}"
    "{% else %}{{ raise_exception('unknown chat role: ' + m['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}"
    "{% if think is defined and think %}{{ '<think>\\n' }}{% endif %}{% endif %}"
)


def tools_text(tools: list[dict]) -> str:
    """The system text that lists the callable functions (OpenAI's ``tools`` entries, or their
    ``function`` objects): name, description and JSON-schema parameters of each."""
    out = "## Tools\nCall a tool with its name and JSON arguments.\n"
    for t in tools:
        f = t.get("function", t)
        out += f"\n### {f['name']}\n"
        if f.get("description"):
            out += f["description"] + "\n"
        params = f.get("parameters")
        out += "Parameters: " + json.dumps(params if params is not None else {}, ensure_ascii=False) + "\n"
    return out


def tool_call_text(call: dict) -> str:
    """One OpenAI ``tool_calls`` entry as the text between <｜tool▁sep｜> and <｜tool▁call▁end｜>:
    the name, then the arguments (a JSON string, or an object serialised) in a json fence."""
    f = call["function"]
    args = f["arguments"] if isinstance(f["arguments"], str) else json.dumps(f["arguments"], ensure_ascii=False)
    return f"{f['name']}\n```json\n{args}\n```"


def _build_backend() -> _HFTokenizer:
    tok = _HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _reasoning(m: dict) -> str | None:
    reasoning = m.get("reasoning_content")
    if reasoning is not None and not isinstance(reasoning, str):
        raise ValueError(f"chat message field 'reasoning_content' must be a string, got {type(reasoning).__name__}")
    return reasoning


def _content(m: dict) -> str:
    if not isinstance(m, dict) or "role" not in m:
        raise ValueError(f"chat message must be a dict with 'role' and 'content', got {m!r}")
    c = m.get("content")
    if c is None and m.get("tool_calls"):  # an assistant turn that only calls tools
        return ""
    if not isinstance(c, str):
        raise ValueError(f"chat message field 'content' must be a string (role={m['role']!r}), got {type(c).__name__}")
    return c


class Tokenizer:
    """Thin wrapper over an HF ``tokenizers.Tokenizer`` with nanoseek's specials."""

    def __init__(self, backend: _HFTokenizer, model_max_length: int = 2048):
        self._tok = backend
        self._plain: _HFTokenizer | None = None
        self.model_max_length = model_max_length
        ids = [backend.token_to_id(t) for t in SPECIAL_TOKENS]
        if ids != list(range(len(SPECIAL_TOKENS))):
            raise ValueError(f"tokenizer special tokens must be {SPECIAL_TOKENS} at ids 0..7, got ids {ids}")
        (self.bos_id, self.eos_id, self.pad_id, self.system_id, self.user_id,
         self.assistant_id, self.think_id, self.end_think_id) = ids
        fim = [backend.token_to_id(t) for t in FIM_TOKENS]
        self.fim_ids: tuple[int, int, int] | None = None if None in fim else tuple(fim)
        tool = {t: backend.token_to_id(t) for t in TOOL_TOKENS}
        self.tool_ids: dict[str, int] | None = None if None in tool.values() else tool

    # ---------------------------------------------------------------- building
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        """Learn BPE merges from ``texts`` (streamed; never held in memory)."""
        floor = len(SPECIAL_TOKENS) + len(EXTRA_TOKENS) + N_BYTES
        if vocab_size < floor:
            raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least {floor} "
                             f"({len(SPECIAL_TOKENS) + len(EXTRA_TOKENS)} special tokens + {N_BYTES} bytes)")
        tok = _build_backend()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=SPECIAL_TOKENS + EXTRA_TOKENS,  # added first, so SPECIAL_TOKENS get ids 0..7
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path) -> "Tokenizer":
        path = Path(path)
        file = path if path.is_file() else path / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {file}")
        try:
            backend = _HFTokenizer.from_file(str(file))
        except Exception as e:  # the Rust error does not say which file
            raise ValueError(f"cannot read tokenizer {file}: {e}") from e
        max_len = 2048
        cfg_file = file.parent / "tokenizer_config.json"
        if cfg_file.is_file():
            try:
                max_len = int(json.loads(cfg_file.read_text()).get("model_max_length", max_len))
            except (ValueError, TypeError) as e:
                raise ValueError(f"{cfg_file}: invalid JSON or model_max_length: {e}") from e
        return cls(backend, model_max_length=max_len)

    def save(self, path) -> None:
        """Write tokenizer.json + tokenizer_config.json (loadable by transformers)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(path / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "model_max_length": self.model_max_length,
            "clean_up_tokenization_spaces": False,
            "add_bos_token": False,
            "add_eos_token": False,
            "chat_template": CHAT_TEMPLATE,
        }
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    # ------------------------------------------------------------ text <-> ids
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of the added tokens (chat, think, FIM, tool-call tags): never a piece of text."""
        return frozenset(self._tok.get_added_tokens_decoder())

    def encode(self, text: str, add_bos: bool = False, allow_special: bool = True) -> list[int]:
        """Text to ids. ``allow_special=False`` encodes a literal "<|eos|>" in the
        text as plain bytes: use it for raw corpora, where such a string is data
        and must not forge a document boundary or a chat turn."""
        return self.encode_batch([text], add_bos, allow_special)[0]

    def encode_batch(self, texts, add_bos: bool = False, allow_special: bool = True) -> list[list[int]]:
        backend = self._tok if allow_special else self._plain_backend()
        out = [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]
        return [[self.bos_id] + ids for ids in out] if add_bos else out

    def _plain_backend(self) -> _HFTokenizer:
        # A second backend with the flag set, rather than toggling the shared
        # one, so that concurrent callers (the API server) never race.
        if self._plain is None:
            self._plain = _HFTokenizer.from_str(self._tok.to_str())
            self._plain.encode_special_tokens = True
        return self._plain

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        # Special tokens decode to their literal text ("<|eos|>"), so a decoded
        # chat reads like the template.
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    # -------------------------------------------------------------------- FIM
    def fim_prompt(self, prefix: str, suffix: str, spm: bool = False, add_bos: bool = False) -> list[int]:
        """The ids that ask for the middle between ``prefix`` and ``suffix`` (PSM, or SPM with
        ``spm``); a training document is these ids followed by the middle's. The texts are
        plain text: a FIM or chat tag typed into them is those characters."""
        if self.fim_ids is None:
            raise ValueError(f"this tokenizer has no FIM tokens ({', '.join(FIM_TOKENS)}): fill-in-the-middle "
                             "needs a tokenizer trained with them (`nanoseek tokenizer train`) and a model "
                             "trained on FIM data")
        begin, hole, end = self.fim_ids
        pre, suf = self.encode_batch([prefix, suffix], allow_special=False)
        ids = [begin, hole, *suf, end, *pre] if spm else [begin, *pre, hole, *suf, end]
        return [self.bos_id, *ids] if add_bos else ids

    # ------------------------------------------------------------------- chat
    def _chat_segments(self, messages, add_generation_prompt, think, tools=None):
        """Yield (piece, is_assistant, is_control): the template's control tokens one by one,
        and the text between them (message text plus the template's own newlines).

        Only the template emits control ids: a message's text is encoded as plain text, so a
        user who types "<|assistant|>" or "<think>" gets those characters, not a forged turn or
        a fake reasoning trace (as DeepSeek's and transformers' templates treat message text).
        Because HF tokenizers split on special tokens before BPE, the text runs between the
        control tokens are exactly the runs the joined text would be encoded in: for text free
        of special-token strings the ids equal apply_chat_template's.
        """
        messages = list(messages)
        if (tools or any(isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls")) for m in messages)) \
                and self.tool_ids is None:
            raise ValueError(f"this tokenizer has no tool-call tokens ({TOOL_CALLS_BEGIN}, …): tools need a "
                             "tokenizer trained with them (`nanoseek tokenizer train`)")
        yield BOS, False, True
        if tools:
            yield SYSTEM, False, True
            yield tools_text(tools), False, False
        for i, m in enumerate(messages):
            role = m.get("role") if isinstance(m, dict) else None
            if role == "system":
                yield SYSTEM, False, True
                yield _content(m), False, False
            elif role == "user":
                yield USER, False, True
                yield _content(m), False, False
            elif role == "assistant":
                yield ASSISTANT, False, True
                reasoning, body = _reasoning(m), _content(m)
                if reasoning is not None:
                    yield THINK, True, True
                    yield f"\n{reasoning}\n", True, False
                    yield END_THINK, True, True
                    body = "\n" + body
                yield body, True, False
                if m.get("tool_calls"):
                    yield TOOL_CALLS_BEGIN, True, True
                    for j, call in enumerate(m["tool_calls"]):
                        if j:
                            yield "\n", True, False
                        yield TOOL_CALL_BEGIN, True, True
                        yield call.get("type", "function"), True, False
                        yield TOOL_SEP, True, True
                        yield tool_call_text(call), True, False
                        yield TOOL_CALL_END, True, True
                    yield TOOL_CALLS_END, True, True
                yield EOS, True, True
            elif role == "tool":
                first = i == 0 or messages[i - 1].get("role") != "tool"
                yield (TOOL_OUTPUTS_BEGIN, False, True) if first else ("\n", False, False)
                yield TOOL_OUTPUT_BEGIN, False, True
                yield _content(m), False, False
                yield TOOL_OUTPUT_END, False, True
                if i == len(messages) - 1 or messages[i + 1].get("role") != "tool":
                    yield TOOL_OUTPUTS_END, False, True
            else:
                raise ValueError(f"unknown chat role {role!r} in message {m!r} (expected system/user/assistant/tool)")
        if add_generation_prompt:
            yield ASSISTANT, False, True
            if think:
                yield THINK, False, True
                yield "\n", False, False

    def render_chat_text(self, messages, add_generation_prompt: bool = False, think: bool = False,
                         tools: list[dict] | None = None) -> str:
        return "".join(t for t, _, _ in self._chat_segments(messages, add_generation_prompt, think, tools))

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False,
                    think: bool = False, tools: list[dict] | None = None) -> tuple[list[int], list[int]]:
        """Return (ids, loss_mask): mask is 1 exactly on assistant-written tokens.

        That is the assistant content, its think trace, its tool calls and its closing <|eos|>
        (so the model learns to stop); the <|assistant|> tag itself, system, user and tool turns
        and the generation prompt are 0. Message text is plain text: only the template emits
        control ids. ``tools`` (OpenAI's entries) are listed in a system turn after <|bos|>.
        """
        ids: list[int] = []
        mask: list[int] = []
        for text, trained, control in self._chat_segments(messages, add_generation_prompt, think, tools):
            if control:
                piece = [self._tok.token_to_id(text)]
            elif text:
                piece = self.encode(text, allow_special=False)
            else:
                continue
            ids += piece
            mask += [int(trained)] * len(piece)
        return ids, mask


# ------------------------------------------------------------------ command
@dataclass
class TokenizerTrainConfig:
    """`nanoseek tokenizer train`: learn a BPE vocabulary from a data spec."""

    data: str = field(metadata={"help": "a .txt/.jsonl/.parquet file, a folder, a glob or builtin:NAME[?n=&seed=]"})
    out: str = field(metadata={"help": "directory to write tokenizer.json + tokenizer_config.json"})
    vocab_size: int = field(default=4096, metadata={"help": "vocabulary size at most (special tokens and bytes "
                                                    "included); a small corpus may yield fewer merges"})
    max_docs: int | None = field(default=None, metadata={"help": "train on the first N documents only"})
    text_field: str = field(default="text", metadata={"help": "jsonl/parquet column holding the text"})

    def __post_init__(self) -> None:
        """Bad values are one line naming the flag, before any document is read."""
        floor = len(SPECIAL_TOKENS) + len(EXTRA_TOKENS) + N_BYTES
        if self.vocab_size < floor:
            raise ValueError(f"--vocab-size {self.vocab_size}: must be ≥ {floor} (byte-level BPE: "
                             f"{len(SPECIAL_TOKENS) + len(EXTRA_TOKENS)} special tokens + {N_BYTES} bytes)")
        if self.max_docs is not None and self.max_docs < 1:
            raise ValueError(f"--max-docs {self.max_docs}: must be ≥ 1")
        if not self.text_field:
            raise ValueError("--text-field: must be a non-empty column name")
        if Path(self.out).is_file():
            raise FileExistsError(f"--out {self.out}: is a file; the tokenizer is written into a directory")


def train_tokenizer(cfg: TokenizerTrainConfig) -> Tokenizer:
    """Stream documents from ``cfg.data``, train, save to ``cfg.out``."""
    from itertools import islice

    from nanoseek.data.sources import iter_documents

    docs = iter_documents(cfg.data, text_field=cfg.text_field)
    if cfg.max_docs is not None:
        docs = islice(docs, cfg.max_docs)
    tok = Tokenizer.train(docs, cfg.vocab_size)
    tmp = Path(f"{cfg.out}.tmp-{os.getpid()}")
    tok.save(tmp)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # atomic per file
        os.replace(tmp / name, out / name)
    tmp.rmdir()
    return tok
