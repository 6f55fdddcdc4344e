"""The tasks by name: each task module registers its :class:`~mlla.engine.task.Task` with
:func:`register_task` when imported; importing :mod:`mlla.tasks` imports the built-in ones."""
from __future__ import annotations

from ..engine.task import Task

__all__ = ["TASKS", "register_task"]

#: Registered tasks by :attr:`~mlla.engine.task.Task.name`.
TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make ``cls`` known by its name (its command's flags refuse other tasks' settings)."""
    if cls.settings.__dataclass_fields__["task"].default != cls.name:
        raise TypeError(f"{cls.__name__}.settings says task={cls.settings.__dataclass_fields__['task'].default!r}, "
                        f"not {cls.name!r}")
    TASKS[cls.name] = cls
    return cls

