"""Reference implementations, synthetic tasks, plots and checks for the attention course.

One module per idea, in the order of the course: ``device``, ``rnn``, ``attention``,
``transformer``, ``tasks``, ``plotting``, ``checks``. The instructor tools live in
``helpers.course``. Importing this package is cheap: each module is imported on use.
"""

__version__ = "0.1.0"
