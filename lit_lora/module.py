"""The LightningModule: a PEFT-wrapped causal LM, its loss, validation perplexity and optimizer.

Batches are dicts of ``input_ids``, ``attention_mask`` and ``labels`` (B, T) from
:func:`lit_lora.data.collate`; positions with label ``-100`` do not count in the loss.
Logged keys: ``train/loss``, ``train/lr``, ``val/loss``, ``val/ppl`` (token-weighted over the whole
validation set, through torchmetrics).
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torchmetrics.text import Perplexity
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from lit_lora.config import OptimConfig
from lit_lora.data import IGNORE_INDEX, Rendering


class LitLoRA(L.LightningModule):
    """Wraps ``model`` (a ``peft.PeftModel``); only its trainable (adapter) parameters are optimized.

    ``tokenizer`` and ``rendering`` ride along so that callbacks (adapter export) can save them
    beside the adapter.
    """

    def __init__(
        self, model: torch.nn.Module, optim: OptimConfig, tokenizer=None, rendering: Rendering | None = None
    ):
        super().__init__()
        self.model = model
        # from_pretrained returns the model in eval mode; LoRA dropout only acts in train mode.
        self.model.train()
        self.optim_cfg = optim
        self.tokenizer = tokenizer
        self.rendering = rendering
        self.val_ppl = Perplexity(ignore_index=IGNORE_INDEX)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None
    ):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(**batch).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"]).logits
        # Position t predicts token t+1.
        self.val_ppl.update(logits[:, :-1].float(), batch["labels"][:, 1:])

    def on_validation_epoch_end(self) -> None:
        ppl = self.val_ppl.compute()
        self.val_ppl.reset()
        self.log_dict({"val/ppl": ppl, "val/loss": torch.log(ppl)}, prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        cfg = self.optim_cfg
        kwargs = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps, "weight_decay": cfg.weight_decay}
        if cfg.name == "paged_adamw_8bit":  # CUDA only; checked with the config
            import bitsandbytes as bnb

            optimizer = bnb.optim.PagedAdamW8bit(params, **kwargs)
        else:
            optimizer = torch.optim.AdamW(params, **kwargs)
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
