"""The training step shared by the estimator's trace, ``validate`` and ``launch`` (``recipe``, ``quant``, ``data``,
``distributed``), and the loop that runs it for ``launch`` with its checkpoints (``loop``, ``checkpoint``)."""
