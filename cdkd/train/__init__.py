"""What every training job shares, beneath ``cdkd.distill`` (recipes) and ``cdkd.finetune`` (tasks):

* ``loop``: the one training loop (mixed precision, gradient accumulation, DDP, clipping, the LR schedule,
  metrics rows, progress, checkpoints at a cadence);
* ``rundir``: a run folder (its files, lock, identity checks, metrics and report) and ``checkpoint``: save, find,
  load and restore what changes during training;
* ``optim`` (AdamW groups, LR schedules, autocast) and ``distributed`` (DDP context, device);
* its record: ``history`` (``metrics.jsonl``), ``curves`` (``curves.png``), ``summary`` (``cdkd report``) and
  ``tensorboard``.
"""
