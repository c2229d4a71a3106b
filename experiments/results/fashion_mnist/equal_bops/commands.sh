# GETA against prune-then-quantize at exactly equal BOPs on Fashion-MNIST (experiments/RESULTS.md),
# the one-protocol schedule (1,000 fp32 pre-training steps per seed, then 600 steps), seeds 0-4:
# allocation="per_group" prunes 30 % of every group, as the baseline does, at fixed bits, so only
# the training differs. Resumable; results in runs/fm_p1.
python -m experiments.compare --protocol 1000,600 --bops 0.01 --seeds 0,1,2,3,4 \
 --methods geta@pg4,prune_then_quantize,prune_then_quantize@late,geta@pg2,prune_then_quantize@b2,prune_then_quantize@b2late \
 --set all:data.name=fashion_mnist --set all:method.sparsity=0.3 \
 --set prune_then_quantize@late:method.prune_at=0.4 --set prune_then_quantize@late:method.quantize_at=0.7 \
 --set geta@pg4:method.allocation=per_group --set "geta@pg4:method.bits=(4.0,4.0)" \
 --set geta@pg2:method.allocation=per_group --set "geta@pg2:method.bits=(2.0,2.0)" \
 --set prune_then_quantize@b2:method.bits=2.0 \
 --set prune_then_quantize@b2late:method.bits=2.0 --set prune_then_quantize@b2late:method.prune_at=0.4 --set prune_then_quantize@b2late:method.quantize_at=0.7 \
 --root runs/fm_p1 --jobs 2
python -m experiments.compare report runs/fm_p1
python -m experiments.compare pairs runs/fm_p1 geta-pg4:prune_then_quantize geta-pg4:prune_then_quantize-late geta-pg2:prune_then_quantize-b2 geta-pg2:prune_then_quantize-b2late > pairs.txt
