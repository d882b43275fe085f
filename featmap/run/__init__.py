"""Executing a chapter: its configuration, the plan of cells, the chapter and layers runs, the distributed prepare."""
