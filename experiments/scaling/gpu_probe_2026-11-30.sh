#!/bin/bash
# First device probe of the CURRENT code (before issue-18 fixes): each predicted failure observed or not.
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 || { echo "wheel install failed"; exit 3; }
export PYTHONPATH=/tmp/site:$PWD LIT_LORA_CACHE=/tmp/llcache WANDB_MODE=disabled PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/env.txt
python3 -c "import torch,transformers,peft,bitsandbytes,lightning;print('torch',torch.__version__,'tf',transformers.__version__,'peft',peft.__version__,'bnb',bitsandbytes.__version__,'L',lightning.__version__)" 2>&1 | tail -2 | tee -a $OUT/env.txt
M="model=tiny model.tokenizer=.gpu/tokenizer model.config_overrides.hidden_size=512 model.config_overrides.intermediate_size=1408 model.config_overrides.num_hidden_layers=4 model.config_overrides.num_attention_heads=8 model.config_overrides.num_key_value_heads=4 trainer.enable_progress_bar=false data.test_size=16 data.score_max_new_tokens=16"
run() { # name timeout overrides...
  local name=$1 to=$2; shift 2
  local s=$(date +%s)
  timeout $to python3 -m lit_lora.train $M "$@" hydra.run.dir=runs/gpu/$name > $OUT/$name.log 2>&1
  local rc=$?
  echo "== $name rc=$rc wall=$(( $(date +%s)-s ))s"
  grep -iE "error|refus|finite|nan|exact match|device|Traceback|tokens/s|mfu" $OUT/$name.log | grep -v Warning | tail -8
  [ -f runs/gpu/$name/summary.json ] && python3 -c "import json,sys;d=json.load(open('runs/gpu/$name/summary.json'));print({k:d.get(k) for k in ('status','global_step','final_train_loss','val_loss','score_base','score_tuned','memory','wall_time_s')})" 2>&1 | cut -c1-900
}
run qlora 150 quant=nf4 trainer.max_steps=20 trainer.val_check_interval=10
run qlora_resume 100 quant=nf4 trainer.max_steps=30 trainer.val_check_interval=10 resume=runs/gpu/qlora/checkpoints/last.ckpt score=false
run fp16_article 100 experiment=mistral7b_qlora trainer.max_steps=20 score=false
run fsdp_nf4 120 trainer=fsdp quant=nf4 model.gradient_checkpointing=true trainer.max_steps=10 trainer.devices=1
run fp16_true 80 trainer.precision=16-true trainer.max_steps=10 score=false
ls runs/gpu/qlora runs/gpu/qlora/checkpoints 2>&1 | head -20
E=$(( $(date +%s)-T0 )); echo "elapsed ${E}s"
if [ $E -lt 300 ]; then
  timeout $(( 420-E )) python3 -m bench.gpu --rounds 1 --steps 4 --out $OUT/bench-gpu.json 2>&1 | tail -15
fi
tar czf $OUT/runs.tgz runs/gpu/*/summary.json runs/gpu/*/*.log 2>/dev/null
echo "total $(( $(date +%s)-T0 ))s"
