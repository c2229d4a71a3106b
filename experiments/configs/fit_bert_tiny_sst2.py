"""FITCompress on ``bert_tiny`` / sst2 (paper scale; see ``experiments/configs/paper.py``).

    python -m experiments.run --config experiments/configs/fit_bert_tiny_sst2.py \\
        --config.data.data_dir=/path/to/tfds --workdir runs/fit_bert_tiny_sst2
"""

import ml_collections

from experiments.configs.paper import fit_config


def get_config() -> ml_collections.ConfigDict:
    """The sst2 recipe of ``paper.RECIPES`` around FITCompress."""
    return fit_config("bert_tiny", "sst2")
