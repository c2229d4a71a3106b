# Every method on the MNIST CNN at 0.5 % relative BOPs and at 4 % size, seeds 0-2
# (experiments/RESULTS.md, "All methods on the MNIST CNN"); the last line: FIT with
# criterion=rate at 0.5 % BOPs, seed S. Results in runs/compare_mnist_cnn.
python -m experiments.compare --model mnist_cnn --seeds 0,1,2 --bops 0.005 --jobs 2 --reuse experiments/results/mnist_cnn
python -m experiments.compare --model mnist_cnn --seeds 0,1,2 --size 0.04 --methods fit,uniform_magnitude,ajpq --jobs 2
python -m experiments.compare report runs/compare_mnist_cnn
python -m experiments.run --config experiments/configs/fit_mnist_cnn.py --config.seed=S --config.method.size=0 --config.method.bops=0.005 --config.method.criterion=rate --config.method.pretrain_dir=runs/compare_mnist_cnn/pretrain_sS --workdir runs/fitrate_bops0.005_sS
