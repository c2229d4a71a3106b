"""DJPQ on ``resnet18`` / imagenet2012 (paper scale; see ``experiments/configs/paper.py``).

    python -m experiments.run --config experiments/configs/djpq_resnet18_imagenet2012.py \\
        --config.data.data_dir=/path/to/tfds --workdir runs/djpq_resnet18_imagenet2012
"""

import ml_collections

from experiments.configs.paper import djpq_config


def get_config() -> ml_collections.ConfigDict:
    """The imagenet2012 recipe of ``paper.RECIPES`` around DJPQ
    (target in ``paper.DJPQ_TARGETS``)."""
    return djpq_config("resnet18", "imagenet2012")
