"""The LightningModule: a PEFT-wrapped causal LM, its loss, validation perplexity and optimizer.

Batches come from :func:`lit_lora.data.batching.collate`: ``input_ids``, ``labels``, ``token_mask`` and
either ``attention_mask`` (padded) or ``position_ids`` (packed) (B, T); positions with label ``-100``
do not count in the loss. Logged keys: ``train/loss``, ``train/pad_frac`` (share of padded positions),
``val/loss``, ``val/ppl`` (token-weighted over the whole validation set, through torchmetrics), and with
a loss scaler (``trainer.precision=16-mixed``) ``train/scaler_skipped``: how many optimizer steps the
scaler has skipped for overflowing gradients so far.

Every decision about non-finite values is taken by all ranks together
(``strategy.reduce_boolean_decision``): under FSDP each rank sees only its shard of the gradients and
every rank has its own batches, so a rank that stopped or skipped alone would leave the others waiting
in the next collective. On one device that reduction returns its input, at no cost.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torchmetrics.text import Perplexity
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from lit_lora.config.schema import ObjectiveConfig, OptimConfig
from lit_lora.data.batching import MODEL_KEYS, REF_LOGPS, is_right_padded
from lit_lora.data.rendering import IGNORE_INDEX, Rendering
from lit_lora.errors import UserError
from lit_lora.speedups.attention import segments_from_positions
from lit_lora.speedups.chunked_loss import sequence_logps, supports_chunked_loss, trained_token_loss
from lit_lora.training import faults
from lit_lora.training.adapter_state import AdapterState
from lit_lora.training.objectives import PairScores, pair_scores
from lit_lora.training.reference import reference_model

# Under a loss scaler, a step whose gradients overflow although the scale it used was at most this is
# not an overflow of scaled gradients: the run itself has diverged (see on_before_optimizer_step).
MIN_LOSS_SCALE = 1.0


class LitLoRA(L.LightningModule):
    """Wraps ``model`` (a ``peft.PeftModel``); only its trainable (adapter) parameters are optimized.

    ``tokenizer`` and ``rendering`` ride along so that callbacks (adapter export) can save them
    beside the adapter.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optim: OptimConfig,
        tokenizer=None,
        rendering: Rendering | None = None,
        chunked_loss: bool = False,
        on_nonfinite: str = "abort",
        max_nonfinite_skips: int = 3,
        right_padding_mask: bool = False,
        objective: ObjectiveConfig | None = None,
        grpo=None,
    ):
        """``grpo``: a :class:`lit_lora.training.grpo_step.GRPOStep` for ``objective=grpo`` (rollouts,
        rewards and its loss), None otherwise."""
        super().__init__()
        self.model = model
        self.objective = objective or ObjectiveConfig()
        self.grpo = grpo
        # Sums over the pairs of the running optimizer step (train) or of the validation set (val).
        self._pair_sums: dict[str, dict[str, torch.Tensor]] = {"train": {}, "val": {}}
        self.chunked_loss = chunked_loss and supports_chunked_loss(model)
        self.right_padding_mask = right_padding_mask  # speed.right_padding_mask (see _model_inputs)
        # from_pretrained returns the model in eval mode; LoRA dropout only acts in train mode.
        self.model.train()
        self.optim_cfg = optim
        self.tokenizer = tokenizer
        self.rendering = rendering
        self.val_ppl = Perplexity(ignore_index=IGNORE_INDEX)
        # Checkpoints hold the adapter, not Lightning's full state_dict (see on_save_checkpoint).
        self.strict_loading = False
        self.best_val_loss: float | None = None  # lowest val/loss of this process (summary.json)
        self._step_loss: torch.Tensor | None = None  # the running optimizer step's loss (this rank)
        self.last_step_loss: float | None = None  # of the last optimizer step, all ranks
        self.on_nonfinite = on_nonfinite
        self.max_nonfinite_skips = max_nonfinite_skips
        self.nonfinite_skips = 0  # consecutive skipped steps
        self.skipped_steps: list[int] = []  # every step skipped for a non-finite gradient
        # Steps the loss scaler (16-mixed) skipped because the scaled gradients overflowed.
        self.scaler_skipped_steps = 0
        self._batch_idx = 0
        # Counted here, on the model as built: once FSDP (use_orig_params) or DeepSpeed ZeRO-3 has
        # wrapped it, a parameter's numel on a rank is the size of that rank's shard.
        self.adapter = AdapterState(model)

    # ------------------------------------------------------------------ checkpoints: the adapter only
    # The adapter's state lives in lit_lora.training.adapter_state; these are the names callbacks,
    # strategies and Lightning's hooks use.
    def trainable_count(self) -> int:
        """The number of trainable (adapter) parameters, whole (not a rank's shard), on every rank."""
        return self.adapter.trainable_params

    def full_params(self, writeback: bool = False):
        """Every adapter parameter whole on every rank inside (:meth:`AdapterState.full_params`)."""
        return self.adapter.full_params(
            self._trainer.strategy if self._trainer is not None else None, writeback
        )

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's parameters under their ``model.state_dict()`` names (:class:`AdapterState`)."""
        return self.adapter.state_dict()

    def adapter_weights(self) -> dict[str, torch.Tensor]:
        """Detached CPU copies of the adapter under PEFT's names (inside :meth:`full_params` under FSDP)."""
        return self.adapter.weights()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Replace Lightning's full ``state_dict`` with the adapter (:meth:`AdapterState.save_into`)."""
        with self.full_params():
            self.adapter.save_into(checkpoint, self.trainer.global_step)
        if self.grpo is not None:  # the running round's rollouts (a checkpoint between its iterations)
            checkpoint["grpo_round"] = self.grpo.state_dict()

    def check_adapter_fits(self, checkpoint: dict) -> None:
        """Raise :class:`UserError` unless the checkpoint's adapter fits this model (:class:`AdapterState`)."""
        self.adapter.check_fits(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Load the adapter of a checkpoint (checked first) into the parameters."""
        self.adapter.check_fits(checkpoint)
        with self.full_params(writeback=True):  # the base is never visited
            self.adapter.load_from(checkpoint)
        if self.grpo is not None:
            self.grpo.load_state_dict(checkpoint.get("grpo_round"))

    @staticmethod
    def _model_inputs(
        batch: dict[str, torch.Tensor], with_labels: bool, right_padding_mask: bool = False
    ) -> dict:
        """The model's keyword inputs of a batch, plus ``packed_segments`` for packed batches.

        A right-padded batch's ``attention_mask`` is left out unless ``right_padding_mask``: in a causal
        LM a real position attends only to positions before it, all real, so its output, the loss and
        every gradient are the same without the mask, and attention takes its causal-only path (the
        plain path's cached bias, SDPA's ``is_causal``) instead of building and applying a (B, 1, T, T)
        mask per batch. A mask with gaps (not ones then zeros) is always passed.
        """
        keys = MODEL_KEYS if with_labels else tuple(k for k in MODEL_KEYS if k != "labels")
        inputs = {k: batch[k] for k in keys if k in batch}
        mask = inputs.get("attention_mask")
        if mask is not None and not right_padding_mask and is_right_padded(mask):
            del inputs["attention_mask"]
        if "position_ids" in batch:
            # Read only by lit_lora.speedups.attention's segment attention (other implementations ignore it).
            inputs["packed_segments"] = segments_from_positions(batch["position_ids"])
        return inputs

    def forward(self, batch: dict[str, torch.Tensor], with_labels: bool = True, **kwargs):
        """The model's output for a batch; only model inputs are passed (not ``token_mask``).

        ``kwargs`` go to the model (e.g. ``num_items_in_batch``, the loss's divisor)."""
        inputs = self._model_inputs(batch, with_labels, self.right_padding_mask)
        # use_cache=False: a KV cache is useless in training, and with one transformers ignores the
        # position-id resets that keep packed examples from attending to each other.
        return self.model(**inputs, **kwargs, use_cache=False)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Summed token loss of the micro-batch over the trained tokens of its whole optimizer step.

        ``batch["step_tokens"]`` (from :class:`lit_lora.data.batching.StepBatchSampler`) counts the trained
        tokens of every micro-batch of this optimizer step on every rank. Lightning divides the returned
        loss by ``accumulate_grad_batches`` and DDP/FSDP average gradients over ranks, so the divisor
        passed to transformers' loss is ``step_tokens / (accum * world)``: the step's gradient is that of
        the mean loss over all its trained tokens, the same for 8 x 1, 4 x 2 or 2 x 4 micro-batches and
        for one or several processes. (Averaging per micro-batch instead over-weights the tokens of
        short micro-batches.) A batch without ``step_tokens`` is weighted as a micro-batch mean.

        ``on_nonfinite=abort``: every rank stops (:class:`UserError`) when the loss of any rank is NaN or
        infinite, all at the same micro-batch. This holds under ``16-mixed`` too: the loss is computed
        before the scaler multiplies it, so a non-finite loss is not a scaling overflow. With ``skip``
        the loss is not checked here: its gradients are non-finite and the step is skipped in
        :meth:`on_before_optimizer_step`.
        """
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size
        if self.grpo is not None:
            divisor = None
        elif "step_tokens" in batch:  # with preference pairs: the pairs of the step (lit_lora.data.module)
            divisor = batch["step_tokens"].float() / scale
        elif "pairs" in batch:
            divisor = batch["pairs"].float()
        else:
            divisor = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().float()
        step = self.global_step + 1  # the optimizer step this micro-batch belongs to (1-based)
        self._batch_idx = batch_idx
        if faults.at("oom", step):
            raise torch.OutOfMemoryError("CUDA out of memory (injected by LIT_LORA_FAULTS)")
        if self.grpo is not None:
            loss = self._grpo_loss(batch)
        elif self.objective.preference:
            scores = self._pair_scores(batch)
            self._add_pair_sums("train", scores)
            loss = scores.loss.sum() / divisor
        else:
            loss = self._loss(batch, divisor)
        if faults.at("nan_loss", step):
            loss = loss * float("nan")
        if self.on_nonfinite == "abort":
            finite = bool(torch.isfinite(loss))
            if not self.trainer.strategy.reduce_boolean_decision(finite, all=True):
                rank = f"rank {self.global_rank} of {self.trainer.world_size}"
                if finite:
                    what = f"the training loss is not finite on another rank ({rank} has {loss.item()})"
                elif self.trainer.world_size > 1:
                    what = f"the training loss is {loss.item()} on {rank}"
                else:
                    what = f"the training loss is {loss.item()}"
                raise UserError(
                    f"step {step} (batch {batch_idx} of epoch {self.current_epoch}): {what}; training "
                    "stopped before the optimizer step. Lower optim.lr, set "
                    "trainer.gradient_clip_val, check that batch's data, or set on_nonfinite=skip"
                )
        # This micro-batch's share of the optimizer step's mean loss; summed in on_before_optimizer_step.
        share = loss.detach() / scale
        self._step_loss = share if self._step_loss is None else self._step_loss + share
        if "token_mask" in batch:
            size = batch["input_ids"].shape[0]
            self.log("train/pad_frac", 1 - batch["token_mask"].float().mean(), batch_size=size)
        return loss

    # ------------------------------------------------------------------------------------------ grpo
    def _round_prompts(self, indices: list[int]) -> tuple[list[list[int]], list]:
        """The prompts' token ids and rows of training-split indices (from the data module)."""
        data = self.trainer.datamodule
        return [data.train_set[i]["input_ids"] for i in indices], [data.rows["train"][i] for i in indices]

    def _grpo_loss(self, batch: dict) -> torch.Tensor:
        """GRPO's micro-batch loss; the round's rollouts are made at its first micro-batch
        (:class:`lit_lora.training.grpo_step.GRPOStep`)."""
        prompts, rows = self._round_prompts(batch["round"].tolist())
        first = int(batch["micro"]) == 0 and int(batch["iteration"]) == 0
        if first or self.grpo.round is None:
            self.grpo.start_round(self, batch, prompts, rows)
        return self.grpo.loss(self, batch, prompts)

    def log_completions_table(self, lines: list[dict]) -> None:
        """A sample of completions as a table in the loggers that take tables (W&B)."""
        if not lines or self._trainer is None:
            return
        columns = ["step", "prompt", "completion", "reward", "advantage"]
        data = [[str(line[c]) if c == "prompt" else line[c] for c in columns] for line in lines]
        for logger in self.trainer.loggers:
            if hasattr(logger, "log_table"):
                logger.log_table(key="completions", columns=columns, data=data, step=self.global_step)

    def _loss(self, batch: dict[str, torch.Tensor], divisor: torch.Tensor) -> torch.Tensor:
        """Summed token loss / ``divisor``: chunked over trained positions (lit_lora.speedups.chunked_loss) or transformers'.

        FSDP takes transformers' path: the chunked one calls the decoder directly, past the root
        FSDP unit that holds the embeddings and the output layer."""
        if self.chunked_loss and not isinstance(self.trainer.strategy, FSDPStrategy):
            inputs = self._model_inputs(batch, with_labels=False, right_padding_mask=self.right_padding_mask)
            return trained_token_loss(self.model, inputs, batch["labels"], divisor)
        return self(batch, num_items_in_batch=divisor).loss

    # ------------------------------------------------------------------------ preference objectives
    def _sequence_logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed answer log-probs and answer token counts of every row of a pair batch (one forward)."""
        inputs = self._model_inputs(batch, with_labels=False, right_padding_mask=self.right_padding_mask)
        strategy = self._trainer.strategy if self._trainer is not None else None
        chunked = self.chunked_loss and not isinstance(strategy, FSDPStrategy)
        return sequence_logps(self.model, inputs, batch["labels"], chunked)

    def _pair_scores(self, batch: dict[str, torch.Tensor]) -> PairScores:
        """Loss and rewards of each pair of a batch from :func:`lit_lora.data.batching.collate_pairs`: chosen and
        rejected sides in one forward; for DPO the reference's in a second one, without gradients, unless
        the batch carries them (``objective.precompute_ref``: ``ref_logps``, computed before training)."""
        logps, tokens = self._sequence_logps(batch)
        ref = None
        if self.objective.uses_reference and REF_LOGPS in batch:
            ref = batch[REF_LOGPS].to(logps.dtype).unbind(1)
        elif self.objective.uses_reference:
            with torch.no_grad(), reference_model(self.model):
                ref = self._sequence_logps(batch)[0].chunk(2)
        return pair_scores(self.objective, logps.chunk(2), tokens.chunk(2), ref)

    def _add_pair_sums(self, split: str, scores: PairScores) -> None:
        """Add a batch's per-pair figures to the running sums of ``split``."""
        margin = scores.rewards_chosen - scores.rewards_rejected
        figures = {
            "loss": scores.loss.detach(),
            "rewards_chosen": scores.rewards_chosen,
            "rewards_rejected": scores.rewards_rejected,
            "rewards_margin": margin,
            "rewards_accuracy": (margin > 0).float(),
            "logps_chosen": scores.logps[0],
            "logps_rejected": scores.logps[1],
            "pairs": torch.ones_like(margin),
        }
        sums = self._pair_sums[split]
        for key, value in figures.items():
            total = value.float().sum()
            sums[key] = total if key not in sums else sums[key] + total

    def _pair_metrics(self, split: str) -> dict[str, torch.Tensor]:
        """Means over the pairs summed since the last call, all ranks together (a collective); resets."""
        sums, self._pair_sums[split] = self._pair_sums[split], {}
        if not sums:
            return {}
        keys = sorted(sums)
        stacked = self.trainer.strategy.reduce(torch.stack([sums[k] for k in keys]), reduce_op="sum")
        totals = dict(zip(keys, stacked, strict=True))
        pairs = totals.pop("pairs")
        if split == "train":
            totals.pop("loss")  # train/loss is the step's loss, logged with the SFT one
        return {f"{split}/{key}": value / pairs for key, value in totals.items()}

    def loss_scaler(self):
        """The loss scaler of the precision plugin (``trainer.precision=16-mixed``: a
        ``torch.amp.GradScaler``, under FSDP a ``ShardedGradScaler``), or None (every other precision)."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        return scaler if scaler is not None and scaler.is_enabled() else None

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # Lightning calls this after every callback's hook of the batch: a signal injected here lands
        # after GracefulStop has looked and before Lightning's own SIGTERM check (the reliability tests).
        faults.signal_self_after("sigterm", self.global_step)
        faults.kill_self_after("sigkill", self.global_step)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Check the gradients (``on_nonfinite``) and log ``train/loss``, the token-weighted mean loss of
        the optimizer step, all ranks together.

        Whether any gradient is NaN or infinite is decided over every rank's gradients
        (``reduce_boolean_decision``; under FSDP a rank holds only its shard), so all ranks abort, skip
        or step together. ``skip`` drops every gradient of a step with a non-finite one: AdamW leaves
        parameters without a gradient untouched, moments included, so the weights stay bitwise what
        they were.

        With a loss scaler (``16-mixed``) a non-finite gradient is the scaler's business, whatever
        ``on_nonfinite`` says: Lightning's precision plugin has unscaled the gradients before this hook
        and calls ``scaler.step`` after it, which skips the optimizer step and halves the scale. That is
        expected in the first steps (the scale starts at 65,536), so the step is neither aborted nor
        counted as a skip and the gradients are left alone; it is counted in ``scaler_skipped_steps``
        (logged as ``train/scaler_skipped``) and the first one is reported in one line. Two things still
        stop the run: a non-finite loss (checked in :meth:`training_step`: the loss is not scaled), and
        gradients that overflow although the scale of their step was at most ``MIN_LOSS_SCALE`` (1.0):
        those are not scaled-up gradients overflowing but a diverged run, and the scale would otherwise
        go on halving towards zero while no step trains. With the default initial scale that happens at
        the 17th overflow in a row. No cap on consecutive overflows is set besides: a larger initial
        scale legitimately takes more of them to come down.
        """
        step = self.global_step + 1
        params = [p for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        if faults.at("inf_grad", step):
            # The first gradient with elements on this rank (under FSDP a rank's shard may be empty).
            target = next((p for p in params if p.grad.numel()), None)
            if target is not None:
                target.grad.view(-1)[0] = float("inf")
        local = bool(torch.stack([torch.isfinite(p.grad).all() for p in params]).all()) if params else True
        finite = self.trainer.strategy.reduce_boolean_decision(local, all=True)
        scaler = self.loss_scaler() if not finite else None
        if scaler is not None:
            self._scaler_overflow(step, scaler)
        elif not finite:
            where = f"step {step} (last batch {self._batch_idx} of epoch {self.current_epoch})"
            if self.trainer.world_size > 1:
                rank = f"rank {self.global_rank} of {self.trainer.world_size}"
                where += f" ({rank}: {'finite' if local else 'not finite'} here)"
            if self.on_nonfinite == "abort":
                raise UserError(
                    f"{where}: a gradient is NaN or infinite; training stopped before the optimizer step. "
                    "Lower optim.lr, set trainer.gradient_clip_val, or set on_nonfinite=skip"
                )
            self.nonfinite_skips += 1
            self.skipped_steps.append(step)
            for p in params:
                p.grad = None
            print(f"lit-lora: {where}: non-finite gradient, step skipped", flush=True)
            if self.nonfinite_skips >= self.max_nonfinite_skips:
                raise UserError(
                    f"{where}: {self.nonfinite_skips} consecutive steps with non-finite gradients "
                    f"(max_nonfinite_skips={self.max_nonfinite_skips}); training stopped"
                )
        else:
            self.nonfinite_skips = 0
        if self.loss_scaler() is not None:
            self.log("train/scaler_skipped", float(self.scaler_skipped_steps), rank_zero_only=True)
        if self._step_loss is None:
            return
        total = self.trainer.strategy.reduce(self._step_loss, reduce_op="sum")
        self._step_loss = None
        self.last_step_loss = float(total)
        self.log("train/loss", total, prog_bar=True, rank_zero_only=True)
        if self.objective.preference:
            self.log_dict(self._pair_metrics("train"), rank_zero_only=True)
        if self.grpo is not None:
            metrics = self.grpo.step_metrics(self)
            self.log("train/reward", metrics.pop("train/reward"), prog_bar=True, rank_zero_only=True)
            self.log_dict(metrics, rank_zero_only=True)

    def _scaler_overflow(self, step: int, scaler) -> None:
        """A step whose gradients are not finite under a loss scaler: the scaler skips it (see
        :meth:`on_before_optimizer_step`); stop if the scale has collapsed."""
        scale = float(scaler.get_scale())  # the scale this step's backward used (update comes later)
        self.scaler_skipped_steps += 1
        if scale <= MIN_LOSS_SCALE:
            raise UserError(
                f"step {step}: gradients are NaN or infinite although the fp16 loss scale is down to "
                f"{scale:g} ({self.scaler_skipped_steps} steps skipped by the loss scaler so far): not "
                "an overflow of scaled gradients; training stopped. Lower optim.lr, use "
                "trainer.precision=bf16-mixed, or check the data"
            )
        if self.scaler_skipped_steps == 1 and self.trainer.is_global_zero:
            print(
                f"lit-lora: step {step}: the fp16 loss scaler found overflowing gradients at scale "
                f"{scale:g} and skips the step (expected while it finds its scale; counted in "
                "train/scaler_skipped, reported once)",
                flush=True,
            )

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        """Clip by norm under FSDP through FSDP's own ``clip_grad_norm_``; elsewhere Lightning's default.

        Lightning's FSDP precision plugin refuses norm clipping (``FSDPPrecision.clip_grad_by_norm``
        raises): ``torch.nn.utils.clip_grad_norm_`` on a rank would see only that rank's gradient
        shards, and the plugin has no reference to the root FSDP module. The strategy has it
        (``strategy.model``); its ``clip_grad_norm_`` computes the norm over all shards of all ranks (a
        collective: this hook runs on every rank). Under ``16-mixed`` the precision plugin has unscaled
        the gradients before this hook runs, so the clip applies to the true gradients; an optimizer
        that unscales inside its own step (fused) cannot be clipped and is refused, as Lightning does.
        Clipping by value is element-wise and needs no global view: Lightning's default does it.
        """
        strategy = self.trainer.strategy
        algorithm = gradient_clip_algorithm or self.trainer.gradient_clip_algorithm or "norm"
        by_norm = str(getattr(algorithm, "value", algorithm)).lower() == GradClipAlgorithmType.NORM.value
        if not (isinstance(strategy, FSDPStrategy) and by_norm):
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        value = gradient_clip_val if gradient_clip_val is not None else self.trainer.gradient_clip_val
        if not value or value <= 0:
            return
        root = strategy.model
        if not isinstance(root, FSDP):
            raise UserError(
                f"trainer.gradient_clip_val={value} under FSDP needs the model wrapped in "
                f"FullyShardedDataParallel, found {type(root).__name__}; set trainer.gradient_clip_val=null"
            )
        if self.loss_scaler() is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            raise UserError(
                f"{type(optimizer).__name__} unscales gradients inside its step, so they cannot be clipped "
                "before it; set trainer.gradient_clip_val=null or use a non-fused optimizer"
            )
        root.clip_grad_norm_(value)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        faults.during_validation()
        if self.grpo is not None:
            data = self.trainer.datamodule
            indices = batch["prompt_index"].tolist()
            prompts = [data.examples["val"][i]["input_ids"] for i in indices]
            self.grpo.validate(self, prompts, [data.rows["val"][i] for i in indices])
            return
        if self.objective.preference:
            self._add_pair_sums("val", self._pair_scores(batch))
            return
        logits = self(batch, with_labels=False).logits
        # Position t predicts token t+1.
        self.val_ppl.update(logits[:, :-1].float(), batch["labels"][:, 1:])

    def on_validation_epoch_end(self) -> None:
        if self.grpo is not None:
            metrics = self.grpo.validation_metrics(self)  # all ranks
            if not metrics:
                return
            reward = metrics.pop("val/reward")
            self.log("val/reward", reward, prog_bar=True, rank_zero_only=True)
            self.log_dict(metrics, rank_zero_only=True)
            # GRPO has no validation loss; val/loss is the negative validation reward, so that what
            # selects by val/loss (the best checkpoint, min; sweepers minimise best_val_loss) picks the
            # highest reward.
            self.log("val/loss", -reward, rank_zero_only=True)
            if not self.trainer.sanity_checking and math.isfinite(reward):
                self.best_val_loss = (
                    -reward if self.best_val_loss is None else min(self.best_val_loss, -reward)
                )
            return
        if self.objective.preference:
            metrics = self._pair_metrics("val")  # already summed over every rank
            if not metrics:
                return
            loss = metrics.pop("val/loss")
            self.log_dict(metrics, rank_zero_only=True)
            self.log("val/loss", loss, prog_bar=True, rank_zero_only=True)
        else:
            ppl = self.val_ppl.compute()
            self.val_ppl.reset()
            loss = torch.log(ppl)
            self.log_dict({"val/ppl": ppl, "val/loss": loss}, prog_bar=True, sync_dist=True)
        if not self.trainer.sanity_checking and torch.isfinite(loss):
            value = float(loss)
            self.best_val_loss = value if self.best_val_loss is None else min(self.best_val_loss, value)

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        cfg = self.optim_cfg
        kwargs = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps, "weight_decay": cfg.weight_decay}
        if cfg.name == "paged_adamw_8bit":  # CUDA only; checked with the config
            import bitsandbytes as bnb

            optimizer = bnb.optim.PagedAdamW8bit(params, **kwargs)
        else:
            # On a CPU PyTorch defaults to one small operation per tensor per update term; the
            # multi-tensor (foreach) step does the same arithmetic in fewer calls (the default model's
            # 240 adapter tensors: ~0.7 % of a CPU step). Elsewhere PyTorch's own default stands.
            on_cpu = all(p.device.type == "cpu" for p in params)
            optimizer = torch.optim.AdamW(params, **kwargs, foreach=True if on_cpu else None)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        if not math.isfinite(total):
            total = 1
        scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            optimizer,
            num_warmup_steps=min(cfg.warmup_steps, total),
            num_training_steps=total,
            min_lr_rate=cfg.min_lr_ratio,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
