"""The LightningModule: a PEFT-wrapped causal LM, its loss, validation perplexity and optimizer.

Batches come from :func:`lit_lora.batching.collate`: ``input_ids``, ``labels``, ``token_mask`` and
either ``attention_mask`` (padded) or ``position_ids`` (packed) (B, T); positions with label ``-100``
do not count in the loss. Logged keys: ``train/loss``, ``train/pad_frac`` (share of padded positions),
``val/loss``, ``val/ppl`` (token-weighted over the whole validation set, through torchmetrics).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torchmetrics.text import Perplexity
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from lit_lora import faults
from lit_lora.attention import segments_from_positions
from lit_lora.batching import MODEL_KEYS, is_right_padded
from lit_lora.config import OptimConfig
from lit_lora.errors import UserError
from lit_lora.loss import supports_chunked_loss, trained_token_loss
from lit_lora.rendering import IGNORE_INDEX, Rendering


def _json_default(value):
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return str(value)


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
    ):
        super().__init__()
        self.model = model
        self.chunked_loss = chunked_loss and supports_chunked_loss(model)
        self.right_padding_mask = right_padding_mask  # model.right_padding_mask (see _model_inputs)
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
        self._batch_idx = 0

    # ------------------------------------------------------------------ checkpoints: the adapter only
    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    @contextlib.contextmanager
    def full_params(self, writeback: bool = False) -> Iterator[None]:
        """Inside, every parameter is whole on every rank: FSDP's shards are gathered (a collective:
        enter it on every rank); with any other strategy it does nothing. ``writeback`` keeps changes."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, FSDPStrategy) and isinstance(strategy.model, FSDP):
            with FSDP.summon_full_params(strategy.model, writeback=writeback):
                yield
        else:
            yield

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Replace Lightning's full ``state_dict`` with the adapter (PEFT names and config).

        Raises :class:`UserError` if an adapter weight is NaN or infinite: such a checkpoint would only
        resume a broken run.
        """
        with self.full_params():
            weights = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.model).items()}
        broken = [name for name, tensor in weights.items() if not torch.isfinite(tensor).all()]
        if broken:
            raise UserError(
                f"step {self.trainer.global_step}: adapter weights are not finite ({broken[0]} and "
                f"{len(broken) - 1} more); no checkpoint saved. Lower optim.lr or set trainer.gradient_clip_val"
            )
        config = self.model.peft_config[self.model.active_adapter]
        checkpoint["adapter"] = {
            "weights": {name: tensor.contiguous() for name, tensor in weights.items()},
            "config": json.loads(json.dumps(config.to_dict(), default=_json_default)),
        }
        checkpoint["state_dict"] = {}  # the frozen base is never stored
        checkpoint["trainable_params"] = self.trainable_count()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Load the adapter of a checkpoint; its keys must be exactly this model's adapter keys."""
        adapter = checkpoint.get("adapter")
        if adapter is None:
            raise UserError(
                "the checkpoint holds no adapter weights; resume from a lit-lora checkpoint folder"
            )
        own = get_peft_model_state_dict(self.model)
        expected, given = set(own), set(adapter["weights"])
        if given != expected:
            missing, unexpected = sorted(expected - given), sorted(given - expected)
            raise UserError(
                f"the checkpoint's adapter does not fit this model: {len(missing)} missing keys "
                f"{missing[:2]}, {len(unexpected)} unexpected keys {unexpected[:2]} "
                "(same model and lora settings as the run that saved it?)"
            )
        for name, tensor in adapter["weights"].items():
            if tensor.shape != own[name].shape:
                raise UserError(
                    f"the checkpoint's adapter does not fit this model: {name} is {tuple(tensor.shape)} there, "
                    f"{tuple(own[name].shape)} here (same lora.r and target modules as the run that saved it?)"
                )
        before = self.trainable_count()
        with self.full_params(writeback=True):
            set_peft_model_state_dict(self.model, adapter["weights"])
        if self.trainable_count() != before or before != checkpoint.get("trainable_params", before):
            raise UserError(
                f"trainable parameters changed on resume: {checkpoint.get('trainable_params')} saved, {before} now"
            )

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
            # Read only by lit_lora.attention's segment attention (other implementations ignore it).
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

        ``batch["step_tokens"]`` (from :class:`lit_lora.batching.StepBatchSampler`) counts the trained
        tokens of every micro-batch of this optimizer step on every rank. Lightning divides the returned
        loss by ``accumulate_grad_batches`` and DDP/FSDP average gradients over ranks, so the divisor
        passed to transformers' loss is ``step_tokens / (accum * world)``: the step's gradient is that of
        the mean loss over all its trained tokens, the same for 8 x 1, 4 x 2 or 2 x 4 micro-batches and
        for one or several processes. (Averaging per micro-batch instead over-weights the tokens of
        short micro-batches.) A batch without ``step_tokens`` is weighted as a micro-batch mean.
        """
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size
        if "step_tokens" in batch:
            divisor = batch["step_tokens"].float() / scale
        else:
            divisor = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().float()
        step = self.global_step + 1  # the optimizer step this micro-batch belongs to (1-based)
        self._batch_idx = batch_idx
        if faults.at("oom", step):
            raise torch.OutOfMemoryError("CUDA out of memory (injected by LIT_LORA_FAULTS)")
        loss = self._loss(batch, divisor)
        if faults.at("nan_loss", step):
            loss = loss * float("nan")
        if not torch.isfinite(loss) and self.on_nonfinite == "abort":
            raise UserError(
                f"step {step} (batch {batch_idx} of epoch {self.current_epoch}): the training loss is "
                f"{loss.item()}; training stopped before the optimizer step. Lower optim.lr, set "
                "trainer.gradient_clip_val, check that batch's data, or set on_nonfinite=skip"
            )
        # This micro-batch's share of the optimizer step's mean loss; summed in on_before_optimizer_step.
        share = loss.detach() / scale
        self._step_loss = share if self._step_loss is None else self._step_loss + share
        size = batch["input_ids"].shape[0]
        self.log("train/pad_frac", 1 - batch["token_mask"].float().mean(), batch_size=size)
        return loss

    def _loss(self, batch: dict[str, torch.Tensor], divisor: torch.Tensor) -> torch.Tensor:
        """Summed token loss / ``divisor``: chunked over trained positions (lit_lora.loss) or transformers'.

        FSDP takes transformers' path: the chunked one calls the decoder directly, past the root
        FSDP unit that holds the embeddings and the output layer."""
        if self.chunked_loss and not isinstance(self.trainer.strategy, FSDPStrategy):
            inputs = self._model_inputs(batch, with_labels=False, right_padding_mask=self.right_padding_mask)
            return trained_token_loss(self.model, inputs, batch["labels"], divisor)
        return self(batch, num_items_in_batch=divisor).loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """Check the gradients (``on_nonfinite``) and log ``train/loss``, the token-weighted mean loss of
        the optimizer step, all ranks together.

        ``skip`` drops every gradient of a step with a non-finite one: AdamW leaves parameters without a
        gradient untouched, moments included, so the weights stay bitwise what they were.
        """
        step = self.global_step + 1
        params = [p for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        if faults.at("inf_grad", step) and params:
            params[0].grad.view(-1)[0] = float("inf")
        finite = torch.stack([torch.isfinite(p.grad).all() for p in params]).all() if params else True
        if not bool(finite):
            where = f"step {step} (last batch {self._batch_idx} of epoch {self.current_epoch})"
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
        if self._step_loss is None:
            return
        total = self.trainer.strategy.reduce(self._step_loss, reduce_op="sum")
        self._step_loss = None
        self.last_step_loss = float(total)
        self.log("train/loss", total, prog_bar=True, rank_zero_only=True)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch, with_labels=False).logits
        # Position t predicts token t+1.
        self.val_ppl.update(logits[:, :-1].float(), batch["labels"][:, 1:])

    def on_validation_epoch_end(self) -> None:
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
