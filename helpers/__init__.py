"""Reference implementations, synthetic tasks, plots and checks for the attention course.

One module per idea, in the order of the course: ``device``, ``rnn`` (lesson 01),
``attention`` (02-04), ``transformer`` (05, and the Llama family of 07), ``flash`` and
``flash_triton`` (06), ``rope`` and ``sliding_window`` (07), ``ring`` and
``linear_attention`` (08), ``kv_cache`` (09), ``ssm`` (10), ``hybrid`` (11); beside them
``tasks`` (the synthetic data), ``plotting``, ``pretrained`` (local checkpoints only),
``checks`` (the visible checks) and ``hidden`` (the graded tests). The instructor tools live
in ``helpers.course``. Importing this package is cheap: each module is imported on use.
"""

__version__ = "0.1.0"
