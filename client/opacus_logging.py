"""Opacus, imported with its ``logging.basicConfig()`` undone; import this before any ``opacus`` module.

Opacus calls ``logging.basicConfig()`` when it is first imported (``opacus/utils/module_utils.py``). That puts a
handler on the root logger which prints every record reaching the root at any level, so Flower's DEBUG lines
(object stores, node registration) filled the console of every command that reads node data. Imported here first,
Opacus' handler is taken off again and logging stays as the program configured it. (Not in ``client/__init__``:
commands that never train, ``pollinate --help`` among them, must not pay for torch.)
"""

import logging

_root_handlers = list(logging.getLogger().handlers)
import opacus  # noqa: E402,F401 - imported here first, so that its basicConfig() can be undone once

for _handler in [h for h in logging.getLogger().handlers if h not in _root_handlers]:
    logging.getLogger().removeHandler(_handler)
