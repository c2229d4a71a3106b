# The one-protocol comparison on Fashion-MNIST (experiments/RESULTS.md, README "Results"), seed S.
# Every row: a shared fp32 pre-training of 1,000 steps per seed, then 600 steps of compression and
# fine-tuning at peak learning rate 1e-3 (fp32: 1,600 steps). Resumable; results in runs/fm_p1.
# Data: apt-get install -y dataset-fashion-mnist (or --set all:data.cache_dir=<IDX directory>).
python -m experiments.compare --protocol 1000,600 --bops 0.01 --seeds S \
 --methods fp32,geta,geta@b34,prune_then_quantize,prune_then_quantize@late,djpq,fit,uniform_magnitude,ajpq,ajpq@hier,ajpq_random \
 --set all:data.name=fashion_mnist --set geta:method.sparsity=0.3 \
 --set geta@b34:method.sparsity=0.3 --set "geta@b34:method.bits=(3.0,4.0)" \
 --set prune_then_quantize:method.sparsity=0.3 --set prune_then_quantize@late:method.sparsity=0.3 \
 --set prune_then_quantize@late:method.prune_at=0.4 --set prune_then_quantize@late:method.quantize_at=0.7 \
 --set ajpq@hier:method.per_channel=True --set ajpq@hier:method.hierarchy=True \
 --root runs/fm_p1 --jobs 2
# FITCompress and its baseline at the papers' size: kept weights x bits = 1.5 % of fp32
python -m experiments.compare --protocol 1000,600 --size 0.015 --seeds S --methods fit,uniform_magnitude \
 --set all:data.name=fashion_mnist --set all:method.size_metric=active --root runs/fm_p1 --jobs 2
# DJPQ aiming at the target itself (margin 0; the default aims 10 % below it)
python -m experiments.compare --protocol 1000,600 --bops 0.01 --seeds S --methods djpq@m0 \
 --set all:data.name=fashion_mnist --set djpq@m0:method.margin=0.0 --root runs/fm_p1 --jobs 2
# the second size budget: 5 % active size
python -m experiments.compare --protocol 1000,600 --size 0.05 --seeds S --methods fit,uniform_magnitude \
 --set all:data.name=fashion_mnist --set all:method.size_metric=active --root runs/fm_p1 --jobs 2
python -m experiments.compare report runs/fm_p1
# the paired differences (pairs.txt); the root may be runs/fm_p1 or this directory
python -m experiments.compare pairs runs/fm_p1 geta:prune_then_quantize geta:prune_then_quantize-late geta-b34:prune_then_quantize geta-b34:prune_then_quantize-late djpq_bops0.01:prune_then_quantize djpq_bops0.01:prune_then_quantize-late djpq-m0_bops0.01:prune_then_quantize djpq-m0_bops0.01:prune_then_quantize-late djpq-m0_bops0.01:djpq_bops0.01 fp32:djpq-m0_bops0.01 fp32:djpq_bops0.01 prune_then_quantize:prune_then_quantize-late fit_size0.015:uniform_magnitude_size0.015 fit_size0.05:uniform_magnitude_size0.05 fit_bops0.01:uniform_magnitude_bops0.01 ajpq_bops0.01:ajpq_random_bops0.01 ajpq-hier_bops0.01:ajpq_random_bops0.01
# AJPQ's best reward against random search's per evaluated policy (ajpq_curves.txt / .png)
python -m experiments.ajpq_curves runs/fm_p1 ajpq_bops0.01 ajpq_random_bops0.01 --out ajpq_curves.png
python -m experiments.ajpq_curves runs/fm_p1 ajpq-hier_bops0.01 ajpq_random_bops0.01 --out ajpq_hier_curves.png
