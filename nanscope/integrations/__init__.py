"""Thin adapters over `nanscope.watch.attach`, one module per framework; each imports its framework only inside
itself, and nothing here imports them: `nanscope.integrations.transformers` (Trainer callback),
`.lightning` (Lightning callback), `.mmengine` (a hook in MMEngine's HOOKS registry), `.trackers` (W&B,
MLflow, TensorBoard alerts)."""
