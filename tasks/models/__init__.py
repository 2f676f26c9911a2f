"""Model families (one registered `ModelFamily` per module: requant_head.py, hf_sequence_classifier.py,
hf_causal_lm.py for decoder language models),
with what they share: the family interface (base.py), tokenization and model cards (io.py), ONNX
graphs and sessions (graph.py), and the default decoder's weights from its GGUF package (gguf_source.py).

May import: core, config.
"""

import importlib
import pkgutil

# Importing a family's module registers it; the shared modules register nothing.
_SHARED = {"base", "io", "graph", "gguf_source"}

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _SHARED:
        importlib.import_module(f"{__name__}.{_module.name}")
