"""Bridges to other libraries: `hf` (transformers models and generation), `pretrained` (offline checkpoints).

Each needs the `transformers` extra: pip install -e ".[transformers]".
"""
