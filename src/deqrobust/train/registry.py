"""The objectives that ``attack.objective`` may name, by name.

:func:`deqrobust.train.tasks.register_task` fills it (the built-in tasks on import, a user's own
task with one line); the config checks a name against it. It lives apart from the tasks, which read
the config, so that the config can check the name without importing them.
"""

from __future__ import annotations

TASKS: dict[str, type] = {}  # name -> a deqrobust.train.tasks.Task subclass
