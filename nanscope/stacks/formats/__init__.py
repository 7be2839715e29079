"""Checkpoint and config formats, shared by the stacks: what a file holds, never how a model is built.

`checkpoint.py` (torch files read with `weights_only=True`, allow-listed trainer objects, safetensors, key
fit -> NS306), `peft.py` (LoRA / PEFT state dicts and adapter folders), `mmdet_keys.py` (MMDetection's key
names <-> groundingdino's) and `safe_config.py` (Python and YAML configs read as data, never executed).
"""
