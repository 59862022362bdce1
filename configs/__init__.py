"""The starter configs (``*.toml``), shipped inside the package as ``foldhpc.configs``.

pyproject.toml maps the package ``foldhpc.configs`` onto this top-level folder, so a wheel and an
editable install both carry these very files; ``foldhpc init`` (foldhpc/starter.py) writes them out
with comments. This file makes the folder a regular package (an editable install cannot map a
namespace subpackage).
"""
