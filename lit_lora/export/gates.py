"""The parity gate of an export: does the file answer like the trained model?

The reference is what a user loads as "the model": the stored base with the adapter merged in float32
(:mod:`lit_lora.models.merging`, as ``merge`` computes it). Two readers lit-lora did not write read the
export back: transformers' GGUF loader (``format=gguf``) and gguf's reader (``format=gguf-lora``).

- **Logits**: the largest |difference| over every position of ``logit_rows`` held-out conversations,
  bounded per output type (:data:`LOGIT_BOUNDS`), and the share of positions whose top-1 token agrees.
- **Answers**: greedy answers of the export and of the reference on ``gate_rows`` rows. Greedy decoding
  amplifies any rounding where the reference itself hesitates: when the two best next tokens are nearly
  tied, a rounding of either side flips the choice and the rest of the answer follows. So an answer that
  differs counts against the export only where the reference's top-1 / top-2 logit margin at the first
  differing token exceeds :data:`MARGIN_BOUNDS` (a *decided* difference); a smaller margin is a near-tie,
  reported with its margin but not failed. How the bounds were measured: README, "The parity gate".
- **Exact match** of the export's answers against the references may not fall more than
  :data:`ANSWER_BOUNDS` points below the reference's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from lit_lora.data.rendering import prompt_ids
from lit_lora.inference.scoring import greedy_answer_tokens

# Largest |logit difference| between the export read back by transformers and the float32 reference,
# over every position of the logit rows. f32 is the same numbers; the others were measured on the
# embedded model (README) and given headroom.
LOGIT_BOUNDS = {
    "f32": 1e-4,
    "f16": 0.25,  # measured 0.051 (make-train adapter), 0.067 (a 20-step adapter)
    "bf16": 1.5,  # measured 0.47
    "q8_0": 4.0,  # measured 1.98
    "q5_1": 8.0,
    "q5_0": 8.0,
    "q4_1": 8.0,  # measured 33 (the gate fails: see NARROW_HINT)
    "q4_0": 8.0,  # measured 27
}
# The reference's top-1 / top-2 logit margin above which a differing greedy answer is a decided
# difference (a failure) rather than a near-tie. A rounding error of at most e per logit can swap two
# tokens only when their margin is below 2e, so each bound is twice the output type's logit bound: a
# difference above it cannot come from rounding within the bound, only from a wrong export.
MARGIN_BOUNDS = {outtype: 2 * bound for outtype, bound in LOGIT_BOUNDS.items()}
# The most decided differences (% of the gate's rows) and exact-match points an export may lose.
ANSWER_BOUNDS = {
    "f32": (0.0, 2.0),
    "f16": (2.0, 2.0),
    "bf16": (5.0, 5.0),
    "q8_0": (5.0, 3.0),
    "q5_1": (20.0, 10.0),
    "q5_0": (20.0, 10.0),
    "q4_1": (30.0, 15.0),
    "q4_0": (30.0, 15.0),
}


@dataclass(frozen=True)
class Divergence:
    """Where the export's greedy answer to gate row ``row`` first leaves the reference's."""

    row: int
    position: int  # index of the first differing answer token
    margin: float  # the reference's top-1 minus top-2 logit there
    reference: str  # the token the reference chose there
    export: str  # and the export's

    def decided(self, bound: float) -> bool:
        return self.margin > bound


@torch.no_grad()
def divergences(
    reference, tokenizer, prompts: list[list[int]], expected: list[list[int]], got: list[list[int]]
) -> list[Divergence]:
    """One :class:`Divergence` per row whose answers differ: the first differing token and the
    reference's top-1 / top-2 margin after the common prefix (computed alone, without padding)."""
    found = []
    for row, (prompt, ours, theirs) in enumerate(zip(prompts, expected, got, strict=True)):
        if ours == theirs:
            continue
        k = next(
            (i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
            min(len(ours), len(theirs)),
        )
        logits = reference(input_ids=torch.tensor([prompt + ours[:k]])).logits[0, -1].float()
        top = torch.topk(logits, 2).values
        found.append(
            Divergence(
                row=row,
                position=k,
                margin=round(float(top[0] - top[1]), 5),
                reference=tokenizer.decode(ours[k : k + 1]),
                export=tokenizer.decode(theirs[k : k + 1]),
            )
        )
    return found


def answer_check(
    reference,
    exported,
    tokenizer,
    rendering,
    conversations: list,
    outtype: str,
    max_new_tokens: int,
    batch_size: int,
) -> dict:
    """Greedy answers of ``exported`` against the float32 ``reference`` (both read with ``tokenizer``):
    the figures of the answer check (module docstring), with ``_texts`` (both answers as text)."""
    prompts = [prompt_ids(tokenizer, rendering, c) for c in conversations]
    args = (max_new_tokens, batch_size, tokenizer.pad_token_id, tokenizer.eos_token_id)
    expected = greedy_answer_tokens(reference, prompts, *args, desc="reference answers")
    got = greedy_answer_tokens(exported, prompts, *args, desc="export answers")
    found = divergences(reference, tokenizer, prompts, expected, got)
    bound = MARGIN_BOUNDS[outtype]
    decided = [d for d in found if d.decided(bound)]
    rows = len(prompts)
    return {
        "rows": rows,
        "answers_same_pct": share(rows - len(found), rows),
        "near_ties": len(found) - len(decided),
        "decided_differences": len(decided),
        "decided_differences_pct": share(len(decided), rows),
        "margin_bound": bound,
        "smallest_margins": [asdict(d) for d in sorted(found, key=lambda d: d.margin)[:5]],
        "largest_margin": max((d.margin for d in found), default=None),
        "decided_rows": [asdict(d) for d in decided],
        "_texts": (
            tokenizer.batch_decode(expected, skip_special_tokens=True),
            tokenizer.batch_decode(got, skip_special_tokens=True),
        ),
    }


def share(hits: int, total: int) -> float:
    return round(100.0 * hits / max(total, 1), 2)
