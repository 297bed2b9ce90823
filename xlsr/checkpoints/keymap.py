"""Renaming state-dict keys between a foreign layout and ours, both ways.

A key map is a list of ``(foreign, native)`` patterns where ``{n}`` stands for a layer number.
Our attention has one fused ``qkv_proj``; foreign formats have separate q/k/v projections: the maps rename those to
``...attention.{q,k,v}_proj`` and ``fuse_qkv`` / ``split_qkv`` join or split them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

KeyMap = Sequence[tuple[str, str]]


def _compile(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\{n\}", r"(\d+)") + "$")


def _substitute(template: str, numbers: Sequence[str]) -> str:
    for number in numbers:
        template = template.replace("{n}", number, 1)
    return template


def rename(state_dict: Mapping[str, torch.Tensor], key_map: KeyMap, *, reverse: bool = False) -> tuple[dict, list[str]]:
    """Apply ``key_map`` (foreign -> native, or native -> foreign with ``reverse``).

    Returns (renamed dict, keys no rule matched) — the caller decides whether unmatched keys are an error.
    """
    rules = [(_compile(dst if reverse else src), src if reverse else dst) for src, dst in key_map]
    out: dict[str, torch.Tensor] = {}
    unmatched: list[str] = []
    for key, value in state_dict.items():
        for pattern, template in rules:
            match = pattern.match(key)
            if match:
                out[_substitute(template, match.groups())] = value
                break
        else:
            unmatched.append(key)
    return out, unmatched


_QKV = re.compile(r"^(.*\.attention)\.([qkv])_proj\.(weight|bias)$")


def fuse_qkv(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Join ``X.attention.{q,k,v}_proj.{weight,bias}`` into ``X.attention.qkv_proj.{weight,bias}`` (order q, k, v)."""
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        match = _QKV.match(key)
        if match:
            prefix, which, kind = match.groups()
            groups.setdefault((prefix, kind), {})[which] = value
        else:
            out[key] = value
    for (prefix, kind), parts in groups.items():
        if set(parts) != {"q", "k", "v"}:
            missing = sorted({"q", "k", "v"} - set(parts))
            raise KeyError(f"{prefix}: missing {', '.join(f'{m}_proj.{kind}' for m in missing)}")
        out[f"{prefix}.qkv_proj.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def split_qkv(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``fuse_qkv``."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if ".attention.qkv_proj." in key:
            prefix, kind = key.rsplit(".qkv_proj.", 1)
            for which, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"{prefix}.{which}_proj.{kind}"] = part.contiguous()
        else:
            out[key] = value
    return out
