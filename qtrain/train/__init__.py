"""Training: :mod:`.loop` (fit, train_one_epoch, evaluate: the one loop; it never reads the config),
:mod:`.tasks` (loss and accuracy) and :mod:`.schedulers` (the LR schedules torch does not ship)."""
