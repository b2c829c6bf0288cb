"""Training: the one Trainer, its objectives, the stage runner, optimizer and schedule, run
directories, data parallelism. Checkpoint files and device/dtype choices live below it
(babyllama/checkpoint.py, runtime.py) so that inference never imports training."""
