"""Worked examples of extending ipsd from outside the suite's own packages (a plugin method and a table)."""
