"""Top-p (nucleus) sampling for vLLM on CPU without sorting the vocabulary.

vLLM's CPU sampler applies top-p by sorting every row of the logits (`apply_top_k_top_p_pytorch`): for a batch
of 144 sequences over SmolLM2's 49,152-token vocabulary that sort takes ~0.35 s per decoding step on two AVX2
cores, 30% of `curate generate`'s time (py-spy, demo round). The nucleus only needs the few hundred most
likely tokens: `nucleus_mask` takes the top `candidates` probabilities (a partial selection, ~6× cheaper than
the sort), finds the cut inside them, and sorts in full only the rare rows whose nucleus is larger.

`NucleusLogitsProcessor` plugs it into vLLM through its public logits-processor interface
(`LLM(logits_processors=[...])`, per-request settings in `SamplingParams.extra_args["top_p"]`, vLLM's own
`top_p` left at 1). It is argmax-invariant, so vLLM applies it where it applies its own top-p: to the
temperature-scaled logits, just before sampling; log-probs are read from the raw logits before either. The
kept set is the same as vLLM's (the smallest set of most likely tokens whose mass reaches p, at least one
token) up to float rounding of the cumulative sums at the boundary; tokens tied with the last kept one are all
kept.

Imported only by `VLLMBackend` when the engine starts (this module imports vLLM).
"""

from __future__ import annotations

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

CANDIDATES = 1024  # probabilities examined before falling back to a full sort of the row


def nucleus_mask(logits: torch.Tensor, top_p: torch.Tensor, candidates: int = CANDIDATES) -> torch.Tensor:
    """`logits` (rows × vocabulary) with every token outside each row's top-`top_p` nucleus set to -inf.

    A row keeps its tokens in order of probability while the mass of the more likely ones is below p (so at
    least the most likely token); `top_p` has one value per row, in (0, 1].
    """
    probs = logits.softmax(dim=-1, dtype=torch.float32)
    k = min(candidates, probs.shape[-1])
    top = probs.topk(k, dim=-1, sorted=True).values
    before = top.double().cumsum(dim=-1) - top  # mass of the strictly more likely candidates
    keep = (before < top_p.unsqueeze(1)) | (top_p >= 1).unsqueeze(1)
    kept = keep.sum(dim=-1)
    inside = ~keep[:, -1] if k < probs.shape[-1] else torch.ones_like(kept, dtype=torch.bool)
    threshold = top.gather(1, (kept - 1).clamp(min=0).unsqueeze(1))
    out = logits.masked_fill(probs < threshold, float("-inf"))
    if not bool(inside.all()):  # the nucleus reaches past the candidates: these rows are sorted in full
        rows = (~inside).nonzero().squeeze(1)
        out[rows] = nucleus_mask(logits[rows], top_p[rows], candidates=probs.shape[-1])
    return out


def request_top_p(params: SamplingParams) -> float | None:
    """The request's nucleus size (`extra_args["top_p"]`), None when it samples from the whole vocabulary."""
    value = (params.extra_args or {}).get("top_p")
    return None if value is None or value >= 1.0 else float(value)


class NucleusLogitsProcessor(LogitsProcessor):
    """vLLM logits processor: `nucleus_mask` for the requests whose `extra_args` carry `top_p` < 1."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.top_p: dict[int, float] = {}  # persistent-batch row → the request's p

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        value = (sampling_params.extra_args or {}).get("top_p")
        if value is not None and not (isinstance(value, (int, float)) and 0 < value <= 1):
            raise ValueError(f"extra_args['top_p'] must be a number in (0, 1], got {value!r}")

    def is_argmax_invariant(self) -> bool:
        return True  # the most likely token is always kept

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.top_p, batch_update, lambda params, _prompt, _output: request_top_p(params))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.top_p:
            return logits
        rows = sorted(self.top_p)
        p = torch.tensor([self.top_p[r] for r in rows], dtype=torch.float32, device=logits.device)
        if len(rows) == logits.shape[0] and rows[-1] == len(rows) - 1:  # every row of the batch
            return nucleus_mask(logits, p)
        index = torch.tensor(rows, dtype=torch.long, device=logits.device)
        logits[index] = nucleus_mask(logits[index], p)
        return logits
