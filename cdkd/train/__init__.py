"""What every training job shares, beneath ``cdkd.distill`` and ``cdkd.finetune``: for now its record (the
history in ``metrics.jsonl``, ``curves.png``, a run's summary, TensorBoard events)."""
