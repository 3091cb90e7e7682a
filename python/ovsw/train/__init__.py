"""The training application: ``ovsw-train`` (upstream's ``main.py``), ``ovsw-sweep``, and
the data sets, DALI pipelines and multi-process set-up they use.

The library (:mod:`ovsw`: ``nn``, ``optim``, ``models``, ``deploy``) needs only torch
and numpy and never imports this package; the application needs the ``ovsw[train]``
extra (torchvision, PyYAML, tqdm, TensorBoard, scikit-learn), DALI the ``ovsw[dali]``
extra. One module per job:

- :mod:`~ovsw.train.cli`: ``ovsw-train`` itself (``python -m ovsw``, ``python -m
  ovsw.train``): sets a run up (device or process group, data, model, optimizer,
  ``--pretrained`` / ``--resume``, run folder), runs it, reports it;
- :mod:`~ovsw.train.args`: the flags, their defaults and checks;
- :mod:`~ovsw.train.configs`: the shipped YAML configs (``configs/`` in this package);
- :mod:`~ovsw.train.data`: the data sets (``--set``);
- :mod:`~ovsw.train.dali`: NVIDIA DALI pipelines (``--dali``; ``python -m
  ovsw.train.dali export-cifar``);
- :mod:`~ovsw.train.loaders`: data sets and DALI pipelines as each rank's loaders;
- :mod:`~ovsw.train.distributed`: ``torch.distributed`` (``--distributed``);
- :mod:`~ovsw.train.optimizers`: the learning-rate policy and the optimizer;
- :mod:`~ovsw.train.loop`: the epochs: train and validate over one batch iteration,
  checkpoints and logs per epoch;
- :mod:`~ovsw.train.checkpoints`: writing, reading and loading checkpoints;
- :mod:`~ovsw.train.runs`: run folders, the results CSV, and :func:`load_model` (a
  run's trained model, for export);
- :mod:`~ovsw.train.sweep`: ``ovsw-sweep``, upstream's sweep scripts;
- :mod:`~ovsw.train.errors`: the one-line error every module raises for a user's
  mistake.
"""
