"""``launch`` and ``tune``: run the fine-tune a plan describes, with checkpoints, exact resume and OOM fallback.

* ``config``: ``RunConfig``, the ``[run]`` table of a plan file (data, schedule, checkpoints).
* ``runner``: the supervisor: ``run.json``, one attempt per plan, the fallback to the next plan after an OOM,
  torchrun for several processes, the report at the end.
* ``loop``: one attempt of the training loop in one process (rank); ``worker``: its torchrun entry point.
* ``checkpoint``: sharded checkpoints (torch.distributed.checkpoint) and the final export (save_pretrained).
* ``tune``: plan, validate the best candidates, launch the best that validated.
* ``commands``: the typer commands.
"""
