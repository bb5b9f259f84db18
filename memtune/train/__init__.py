"""The training recipe shared by the estimator's trace, ``validate`` and ``launch``."""
