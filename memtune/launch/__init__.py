"""``launch`` and ``tune``: run the fine-tune a plan describes, with checkpoints, exact resume and OOM fallback.

* ``runner``: the supervisor: ``run.json``, one attempt per plan, the fallback to the next plan after an OOM,
  torchrun for several processes, the report at the end; ``worker``: the torchrun entry point of an attempt.
* ``tune``: plan, validate the best candidates, launch the best that validated.
* ``commands``: the typer commands.

The training loop of one attempt and its checkpoints live beside the recipe (``memtune.train.loop``,
``memtune.train.checkpoint``); the ``[run]`` table is ``memtune.runconfig.RunConfig``.
"""
