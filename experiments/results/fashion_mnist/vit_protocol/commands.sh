# ViT-tiny on Fashion-MNIST under one protocol (experiments/RESULTS.md, "Fashion-MNIST: ViT-tiny").
# Per seed a shared fp32 pre-training of 1,000 steps, then 600 steps of compression and fine-tuning
# at peak learning rate 1e-3 (fp32: 1,600 steps). Resumable; results in runs/fm_vit_p.
# Data: apt-get install -y dataset-fashion-mnist (or --set all:data.cache_dir=<IDX directory>).
for S in 0 1 2 3 4; do
python -m experiments.compare --model vit_tiny_mnist --protocol 1000,600 --bops 0.01 --seeds $S \
 --methods fp32,geta,prune_then_quantize,djpq,fit,uniform_magnitude \
 --set all:data.name=fashion_mnist --set geta:method.sparsity=0.3 --set "geta:method.bits=(3.0,4.0)" \
 --set prune_then_quantize:method.sparsity=0.3 --root runs/fm_vit_p --jobs 2
done
# GETA at the baseline's exact widths and bits (30 % of every group, 4 bits) and late QAT
python -m experiments.compare --model vit_tiny_mnist --protocol 1000,600 --bops 0.01 --seeds 0,1,2,3,4 \
 --methods geta@pg4,prune_then_quantize@late \
 --set all:data.name=fashion_mnist --set all:method.sparsity=0.3 \
 --set geta@pg4:method.allocation=per_group --set "geta@pg4:method.bits=(4.0,4.0)" \
 --set prune_then_quantize@late:method.prune_at=0.4 --set prune_then_quantize@late:method.quantize_at=0.7 \
 --root runs/fm_vit_p --jobs 2
python -m experiments.compare report runs/fm_vit_p
python -m experiments.compare pairs runs/fm_vit_p geta:prune_then_quantize \
 geta-pg4:prune_then_quantize geta-pg4:prune_then_quantize-late djpq_bops0.01:prune_then_quantize \
 djpq_bops0.01:prune_then_quantize-late fit_bops0.01:uniform_magnitude_bops0.01 > pairs.txt
