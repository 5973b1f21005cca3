"""Reading quantized checkpoint directories: config.json's `quantization_config` → a codec.

checkpoint.load_pretrained builds the directory's `Codec` and sees, through it, the
float tensors the model is built from: `headers` rewrites the safetensors headers into those
tensors (an fp8 or packed weight and its scales become one float32 matrix), `read` decodes one.
`kernel` is what the engine packs its matrices into (int8/int4 directories) or None.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import fp8, quant

COMPANIONS = (".weight_scale_inv", ".weight_scale", ".weight_zero_point", ".weight_shape")


def quantization_config(path: Path) -> dict | None:
    """config.json's quantization_config, or None."""
    try:
        qc = json.loads((path / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None  # ModelConfig.load reports a bad config.json
    return qc or None


class Codec:
    """fp8 (DeepSeek's block layout) or compressed-tensors pack-quantized; anything else is refused
    in one line naming config.json."""

    def __init__(self, qc: dict, where: Path):
        method = qc.get("quant_method")
        if method == "fp8":
            if qc.get("fmt", "e4m3") != "e4m3" or len(qc.get("weight_block_size") or [0, 0]) != 2:
                raise ValueError(f"{where / 'config.json'}: quantization_config {qc}: nanoseek reads fp8 e4m3 "
                                 "with a 2-D weight_block_size")
            self.decode, self.kernel = fp8.decode, None
        elif method == quant.QUANT_METHOD:
            if qc.get("format") != quant.FORMAT:
                raise ValueError(f"{where / 'config.json'}: compressed-tensors format {qc.get('format')!r}: "
                                 f"nanoseek reads {quant.FORMAT!r}")
            quant.schemes(qc)
            self.decode, self.kernel = quant.decode, quant.kernel_spec(qc)
        else:
            raise ValueError(f"{where / 'config.json'}: quantization_config.quant_method {method!r}: nanoseek "
                             f"reads fp8 and {quant.QUANT_METHOD}")
        self.qc, self.where = qc, where

    def headers(self, raw: dict, get) -> dict:
        """Raw headers {key: (file, shape, dtype)} → the float tensors they stand for."""
        out = {}
        for key, (f, shape, dt) in raw.items():
            if key.endswith(COMPANIONS):
                continue
            if key.endswith(".weight_packed"):
                key = key.removesuffix("_packed")
                shape, dt = tuple(int(s) for s in self._get(get, key, key + "_shape").tolist()), "F32"
            elif dt.startswith("F8"):
                dt = "F32"
            out[key] = (f, shape, dt)
        return out

    def read(self, key: str, get):
        return self.decode(key, lambda k: self._get(get, key, k), self.qc)

    def _get(self, get, key: str, part: str):
        try:
            return get(part)
        except KeyError:
            if part == key or part.endswith("_packed"):
                raise  # quant.decode falls back to a plain weight
            raise ValueError(f"{self.where}: {key!r} is quantized but no weight file holds its {part!r}") from None
