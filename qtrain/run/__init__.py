"""One run, end to end (the ``qtrain`` command's work below Hydra): ``runner.main_run`` picks what to
resume and trains, ``runner.train_run`` trains one configuration in one folder.

    runner.py        main_run / train_run: the run from its decision to result.json
    build.py         the run's objects from its config (one Built dataclass)
    validate.py      config values checked before anything is built
    schedule.py      schedule_scale: a recipe at a fraction of its length
    resume.py        a run's identity and fingerprint; which earlier run resume=true continues
    float_start.py   init=float: the float model's config
    float_cache.py   init=float: where that model is kept, and training it once
    lifecycle.py     run folders, locks, signals, the run's log
    sweep_summary.py the table of a multirun's jobs (a Hydra callback)

Nothing is imported here: the ``qtrain`` command loads run.lifecycle without torch (a fast --help).
"""
