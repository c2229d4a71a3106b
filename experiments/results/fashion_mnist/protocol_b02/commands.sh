# The second BOPs budget on Fashion-MNIST, 0.2 % relative BOPs (experiments/RESULTS.md,
# "Fashion-MNIST: 0.2 % relative BOPs"), the one-protocol schedule: per seed a shared fp32
# pre-training of 1,000 steps, then 600 steps of compression and fine-tuning at peak 1e-3.
# prune-then-quantize and GETA per group prune 60 % of every group at 2 bits (weights and
# inner activations; first and last layer 8 bits): the same widths and bits, the same BOPs.
# Resumable; results in runs/fm_b02.
python -m experiments.compare --protocol 1000,600 --bops 0.002 --seeds 0,1,2,3,4 \
 --methods djpq@m0,geta@pg2,prune_then_quantize@s6b2 \
 --set all:data.name=fashion_mnist --set djpq@m0:method.margin=0.0 \
 --set geta@pg2:method.allocation=per_group --set "geta@pg2:method.bits=(2.0,2.0)" --set geta@pg2:method.sparsity=0.6 \
 --set prune_then_quantize@s6b2:method.sparsity=0.6 --set prune_then_quantize@s6b2:method.bits=2.0 \
 --root runs/fm_b02 --jobs 2
python -m experiments.compare report runs/fm_b02
python -m experiments.compare pairs runs/fm_b02 djpq-m0_bops0.002:prune_then_quantize-s6b2 \
 geta-pg2:prune_then_quantize-s6b2 djpq-m0_bops0.002:geta-pg2 > pairs.txt
