"""Gumbel-softmax product quantizer: G codebooks of V entries; a frame picks one entry per group."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class QuantizerOutput:
    """Result of quantizing N frames."""

    quantized: torch.Tensor  # (N, codebook_dim) concatenation of the chosen entry of each group
    targets: torch.Tensor  # (N, G) int64 index of the chosen entry within each group (argmax of the logits)
    prob_perplexity: torch.Tensor  # () fp32, perplexity of the mean soft distribution, summed over groups
    code_perplexity: torch.Tensor  # () fp32, perplexity of the mean hard (one-hot) distribution, summed over groups
    num_vars: int  # G * V
    temperature: float


def perplexity(probs: torch.Tensor) -> torch.Tensor:
    """probs (N, G, V) -> sum over groups of exp(entropy of the mean distribution), as fairseq (+1e-7 in the log)."""
    mean = probs.mean(dim=0)
    return torch.exp(-torch.sum(mean * torch.log(mean + 1e-7), dim=-1)).sum()


class GumbelVectorQuantizer(nn.Module):
    """Product quantizer with a straight-through hard Gumbel-softmax (training) or argmax (eval).

    forward(x (N, C_in)) -> QuantizerOutput with quantized (N, codebook_dim).
    The temperature decays per update: max(max_temp * decay**updates, min_temp) (``set_num_updates``).
    """

    def __init__(self, input_dim: int, num_vars: int, groups: int, codebook_dim: int, temp: tuple[float, float, float]):
        super().__init__()
        if codebook_dim % groups:
            raise ValueError(f"codebook_dim {codebook_dim} must be divisible by groups {groups}")
        self.num_vars = num_vars
        self.groups = groups
        self.codebook = nn.Parameter(torch.empty(1, groups * num_vars, codebook_dim // groups).uniform_())
        self.weight_proj = nn.Linear(input_dim, groups * num_vars)
        nn.init.normal_(self.weight_proj.weight, mean=0.0, std=1.0)
        nn.init.zeros_(self.weight_proj.bias)
        self.max_temp, self.min_temp, self.temp_decay = (float(t) for t in temp)
        self.curr_temp = self.max_temp

    def set_num_updates(self, num_updates: int) -> None:
        self.curr_temp = max(self.max_temp * self.temp_decay**num_updates, self.min_temp)

    def forward(self, x: torch.Tensor) -> QuantizerOutput:
        frames = x.shape[0]
        logits = self.weight_proj(x).view(frames, self.groups, self.num_vars)
        targets = logits.argmax(dim=-1)  # (N, G)
        with torch.no_grad():
            hard = F.one_hot(targets, self.num_vars).float()
            code_perplexity = perplexity(hard)
        prob_perplexity = perplexity(torch.softmax(logits.float(), dim=-1))

        codebook = self.codebook.view(self.groups, self.num_vars, -1)  # (G, V, d)
        if self.training:
            weights = F.gumbel_softmax(logits.float(), tau=self.curr_temp, hard=True).type_as(logits)
            # (N, G, V) x (G, V, d) -> (N, G, d): straight-through gradient reaches the codebook and weight_proj
            quantized = torch.einsum("ngv,gvd->ngd", weights, codebook.to(weights.dtype))
        else:
            group_offsets = torch.arange(self.groups, device=x.device) * self.num_vars
            quantized = self.codebook[0][targets + group_offsets]  # (N, G, d): exact entries
        return QuantizerOutput(
            quantized=quantized.reshape(frames, -1),
            targets=targets,
            prob_perplexity=prob_perplexity,
            code_perplexity=code_perplexity,
            num_vars=self.num_vars * self.groups,
            temperature=self.curr_temp,
        )

    def sample_codevectors(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``count`` random codebook combinations (one entry per group) -> (count, codebook_dim)."""
        picks = torch.randint(0, self.num_vars, (count, self.groups), generator=generator).to(self.codebook.device)
        picks = picks + torch.arange(self.groups, device=picks.device) * self.num_vars
        return self.codebook[0][picks].reshape(count, -1)
