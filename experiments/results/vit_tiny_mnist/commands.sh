# AJPQ and random search on ViT-tiny, MNIST, size 10 %, seeds 0-2 (ajpq*_size0.1_s*.json):
# fp32 pre-training 2,000 steps shared per seed, 320 policies each, 500 fine-tune steps.
for S in 0 1 2; do for M in ajpq ajpq_random; do
  python -m experiments.run --config experiments/configs/ajpq_vit_tiny_mnist.py --config.seed=$S --config.method.name=$M --config.method.pretrain_dir=runs/pretrain_vit_s$S --workdir runs/ajvit_${M}_s$S
done; done
# GETA and prune-then-quantize: the commands under "ViT-tiny on MNIST" in experiments/RESULTS.md
