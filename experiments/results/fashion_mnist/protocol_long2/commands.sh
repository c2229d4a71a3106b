# The long protocol with 2,000 compression steps on Fashion-MNIST (experiments/RESULTS.md,
# "Fashion-MNIST: a longer schedule"): per seed a shared fp32 pre-training of 4,000 steps, then
# 2,000 steps of compression and fine-tuning at peak 1e-3 (fp32: 6,000 steps at 2e-3).
# Resumable; results in runs/fm_p3.
# Data: apt-get install -y dataset-fashion-mnist (or --set all:data.cache_dir=<IDX directory>).
python -m experiments.compare --protocol 4000,2000 --bops 0.01 --seeds 0,1,2 \
 --methods fp32,djpq@m0,prune_then_quantize --set all:data.name=fashion_mnist \
 --set djpq@m0:method.margin=0.0 --set prune_then_quantize:method.sparsity=0.3 \
 --root runs/fm_p3 --jobs 2
python -m experiments.compare report runs/fm_p3
python -m experiments.compare pairs runs/fm_p3 fp32:djpq-m0_bops0.01 fp32:prune_then_quantize \
 djpq-m0_bops0.01:prune_then_quantize > pairs.txt
