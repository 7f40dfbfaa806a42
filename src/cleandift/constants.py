"""Plain-data constants the CLI needs to *build* its parsers (argparse ``choices`` and defaults).

They live here, importing nothing but the standard library, so ``cleandift --help`` never loads torch,
diffusers or transformers. The modules that use them at run time keep their own names (e.g.
``cleandift.images.RESIZE_POLICIES``); ``tests/test_cli_startup.py`` checks each pair is identical.
"""

from __future__ import annotations

#: ``--resize`` policies of extraction (:data:`cleandift.images.RESIZE_POLICIES`)
RESIZE_POLICIES: tuple[str, ...] = ("stretch", "pad", "crop")
#: kNN readouts (:data:`cleandift.eval.pooling.READOUTS`)
READOUTS: tuple[str, ...] = ("avg", "max", "avg+max", "avg+std", "grid2", "grid4")
#: training optimizers (:data:`cleandift.train.config.OPTIMIZERS`)
OPTIMIZERS: tuple[str, ...] = ("adam", "adam-fused", "adam-foreach", "adam8bit")
#: ``--dtype`` spellings -> torch dtype attribute name
DTYPE_NAMES: dict[str, str] = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16",
                               "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16"}
#: Fashion-MNIST label order (:data:`cleandift.backbones.pixel.FASHION_MNIST_CLASSES`)
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
#: where the Debian package ``dataset-fashion-mnist`` puts the data (:data:`cleandift.pretrain.idx.DEFAULT_DATA_DIR`)
FASHION_MNIST_DIR: str = "/usr/share/datasets/fashion-mnist"
