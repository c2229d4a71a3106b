# Fashion-MNIST runs of experiments/RESULTS.md ("Fashion-MNIST: the papers' rules"); seed S.
# Data: apt-get install -y dataset-fashion-mnist (or --config.data.cache_dir=<IDX directory>).
F="--config.data.name=fashion_mnist --config.seed=S"
python -m experiments.run --config experiments/configs/mnist_cnn.py $F --workdir runs/fm/fp32_sS
# GETA: the reference joint rule (the default) and the plain rule
python -m experiments.run --config experiments/configs/geta_mnist_cnn.py $F --workdir runs/fm/geta_jointref_sS
python -m experiments.run --config experiments/configs/geta_mnist_cnn.py $F --config.method.joint_rule=plain --workdir runs/fm/geta_plain_sS
# prune-then-quantize at GETA's sparsity and 4 bits
python -m experiments.run --config experiments/configs/ptq_mnist_cnn.py $F --workdir runs/fm/ptq_sS
# DJPQ: gates on the weights before quantization (the default) and on the layer output
python -m experiments.run --config experiments/configs/djpq_mnist_cnn.py $F --workdir runs/fm/djpq_weights_sS
python -m experiments.run --config experiments/configs/djpq_mnist_cnn.py $F --config.method.gate_at=output --workdir runs/fm/djpq_output_sS
