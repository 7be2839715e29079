"""The transformers stack: Hugging Face's `GroundingDinoForObjectDetection` (no `groundingdino` module needed).

What it owns: `stack.py` (the `Stack`), `loading.py` (a `save_pretrained` folder or a state-dict file with
its config, the processor's tokenizer), `capture.py` (hooks on the class and box heads), `labels.py` (the
`labels` the model's own loss takes, and its class-offset bug) and `demo.py` (the tiny model built offline).
"""
