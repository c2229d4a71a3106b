#!/usr/bin/env bash
# The runs of experiments/RESULTS.md on the MNIST CNN.
# "GETA and prune-then-quantize on the MNIST CNN":
# S = seed 0, 1, 2; P, B = the sparsity and bits of the row (placeholders to fill in).
OLD="--config.method.schedule=(0.1,0.1,0.5)"; SOLD="--set method.schedule=(0.1,0.1,0.5)"
LATE="--config.method.prune_at=0.4 --config.method.quantize_at=0.7"
SLATE="--set method.prune_at=0.4 --set method.quantize_at=0.7"
# Every GETA row (MNIST CNN and ViT-tiny) ran the plain joint rule: append $PLAIN ($SPLAIN).
PLAIN="--config.method.joint_rule=plain"; SPLAIN="--set method.joint_rule=plain"
python -m experiments.run --config experiments/configs/mnist_cnn.py --workdir runs/mnist_cnn
# current defaults (append $OLD / $LATE for the marked rows); P = 0.5, 0.75 sparsity; B = 2, 3 bits
python -m experiments.run --config experiments/configs/geta_mnist_cnn.py --config.seed=S --workdir runs/geta_sS
python -m experiments.run --config experiments/configs/ptq_mnist_cnn.py --config.seed=S --workdir runs/ptq_b4_early_sS
python -m experiments.run --config experiments/configs/geta_mnist_cnn.py --config.method.sparsity=P --config.method.allocation=per_group --config.method.bits="(2.0,2.0)" --config.method.bit_reduction=4 --config.seed=S --workdir runs/geta_pg_b2_short_sS
python -m experiments.run --config experiments/configs/ptq_mnist_cnn.py --config.method.sparsity=P --config.method.bits=2.0 --config.seed=S --workdir runs/ptq_b2_early_sS
# only with $OLD / $LATE
python -m experiments.run --config experiments/configs/geta_mnist_cnn.py --config.method.allocation=per_group --config.method.bits="(B,B)" --config.method.bit_reduction=4 $OLD --config.seed=S --workdir runs/geta_pg_bB_sS
python -m experiments.run --config experiments/configs/geta_mnist_cnn.py --config.method.allocation=per_group --config.method.bits="(2.0,2.0)" --config.method.bit_reduction=4 --config.method.cooldown_clips=True $OLD --config.seed=S --workdir runs/geta_pg_b2_cc_sS
python -m experiments.run --config experiments/configs/ptq_mnist_cnn.py --config.method.bits=3.0 $LATE --config.seed=0 --workdir runs/ptq_b3_s0
python -m experiments.sweep --config experiments/configs/geta_mnist_cnn.py --grid method.sparsity=0.6 --grid seed=0,1,2 $SOLD --root runs/sweeps/geta
python -m experiments.sweep --config experiments/configs/geta_mnist_cnn.py --grid method.sparsity=0.5 --grid "method.bits=(2.,3.)" --grid seed=0 $SOLD --root runs/sweeps/geta
python -m experiments.sweep --config experiments/configs/geta_mnist_cnn.py --grid method.cost_power=0.1,0.25 --grid seed=0 $SOLD --root runs/sweeps/geta_cost
python -m experiments.sweep --config experiments/configs/geta_mnist_cnn.py --grid method.allocation=per_group --grid seed=0,1,2 $SOLD --root runs/sweeps/geta_pg
python -m experiments.sweep --config experiments/configs/ptq_mnist_cnn.py --grid method.sparsity=0.6 --grid seed=0,1,2 $SLATE --root runs/sweeps/ptq
python -m experiments.pareto experiments/results/mnist_cnn/*.json --out runs/pareto.png

# "FITCompress on the MNIST CNN" (B = the size budget of the row):
for S in 0 1 2; do for B in 0.1 0.05 0.03; do
  python -m experiments.run --config experiments/configs/fit_mnist_cnn.py --config.seed=$S --config.method.size=$B --config.method.pretrain_dir=runs/pretrain_mnist_cnn_s$S --workdir runs/fit_s${S}_size$B
  python -m experiments.run --config experiments/configs/uniform_mnist_cnn.py --config.seed=$S --config.method.size=$B --config.method.pretrain_dir=runs/pretrain_mnist_cnn_s$S --workdir runs/um_s${S}_size$B
done; done   # the first run of a seed trains its pre-training directory; do not run a seed's runs in parallel before it exists
python -m experiments.run --config experiments/configs/fit_mnist_cnn.py --config.seed=0 --config.method.size=B --config.method.criterion=rate --config.method.pretrain_dir=runs/pretrain_mnist_cnn_s0 --workdir runs/fitrate_s0_sizeB
python -m experiments.run --config experiments/configs/fit_mnist_cnn.py --config.seed=0 --config.method.size=B "--config.method.bits=(2,4)" --config.method.pretrain_dir=runs/pretrain_mnist_cnn_s0 --workdir runs/fitb24_s0_sizeB
python -m experiments.fit_rank --configs 40 --seed 0 --out runs/fit_rank_s0.json
python -m experiments.bench_fisher --chunk 16 32 64 --rounds 5
python -m experiments.pareto experiments/results/mnist_cnn/*.json --out runs/pareto.png
python -m experiments.bench_fisher --chunk 32 128 --rounds 5
python -m experiments.bench_fisher --model vit_tiny_mnist --chunk 128 --rounds 3
for S in 0 1 2; do for B in 0.1 0.05 0.03; do
  python -m experiments.run --config experiments/configs/fit_mnist_cnn.py --config.seed=$S --config.method.size=$B --config.method.pretrain_dir=runs/pretrain_mnist_cnn_s$S --workdir runs/fitn16k_s${S}_size$B
done; done
python -m experiments.run --config experiments/configs/fit_mnist_cnn.py --config.seed=0 --config.method.size=B --config.method.fisher_samples=1024 --config.method.fisher_reduce=layer_mean --config.method.pretrain_dir=runs/pretrain_mnist_cnn_s0 --workdir runs/fitlm_s0_sizeB
python -m experiments.run --config experiments/configs/fit_mnist_cnn.py --config.seed=0 --config.method.size=B --config.method.fisher_reduce=layer_mean "--config.method.bits=(2,4)" --config.method.pretrain_dir=runs/pretrain_mnist_cnn_s0 --workdir runs/fitlmb24_s0_sizeB
for S in 0 1 2; do
  python -m experiments.run --config experiments/configs/fit_mnist_cnn.py --config.seed=$S --config.method.size=0.05 --config.method.criterion=least_fit --config.method.pretrain_dir=runs/pretrain_mnist_cnn_s$S --workdir runs/fitlf_s${S}_size0.05
done

# AJPQ on the MNIST CNN (RESULTS: "AJPQ on the MNIST CNN")
for S in 0 1 2; do for M in ajpq ajpq_random; do
  python -m experiments.run --config experiments/configs/ajpq_mnist_cnn.py --config.seed=$S --config.method.name=$M --config.method.size=0.2 --config.method.pretrain_dir=runs/pretrain_mnist_cnn_s$S --workdir runs/${M}_s${S}_size0.2
  python -m experiments.run --config experiments/configs/ajpq_mnist_cnn.py --config.seed=$S --config.method.name=$M --config.method.size=0.1 --config.method.pretrain_dir=runs/pretrain_mnist_cnn_s$S --workdir runs/${M}_s${S}_size0.1
  python -m experiments.run --config experiments/configs/ajpq_mnist_cnn.py --config.seed=$S --config.method.name=$M --config.method.size=0 --config.method.bops=0.01 --config.method.pretrain_dir=runs/pretrain_mnist_cnn_s$S --workdir runs/${M}_s${S}_bops0.01
done; done
for S in 0 1 2; do  # the comparison's budgets, random search (pre-training of experiments.compare)
  python -m experiments.run --config experiments/configs/ajpq_mnist_cnn.py --config.seed=$S --config.method.name=ajpq_random --config.method.size=0.04 --config.method.pretrain_dir=runs/compare_mnist_cnn/pretrain_s$S --workdir runs/ajr/size0.04_s$S
  python -m experiments.run --config experiments/configs/ajpq_mnist_cnn.py --config.seed=$S --config.method.name=ajpq_random --config.method.size=0 --config.method.bops=0.005 --config.method.pretrain_dir=runs/compare_mnist_cnn/pretrain_s$S --workdir runs/ajr/bops0.005_s$S
done
python -m experiments.bench_ajpq --rounds 3 --population 16 --mode map vmap
python -m experiments.pareto experiments/results/mnist_cnn/*.json --out runs/pareto.png
# "DJPQ on the MNIST CNN": T = the relative-BOPs target (0.005, 0.01, 0.02)
python -m experiments.run --config experiments/configs/djpq_mnist_cnn.py --config.method.target_bops=T --config.seed=S --workdir runs/djpq_tT_sS
python -m experiments.pareto experiments/results/mnist_cnn/*.json --out runs/pareto.png
