"""GRPO inside the training loop: rounds of rollouts, rewards and advantages, and each micro-batch's loss.

A round is one optimizer step's prompts on this rank (:class:`lit_lora.data.batching.RolloutBatchSampler`),
trained ``objective.num_iterations`` times. At its first micro-batch, :meth:`GRPOStep.start_round`:

1. decodes ``G`` completions per prompt with the rollout engine (:mod:`lit_lora.inference.rollouts`) on
   the training weights, seeded from the run seed, the step and the prompt;
2. scores them with every reward function (:mod:`lit_lora.rewards`) and forms the group advantages
   (:func:`lit_lora.training.grpo.group_advantages`; ``scale_rewards=batch`` over every rank's round);
3. computes, without gradients, the old policy's log-probs (only when ``num_iterations > 1``: with one
   iteration the old policy is the current one, detached) and the reference's (only when ``beta > 0``:
   the adapter off), on completion tokens only (:mod:`lit_lora.training.completions`).

:meth:`GRPOStep.loss` then computes micro-batch ``j``'s policy log-probs with gradients and the loss of
``objective.loss_type``. The round (token ids, advantages, log-probs) is plain data, saved in checkpoints
(:meth:`state_dict`), so a run resumed between two iterations of a round trains on the same rollouts.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lit_lora.config.schema import ObjectiveConfig
from lit_lora.data.rows import Row
from lit_lora.inference.decoding import eval_mode
from lit_lora.inference.rollouts import Completion, LocalRollouts, group_seed
from lit_lora.rewards.calling import score_rows
from lit_lora.rewards.held_out import reward_scores
from lit_lora.rewards.loading import RewardFunction
from lit_lora.training.completions import completion_batch, completion_logps
from lit_lora.training.grpo import group_advantages, grpo_loss, masked_mean
from lit_lora.training.reference import reference_model

COMPLETIONS_FILE = "completions.jsonl"  # in the run folder: a sample of each logged round


@dataclass
class Round:
    """One round's rollouts on this rank, groups adjacent (``len(prompts) * G`` completions)."""

    step: int  # the optimizer step (global_step) the round started at
    prompt_index: list[int]  # the round's prompts (indices into the training split)
    completions: list[list[int]]
    truncated: list[bool]
    advantages: torch.Tensor  # (N,)
    rewards: torch.Tensor  # (N,) weighted sum, NaN where every reward said None
    rewards_per_func: torch.Tensor  # (N, K)
    old_logps: list[torch.Tensor] | None = None  # per micro-batch (rows, Lc)
    ref_logps: list[torch.Tensor] | None = None
    dapo_tokens: float = 1.0  # completion tokens of the round on every rank / (world * accum)
    metrics: dict[str, float] = field(default_factory=dict)  # all ranks, logged at each step of the round

    def state(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


class GRPOStep:
    """GRPO's per-round and per-micro-batch work for :class:`lit_lora.training.module.LitLoRA`."""

    def __init__(
        self,
        cfg: ObjectiveConfig,
        rewards: list[RewardFunction],
        *,
        tokenizer,
        seed: int,
        chunked: bool,
        run_dir: Path | None = None,
        engine=None,
    ):
        self.cfg = cfg
        self.rewards = rewards
        self.weights = torch.tensor([r.weight for r in rewards], dtype=torch.float32)
        self.tokenizer = tokenizer
        self.seed = seed
        self.chunked = chunked
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.engine = engine or LocalRollouts(
            max_new_tokens=cfg.max_completion_length,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            pad_id=self.pad_id,
            eos_id=tokenizer.eos_token_id,
        )
        self.round: Round | None = None
        self._sums: dict[str, torch.Tensor] = {}  # per-token figures of the running optimizer step
        self.seconds = {"rollout": 0.0, "logps": 0.0, "update": 0.0}  # time split (bench, summary)

    # ---------------------------------------------------------------------------------------- rounds
    def start_round(self, module, batch: dict, prompts: list[list[int]], rows: list[Row]) -> Round:
        """Rollouts, rewards, advantages and the no-gradient log-probs of the round whose first
        micro-batch is ``batch`` (see the module docstring); ``prompts`` / ``rows`` are the round's."""
        cfg, g = self.cfg, self.cfg.num_generations
        indices = batch["round"].tolist()
        step = module.global_step
        started = time.perf_counter()
        seeds = [group_seed(self.seed, step, i) for i in indices]
        done: list[Completion] = self.engine.rollout(module.model, prompts, g, seeds)
        self.seconds["rollout"] += time.perf_counter() - started
        tokens = [c.tokens if c.tokens else [self.tokenizer.eos_token_id] for c in done]
        texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        expanded = [row for row in rows for _ in range(g)]
        per_func = score_rows(self.rewards, expanded, texts, tokens)
        strategy = module.trainer.strategy
        world = module.trainer.world_size
        if cfg.scale_rewards == "batch" and world > 1:
            # The batch's deviation spans every rank's round: gather, compute, keep this rank's part.
            gathered = strategy.all_gather(per_func.to(module.device)).cpu()  # (world, N, K)
            adv = group_advantages(gathered.reshape(-1, per_func.shape[1]), self.weights, g, "batch")
            mine = slice(module.global_rank * len(tokens), (module.global_rank + 1) * len(tokens))
            advantages, std_zero = adv.advantages[mine], adv.std_zero[mine]
            rewards = adv.rewards[mine]
        else:
            adv = group_advantages(per_func, self.weights, g, cfg.scale_rewards)
            advantages, std_zero, rewards = adv.advantages, adv.std_zero, adv.rewards
        truncated = [c.truncated for c in done]
        rnd = Round(step, indices, tokens, truncated, advantages, rewards, per_func)
        accum = module.trainer.accumulate_grad_batches
        masks = [
            0 if (cfg.mask_truncated_completions and t) else len(c)
            for c, t in zip(tokens, truncated, strict=True)
        ]
        total = strategy.reduce(torch.tensor(float(sum(masks)), device=module.device), reduce_op="sum")
        rnd.dapo_tokens = max(float(total), 1.0) / (world * accum)
        started = time.perf_counter()
        if cfg.num_iterations > 1 or cfg.beta > 0:
            self._no_grad_logps(module, rnd, prompts)
        self.seconds["logps"] += time.perf_counter() - started
        rnd.metrics = self._round_metrics(module, rnd, std_zero)
        self.round = rnd
        every = cfg.log_completions_every
        if every and module.trainer.is_global_zero and self.run_dir is not None and step % every == 0:
            self._write_sample(module, rnd, expanded, texts)
        return rnd

    def _micro_slices(self, module, n: int) -> list[slice]:
        """The completions of each micro-batch of a round of ``n`` completions."""
        accum = module.trainer.accumulate_grad_batches
        size = n // accum
        return [slice(j * size, (j + 1) * size) for j in range(accum)]

    @torch.no_grad()
    def _no_grad_logps(self, module, rnd: Round, prompts: list[list[int]]) -> None:
        """The old policy's log-probs (dropout off: the policy that sampled) and the reference's, per
        micro-batch, in the precision plugin's forward context (the autocast the steps run under)."""
        g = self.cfg.num_generations
        old, ref = [], []
        with module.trainer.precision_plugin.forward_context():
            for part in self._micro_slices(module, len(rnd.completions)):
                batch = self._batch(module, rnd, prompts, part, g)
                if self.cfg.num_iterations > 1:
                    with eval_mode(module.model):
                        old.append(self._logps(module, batch)[0].cpu())
                if self.cfg.beta > 0:
                    with reference_model(module.model):
                        ref.append(self._logps(module, batch)[0].cpu())
        rnd.old_logps = old or None
        rnd.ref_logps = ref or None

    def _batch(self, module, rnd: Round, prompts: list[list[int]], part: slice, g: int) -> dict:
        rows = range(part.start, part.stop)
        return completion_batch(
            [prompts[i // g] for i in rows], [rnd.completions[i] for i in rows], self.pad_id, module.device
        )

    def _logps(self, module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return completion_logps(module.model, batch, chunked=self.chunked, temperature=self.cfg.temperature)

    # ---------------------------------------------------------------------------------------- loss
    def loss(self, module, batch: dict, prompts: list[list[int]]) -> torch.Tensor:
        """Micro-batch ``batch["micro"]``'s loss (see :func:`lit_lora.training.grpo.grpo_loss`)."""
        cfg, rnd = self.cfg, self.round
        j = int(batch["micro"])
        part = self._micro_slices(module, len(rnd.completions))[j]
        started = time.perf_counter()
        inputs = self._batch(module, rnd, prompts, part, cfg.num_generations)
        # For the throughput callback: tokens, completion tokens, prompts of this micro-batch.
        completion_tokens = sum(len(c) for c in rnd.completions[part])
        batch["token_counts"] = (
            int(inputs["attention_mask"].sum()),
            completion_tokens,
            (part.stop - part.start) // cfg.num_generations,
        )
        logps, mask = self._logps(module, inputs)
        if cfg.mask_truncated_completions:
            keep = torch.tensor([not t for t in rnd.truncated[part]], device=mask.device, dtype=mask.dtype)
            mask = mask * keep[:, None]
        device = logps.device
        out = grpo_loss(
            logps,
            mask,
            rnd.advantages[part].to(device, logps.dtype),
            loss_type=cfg.loss_type,
            old_logps=None if rnd.old_logps is None else rnd.old_logps[j].to(device),
            ref_logps=None if rnd.ref_logps is None else rnd.ref_logps[j].to(device),
            beta=cfg.beta,
            use_bias_correction_kl=cfg.use_bias_correction_kl,
            epsilon=cfg.epsilon,
            epsilon_high=cfg.epsilon_high,
            importance_sampling_level=cfg.importance_sampling_level,
            max_completion_length=cfg.max_completion_length,
            dapo_tokens=rnd.dapo_tokens,
        )
        region = torch.maximum(out.low_clipped, out.high_clipped)
        for name, value in (
            ("clip_ratio/low", out.low_clipped),
            ("clip_ratio/high", out.high_clipped),
            ("clip_ratio/region", region),
            ("kl", out.kl),
        ):
            if value is None:
                continue
            total, count = masked_mean(value, mask)
            self._add(name, total, count)
        self.seconds["update"] += time.perf_counter() - started
        return out.loss

    def _add(self, name: str, total: torch.Tensor, count: torch.Tensor) -> None:
        for key, value in ((f"{name}:sum", total), (f"{name}:count", count)):
            value = value.detach().float()
            self._sums[key] = value if key not in self._sums else self._sums[key] + value

    def step_metrics(self, module) -> dict[str, float]:
        """This optimizer step's metrics, all ranks (a collective): the round's and the token means."""
        sums = {k: v for k, v in self._sums.items() if not k.startswith("val:")}
        self._sums = {k: v for k, v in self._sums.items() if k.startswith("val:")}
        out = dict(self.round.metrics) if self.round is not None else {}
        if sums:
            keys = sorted(sums)
            stacked = module.trainer.strategy.reduce(torch.stack([sums[k] for k in keys]), reduce_op="sum")
            totals = dict(zip(keys, stacked.tolist(), strict=True))
            for key in keys:
                if key.endswith(":sum"):
                    name = key[: -len(":sum")]
                    out[f"train/{name}"] = totals[key] / max(totals[f"{name}:count"], 1.0)
        return out

    def _round_metrics(self, module, rnd: Round, std_zero: torch.Tensor) -> dict[str, float]:
        """Reward mean / std, per function, lengths, truncation and tied groups, over every rank."""
        strategy = module.trainer.strategy
        lengths = torch.tensor([float(len(c)) for c in rnd.completions])
        finite = ~torch.isnan(rnd.rewards)
        r = torch.nan_to_num(rnd.rewards, nan=0.0)
        per = rnd.rewards_per_func
        parts = [
            finite.float().sum(),
            (r * finite).sum(),
            (r * r * finite).sum(),
            lengths.sum(),
            torch.tensor(float(len(lengths))),
            torch.tensor(float(sum(rnd.truncated))),
            std_zero.float().sum(),
        ]
        for k in range(per.shape[1]):
            seen = ~torch.isnan(per[:, k])
            parts += [seen.float().sum(), torch.nan_to_num(per[:, k], nan=0.0).sum()]
        totals = strategy.reduce(torch.stack(parts).to(module.device), reduce_op="sum").cpu().tolist()
        lo = strategy.reduce(lengths.min().to(module.device), reduce_op="min") if lengths.numel() else 0
        hi = strategy.reduce(lengths.max().to(module.device), reduce_op="max") if lengths.numel() else 0
        n, s, ss, length_sum, count, trunc, tied = totals[:7]
        mean = s / max(n, 1.0)
        var = (ss - n * mean * mean) / (n - 1) if n > 1 else float("nan")
        out = {
            "train/reward": mean,
            "train/reward_std": math.sqrt(max(var, 0.0)) if not math.isnan(var) else float("nan"),
            "train/completion_length": length_sum / max(count, 1.0),
            "train/completion_length_min": float(lo),
            "train/completion_length_max": float(hi),
            "train/truncated_share": trunc / max(count, 1.0),
            "train/frac_reward_zero_std": tied / max(count, 1.0),
        }
        for k, fn in enumerate(self.rewards):
            seen, total = totals[7 + 2 * k], totals[8 + 2 * k]
            out[f"rewards/{fn.name}"] = total / seen if seen else float("nan")
        return out

    def _write_sample(self, module, rnd: Round, rows: list[Row], texts: list[str]) -> None:
        """Append the round's first group (prompt, completions, rewards, advantages) to completions.jsonl."""
        g = self.cfg.num_generations
        path = self.run_dir / COMPLETIONS_FILE
        lines = []
        for i in range(min(g, len(texts))):
            lines.append(
                {
                    "step": rnd.step,
                    "prompt": rows[i].prompt,
                    "completion": texts[i],
                    "reward": _num(rnd.rewards[i]),
                    "advantage": _num(rnd.advantages[i]),
                    "rewards": {f.name: _num(rnd.rewards_per_func[i, k]) for k, f in enumerate(self.rewards)},
                    "truncated": rnd.truncated[i],
                }
            )
        with path.open("a", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")
        module.log_completions_table(lines)

    # ---------------------------------------------------------------------------------------- validation
    def validate(self, module, prompts: list[list[int]], rows: list[Row]) -> None:
        """Greedy answers to a batch of validation prompts, scored by the rewards; summed for
        :meth:`validation_metrics`."""
        score = reward_scores(
            module.model, self.tokenizer, prompts, rows, self.rewards, self.cfg.max_completion_length
        )
        n = torch.tensor(float(len(rows)))
        self._add("val:reward", torch.tensor(score["total"]) * n, n)
        for fn in self.rewards:
            seen = torch.tensor(float(score["seen"][fn.name]))
            self._add(f"val:{fn.name}", torch.tensor(score["per_function"][fn.name] or 0.0) * seen, seen)

    def validation_metrics(self, module) -> dict[str, float]:
        """``val/reward`` and ``val/rewards/<name>``: means over every validation prompt, all ranks."""
        sums = {k: v for k, v in self._sums.items() if k.startswith("val:")}
        for key in sums:
            del self._sums[key]
        if not sums:
            return {}
        keys = sorted(sums)
        stacked = module.trainer.strategy.reduce(
            torch.stack([sums[k] for k in keys]).to(module.device), "sum"
        )
        totals = dict(zip(keys, stacked.tolist(), strict=True))
        out = {}
        for key in keys:
            if key.endswith(":sum"):
                name = key[len("val:") : -len(":sum")]
                label = "val/reward" if name == "reward" else f"val/rewards/{name}"
                out[label] = totals[key] / max(totals[f"val:{name}:count"], 1.0)
        return out

    # ---------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict | None:
        return None if self.round is None else self.round.state()

    def load_state_dict(self, state: dict | None) -> None:
        self.round = None if state is None else Round(**state)


def _num(value: torch.Tensor) -> float | None:
    x = float(value)
    return None if math.isnan(x) else x
