"""Batches: dynamic padding, length-grouped sampling and sequence packing.

An example is ``{"input_ids": [...], "labels": [...]}``. :func:`collate` right-pads a list of them to
the longest one. :func:`pack` fills rows of ``max_seq_len`` tokens with whole examples; a packed
example also carries ``position_ids`` that restart at 0 for each example it holds.

Packed batches carry ``position_ids`` and no ``attention_mask``: transformers then builds a
block-diagonal causal mask from the position resets (``masking_utils.find_packed_sequence_indices``),
so an example never attends to its neighbours. The first label of each packed example is masked:
unpacked, position 0 is never predicted, and packed it would be predicted from the previous
example's last token. The loss over a packed batch is therefore the same sum over the same tokens.

Every batch has ``token_mask`` (1 on real tokens, 0 on padding), used for throughput and the padding
fraction; it is not a model input.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from lit_lora.data.rendering import IGNORE_INDEX

MODEL_KEYS = ("input_ids", "attention_mask", "position_ids", "labels")


def collate(examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example of the batch. Keys (B, T): ``input_ids``, ``labels``,
    ``token_mask``, and ``attention_mask`` (plain) or ``position_ids`` (packed)."""
    packed = "position_ids" in examples[0]
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    # Padding of a packed row is its own segment (positions restart at 0) so real tokens never see it.
    positions = torch.arange(width).repeat(len(examples), 1)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
        if packed:
            positions[i, :n] = torch.tensor(e["position_ids"])
            positions[i, n:] = torch.arange(width - n)
    batch = {"input_ids": ids, "labels": labels, "token_mask": mask}
    if "step_tokens" in examples[0]:  # from StepBatchSampler: trained tokens of the optimizer step
        batch["step_tokens"] = torch.tensor(examples[0]["step_tokens"], dtype=torch.long)
    if packed:
        batch["position_ids"] = positions
    else:
        batch["attention_mask"] = mask
    return batch


# The key under which an example (and a pair batch) carries the reference's precomputed log-probs.
REF_LOGPS = "ref_logps"


def collate_pairs(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """A batch of B preference pairs as one (2B, T) batch for one forward: rows ``0..B-1`` are the chosen
    sides, rows ``B..2B-1`` the rejected ones in the same order, right-padded together by
    :func:`collate`; ``pairs`` holds B. ``step_tokens`` (if tagged) counts the pairs of the step.
    ``ref_logps`` (B, 2): the reference's chosen and rejected log-probs, when the examples carry them
    (``objective.precompute_ref``, :class:`lit_lora.training.reference.PrecomputedReference`)."""
    sides = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
    sides += [{"input_ids": e["rejected_input_ids"], "labels": e["rejected_labels"]} for e in examples]
    if "step_tokens" in examples[0]:
        sides[0]["step_tokens"] = examples[0]["step_tokens"]
    batch = collate(sides, pad_id)
    batch["pairs"] = torch.tensor(len(examples), dtype=torch.long)
    if REF_LOGPS in examples[0]:
        batch[REF_LOGPS] = torch.tensor([e[REF_LOGPS] for e in examples], dtype=torch.float32)
    return batch


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of token lists padded on the left, so that every row continues
    from its own last token (greedy answers, batched decoding, probes)."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """True when every row of a (B, T) 0/1 ``attention_mask`` is ones, then only zeros (or all ones)."""
    mask = attention_mask.bool()
    return bool(mask[:, 0].all() and (mask[:, 1:] <= mask[:, :-1]).all())


def pack(examples: list[dict[str, list[int]]], capacity: int) -> list[dict[str, list[int]]]:
    """Whole examples packed into rows of at most ``capacity`` tokens (first-fit decreasing).

    Deterministic for a given input order. Every example lands in exactly one row, unchanged except
    for its first label, which is masked (see the module docstring).
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = len(examples[i]["input_ids"])
        if n > capacity:
            raise ValueError(f"example of {n} tokens does not fit a packed row of {capacity}")
        slot = next((r for r, room in enumerate(free) if room >= n), None)
        if slot is None:
            rows.append([])
            free.append(capacity)
            slot = len(rows) - 1
        rows[slot].append(i)
        free[slot] -= n
    packed = []
    for members in rows:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for i in sorted(members):  # original order inside a row
            e = examples[i]
            ids += e["input_ids"]
            labels += [IGNORE_INDEX, *e["labels"][1:]]
            positions += range(len(e["input_ids"]))
        packed.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return packed


class EpochSampler(Sampler[int]):
    """Seeded training order, new each epoch, that can start part-way into an epoch (resume).

    The order of epoch ``e`` depends only on ``seed`` and ``e`` (a plain shuffle, or the length-grouped
    order of :class:`LengthGroupedSampler`), never on the global RNG, so a resumed run sees exactly the
    batches an uninterrupted run would. ``start_at(epoch, n)`` makes the next pass over that epoch skip
    its first ``n`` indices.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group_by_length: bool = False):
        self.lengths = lengths
        self.seed = seed
        self.grouped = LengthGroupedSampler(lengths, batch_size, seed) if group_by_length else None
        self.epoch = 0
        self._skip: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def start_at(self, epoch: int, n: int) -> None:
        self._skip = (epoch, n)

    def order(self, epoch: int) -> list[int]:
        if self.grouped is not None:
            self.grouped.set_epoch(epoch)
            return list(self.grouped)
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.lengths), generator=generator).tolist()

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        order = self.order(self.epoch)
        skip, self._skip = self._skip, None
        if skip is not None and skip[0] == self.epoch:
            order = order[skip[1] :]
        yield from order


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """This rank's micro-batches, cut along optimizer steps, each index tagged with its step's token count.

    An optimizer step takes the next ``micro * accum * world`` examples of the epoch order
    (:class:`EpochSampler`: seeded, optionally length-grouped); rank ``r`` gets micro-batch ``j`` of it
    from offset ``(j * world + r) * micro``. Every index comes as ``(index, step_tokens)``, the number
    of trained tokens in the whole step on all ranks, which the loss divides by (see
    :meth:`lit_lora.training.module.LitLoRA.training_step`): the step's gradient is then that of the mean over
    its trained tokens, whatever the split into micro-batches and ranks. Each rank computes every
    rank's share itself, so no communication is needed.

    A last step smaller than ``micro * accum * world`` is trained on one process and dropped on
    several (all ranks must run the same number of micro-batches). ``start_at(epoch, n)`` makes the
    next pass over that epoch skip its first ``n`` examples (whole steps; resume).
    """

    def __init__(
        self,
        order: EpochSampler,
        trained: list[int],
        micro: int,
        accum: int = 1,
        rank: int = 0,
        world: int = 1,
    ):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world size {world}")
        self.source = order
        self.trained = trained
        self.micro, self.accum, self.rank, self.world = micro, accum, rank, world
        self._skip: tuple[int, int] | None = None

    @property
    def step_size(self) -> int:
        """Examples per optimizer step, all ranks together."""
        return self.micro * self.accum * self.world

    @property
    def epoch(self) -> int:
        return self.source.epoch

    def set_epoch(self, epoch: int) -> None:
        self.source.set_epoch(epoch)

    def start_at(self, epoch: int, examples: int) -> None:
        self._skip = (epoch, examples)

    def steps(self, epoch: int) -> list[list[list[tuple[int, int]]]]:
        """Every optimizer step of ``epoch``: the list of this rank's tagged micro-batches."""
        order = self.source.order(epoch)
        size = self.step_size
        out = []
        for start in range(0, len(order), size):
            step = order[start : start + size]
            if len(step) < size and self.world > 1:
                break
            tokens = sum(self.trained[i] for i in step)
            mine = [
                [(i, tokens) for i in step[o : o + self.micro]]
                for o in range(self.rank * self.micro, len(step), self.micro * self.world)
            ]
            out.append(mine)
        return out

    def __len__(self) -> int:
        return sum(len(step) for step in self.steps(self.epoch))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        steps = self.steps(self.epoch)
        skip, self._skip = self._skip, None
        if skip is not None and skip[0] == self.epoch:
            steps = steps[skip[1] // self.step_size :]
        for step in steps:
            yield from step


class RolloutBatchSampler(StepBatchSampler):
    """GRPO's micro-batches of prompts (``data.format=prompt``): :class:`StepBatchSampler`'s cut along
    optimizer steps (``micro`` prompts per micro-batch, ``accum`` micro-batches, ``world`` ranks), each
    step's micro-batches given ``repeat`` times in a row (``objective.num_iterations``: the same rollouts
    train that many optimizer steps). A "round" is one step's micro-batches x ``repeat``.

    Every index is tagged ``(micro, iteration, round)``: the micro-batch's position in its step, which
    repetition this is, and this rank's prompt indices of the whole step, in micro-batch order. The
    rollouts of a round are decoded at its first micro-batch, all of them (the advantages' batch
    statistics and DAPO's token count span the whole step, as TRL's generation batch does).

    Resume counts micro-batches: ``start_at(epoch, examples, batches)`` skips the rounds before
    ``examples`` and then ``batches`` micro-batches of the next round (a checkpoint between two
    iterations of a round; the rollouts themselves come back from the checkpoint)."""

    def __init__(self, order: EpochSampler, micro: int, accum: int, rank: int, world: int, repeat: int):
        super().__init__(order, [1] * len(order), micro, accum, rank, world)
        self.repeat = repeat
        self._skip_batches = 0

    @property
    def batches_per_round(self) -> int:
        return self.accum * self.repeat

    def start_at(self, epoch: int, examples: int, batches: int = 0) -> None:
        super().start_at(epoch, examples)
        self._skip_batches = batches

    def rounds(self, epoch: int) -> list[list[list[tuple[int, tuple]]]]:
        """Every round of ``epoch``: its tagged micro-batches, repetitions included."""
        out = []
        for step in self.steps(epoch):
            indices = tuple(i for micro in step for i, _ in micro)
            out.append(
                [
                    [(i, (j, iteration, indices)) for i, _ in micro]
                    for iteration in range(self.repeat)
                    for j, micro in enumerate(step)
                ]
            )
        return out

    def __len__(self) -> int:
        return sum(len(r) for r in self.rounds(self.epoch))

    def __iter__(self) -> Iterator[list[tuple[int, tuple]]]:
        rounds = self.rounds(self.epoch)
        skip, self._skip = self._skip, None
        within, self._skip_batches = self._skip_batches, 0
        if skip is not None and skip[0] == self.epoch:
            rounds = rounds[skip[1] // self.step_size :]
            if rounds and within:
                rounds[0] = rounds[0][within:]
        for batches in rounds:
            yield from batches


def collate_prompts(examples: list[dict]) -> dict:
    """A micro-batch of prompts from :class:`RolloutBatchSampler`: ``micro`` and ``iteration`` (ints) and
    ``round`` (int64, this rank's prompt indices of the whole optimizer step); the prompts' tokens and
    rows are read from the data module by index."""
    micro, iteration, indices = examples[0]["step_tokens"]
    return {
        "prompt_index": torch.tensor([e["index"] for e in examples], dtype=torch.long),
        "round": torch.tensor(indices, dtype=torch.long),
        "micro": micro,
        "iteration": iteration,
    }


class TaggedExamples(torch.utils.data.Dataset):
    """``examples`` indexed by :class:`StepBatchSampler`'s ``(index, step_tokens)`` pairs."""

    def __init__(self, examples: list[dict[str, list[int]]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, step_tokens = key
        return {**self.examples[index], "step_tokens": step_tokens}


class ResumableLoader(DataLoader):
    """A training DataLoader that Lightning saves and restores with the checkpoint (its data position).

    ``position`` returns how many batches of the current epoch this rank's training loop has consumed
    (Lightning prefetches a batch, so counting what this loader yielded would be one too many).
    Lightning calls :meth:`state_dict` when it writes a checkpoint and :meth:`load_state_dict` before
    iterating again on resume; the next pass then starts with the first unseen optimizer step. The
    position is saved in examples of the epoch order, so it means the same under another world size
    or micro-batch size (with the same examples per optimizer step).
    """

    def __init__(self, examples, sampler: StepBatchSampler, position: Callable[[], int], **kwargs):
        # Own generator: creating an iterator must not draw from the global RNG (dropout's stream).
        super().__init__(
            TaggedExamples(examples),
            batch_sampler=sampler,
            generator=torch.Generator().manual_seed(sampler.source.seed),
            **kwargs,
        )
        self.position = position

    def state_dict(self) -> dict[str, int]:
        sampler = self.batch_sampler
        batches = int(self.position())
        per_step = getattr(sampler, "batches_per_round", sampler.accum)
        steps = batches // per_step
        state = {"epoch": sampler.epoch, "batches": batches, "examples": steps * sampler.step_size}
        if isinstance(sampler, RolloutBatchSampler):
            state["round_batches"] = batches % per_step  # between two iterations of a round
        return state

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler = self.batch_sampler
        sampler.set_epoch(state["epoch"])
        examples = state.get("examples", state["batches"] * sampler.micro)
        if isinstance(sampler, RolloutBatchSampler):
            sampler.start_at(state["epoch"], examples, state.get("round_batches", 0))
        else:
            sampler.start_at(state["epoch"], examples)


class LengthGroupedSampler(Sampler[int]):
    """Random order in which neighbours have similar lengths, so that batches carry little padding.

    Indices are shuffled, cut into mega-batches of ``batch_size * group`` and each is sorted by length,
    longest first; the order changes each epoch (``set_epoch``, called by Lightning) and is
    deterministic for a seed.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group: int = 50):
        self.lengths = lengths
        self.chunk = batch_size * group
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        order = list(range(len(self.lengths)))
        random.Random(self.seed + self.epoch).shuffle(order)
        for start in range(0, len(order), self.chunk):
            yield from sorted(order[start : start + self.chunk], key=lambda i: -self.lengths[i])


def padding_fraction(examples: list[dict[str, list[int]]], batch_size: int) -> float:
    """Share of padded positions when ``examples`` are batched in this order by :func:`collate`."""
    cells = real = 0
    for start in range(0, len(examples), batch_size):
        lengths = [len(e["input_ids"]) for e in examples[start : start + batch_size]]
        cells += max(lengths) * len(lengths)
        real += sum(lengths)
    return 0.0 if cells == 0 else 1 - real / cells
