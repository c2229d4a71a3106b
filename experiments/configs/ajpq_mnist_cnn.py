"""AJPQ on ``MnistCNN``: fp32 pre-training (FIT's recipe, so a seed's pre-trained model is
shared), a DDPG agent's search of per-layer weight bits in [2, 8] and per-layer fractions of
output channels at 0 bits (pruned), the exact budget enforced on every policy, reward = held-out
accuracy of the compressed model without fine-tuning; then quantization-aware fine-tuning of the
best policy. First and last layer at 8 bits; activations at 8 bits for size budgets, searched for
a BOPs budget.

    python -m experiments.run --config experiments/configs/ajpq_mnist_cnn.py --workdir runs/ajpq
    python -m experiments.run --config experiments/configs/ajpq_mnist_cnn.py \\
        --config.method.size=0 --config.method.bops=0.01 --workdir runs/ajpq_bops
    python -m experiments.run --config experiments/configs/ajpq_mnist_cnn.py \\
        --config.method.name=ajpq_random --workdir runs/ajpq_random   # the same evaluations
"""

import ml_collections

from experiments.configs import fit_mnist_cnn


def get_config() -> ml_collections.ConfigDict:
    """500 fine-tune steps after the search, as FIT's config."""
    c = fit_mnist_cnn.get_config()
    fit = c.method
    c.method = ml_collections.ConfigDict()
    c.method.name = "ajpq"  # or "ajpq_random": uniform random policies, the same evaluations
    for k in ("pretrain_steps", "pretrain_epochs", "pretrain_optim", "pretrain_dir", "bits",
              "quant_lr"):
        c.method[k] = fit[k]
    c.method.size = 0.2  # budget: bytes of the saved export directory / fp32 model bytes
    c.method.bops = 0.0  # or a BOPs budget (cost.relative_bops) with size = 0
    c.method.episodes = 40  # candidates scored: episodes x agent.population
    c.method.reward_samples = 2000  # reward set: a fixed draw from the val split (else train)
    c.method.eval_batch = 500  # reward samples per forward step of the evaluator
    c.method.max_prune = 0.9  # the largest fraction of a layer's channels an action prunes
    c.method.over_penalty = 0.1  # reward penalty per unit of the policy's budget overshoot
    c.method.per_channel = False  # weight quantizers per output channel (scales and bits)
    c.method.hierarchy = False  # True (needs per_channel): a channel level spreads a layer's
    # bits over its kernels by importance, pruned kernels at 0 bits (jaxjpq.ajpq)
    c.method.agent = ml_collections.ConfigDict(dict(  # jaxjpq.ajpq.Hyper fields
        population=8, hidden=300, actor_lr=1e-4, critic_lr=1e-3, sigma=0.5, sigma_decay=0.95,
        sigma_min=0.05, warmup=2, updates=32, batch=64, buffer=4096, baseline_decay=0.9))
    return c
