"""The embedded demo world (see ``mks2/demo/README.md``): a deterministic, download-free corpus of
rendered scenes of made-up objects, instruction data and held-out evaluation sets built from the same
world, a sentencepiece tokenizer and a tiny pre-trained CLIP vision tower, built on first use.

    from mks2.demo import resolve
    cfg = resolve(load_config(None))   # demo:NAME / demo placeholders -> real paths under data.cache_dir

Command line: ``python -m mks2.demo --cache-dir DIR`` builds (if needed) and prints the paths.

The demo sits above training and export: ``mks2.demo.base_lm`` pretrains the demo's stand-in for a
pretrained Llama and writes it through the exporter (``tools/demo_experiment.py``, step 0). The model,
data, checkpoint and training code never import this package: the launchers and tools resolve the
placeholders (``resolve``) before anything else runs.
"""

from mks2.demo.builder import DEMO_VERSION, DemoSizes, build, build_dir_name, ensure_built, fingerprint
from mks2.demo.resolve import NAMES, demo_path, is_demo, resolve, resolve_path

__all__ = [
    "DEMO_VERSION",
    "NAMES",
    "DemoSizes",
    "build",
    "build_dir_name",
    "demo_path",
    "ensure_built",
    "fingerprint",
    "is_demo",
    "resolve",
    "resolve_path",
]
