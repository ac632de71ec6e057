"""Training: the one training engine (:mod:`.engine`), the run's Avalanche template on it
(:mod:`.template`), and the loops that use it outside the template (balanced finetuning,
:mod:`.finetune`; MAE pretraining, :mod:`incremental.mae`)."""
