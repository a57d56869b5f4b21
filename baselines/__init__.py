"""One file per method; each registers itself with ``ipsd.method.register_method``.

To add a method, drop a file here (see ``hard.py`` for the smallest example); it is discovered
automatically and runs under the same engine, data, schedule and reporting as every other method.
"""
