# The longer protocol on Fashion-MNIST (experiments/RESULTS.md, "Fashion-MNIST: a longer schedule").
# Per seed a shared fp32 pre-training of 4,000 steps, then 1,000 steps of compression and
# fine-tuning at peak learning rate 1e-3 (fp32: 5,000 steps at 2e-3). Resumable; results in runs/fm_p2.
# Data: apt-get install -y dataset-fashion-mnist (or --set all:data.cache_dir=<IDX directory>).
python -m experiments.compare --protocol 4000,1000 --bops 0.01 --seeds 0,1,2 \
 --methods fp32,djpq,prune_then_quantize --set all:data.name=fashion_mnist \
 --set prune_then_quantize:method.sparsity=0.3 --root runs/fm_p2 --jobs 2
# DJPQ aiming at the target itself (margin 0)
python -m experiments.compare --protocol 4000,1000 --bops 0.01 --seeds 0,1,2 --methods djpq@m0 \
 --set all:data.name=fashion_mnist --set djpq@m0:method.margin=0.0 --root runs/fm_p2 --jobs 2
python -m experiments.compare report runs/fm_p2
python -m experiments.compare pairs runs/fm_p2 djpq_bops0.01:prune_then_quantize \
 fp32:djpq_bops0.01 fp32:prune_then_quantize fp32:djpq-m0_bops0.01 djpq-m0_bops0.01:djpq_bops0.01
