"""The groundingdino-py stack: the `groundingdino` module's GroundingDINO (groundingdino-py, rf-groundingdino or
a source install of IDEA-Research's repository; they share the module).

What it owns: `stack.py` (the `Stack`: build from a config, load a checkpoint, batch -> the model's call,
criterion targets), `capture.py` (hooks on ContrastiveEmbed and the box heads that fill a `ForwardRecord`),
`bert_compat.py` (groundingdino's BERT wrapper on transformers 5) and `demo.py` (the small demo model and
its NaN batch). Checkpoint formats it reads (PEFT, MMDetection key names, Open-GroundingDino dicts) are in
`nanscope.stacks.formats`.
"""
