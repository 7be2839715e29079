"""The groundingdino-py stack: the `groundingdino` module's GroundingDINO (groundingdino-py, rf-groundingdino or
a source install of IDEA-Research's repository; they share the module).

What it owns: `stack.py` (the `Stack`: build from a config, load a checkpoint, batch -> the model's call,
criterion targets), `capture.py` (hooks on ContrastiveEmbed and the box heads that fill a `ForwardRecord`),
`bert_compat.py` (groundingdino's BERT wrapper on transformers 5), `provider.py` (which installed distribution
provides the module: read from metadata, reported in results, refused when none or two mixed),
`image_cache.py` (rf-groundingdino's cached image features, dropped around replayed forwards) and `demo.py`
(the small demo model and its NaN batch). Checkpoint formats it reads (PEFT, MMDetection key names, Open-GroundingDino dicts) are in
`nanscope.stacks.formats`.
"""
