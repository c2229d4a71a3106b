# AJPQ and random search on ViT-tiny, MNIST, size 10 %, seeds 0-2 (ajpq*_size0.1_s*.json):
# fp32 pre-training 2,000 steps shared per seed, 320 policies each, 500 fine-tune steps.
for S in 0 1 2; do for M in ajpq ajpq_random; do
  python -m experiments.run --config experiments/configs/ajpq_vit_tiny_mnist.py --config.seed=$S --config.method.name=$M --config.method.pretrain_dir=runs/pretrain_vit_s$S --workdir runs/ajvit_${M}_s$S
done; done
# fp32, GETA and prune-then-quantize ("ViT-tiny on MNIST" in experiments/RESULTS.md), seed S:
python -m experiments.run --config experiments/configs/geta_vit_tiny_mnist.py --config.method.name=fp32 --workdir runs/vit_fp32
python -m experiments.run --config experiments/configs/geta_vit_tiny_mnist.py --config.method.allocation=per_group --config.method.bits="(4.0,4.0)" --config.method.bit_reduction=3 --config.seed=S --workdir runs/vit_geta_pg_b4_short_sS
python -m experiments.run --config experiments/configs/geta_vit_tiny_mnist.py --config.method.allocation=per_group --config.method.bits="(4.0,4.0)" --config.method.bit_reduction=3 --config.method.schedule="(0.1,0.1,0.5)" --config.seed=S --workdir runs/vit_geta_pg_b4_sS
python -m experiments.run --config experiments/configs/ptq_vit_tiny_mnist.py --config.seed=S --workdir runs/vit_ptq_b4_early_sS
python -m experiments.run --config experiments/configs/ptq_vit_tiny_mnist.py --config.method.prune_at=0.4 --config.method.quantize_at=0.7 --config.seed=S --workdir runs/vit_ptq_b4_sS
