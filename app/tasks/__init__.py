"""The tasks: one package each (app/tasks/<name>/), registered by one entry in app/registry.py, which says what a
task package holds. The registry's lookups are re-exported here for the commands that ask for a task by name."""

from app.registry import (TASKS, TaskEntry, check_task_name, default_metric, get_task, task_command_paths,
                          task_config_module, task_metrics, task_schema, write_sample)

__all__ = ["TASKS", "TaskEntry", "check_task_name", "default_metric", "get_task", "task_command_paths",
           "task_config_module", "task_metrics", "task_schema", "write_sample"]
