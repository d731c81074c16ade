"""The node: the ClientApp, its training, data, DP-SGD and the warm worker.

Opacus calls ``logging.basicConfig()`` when it is first imported (``opacus/utils/module_utils.py``). That puts a
handler on the root logger which prints every record reaching the root at any level, so Flower's DEBUG lines
(object stores, node registration) filled the console of every command that reads node data. Every module here
that uses Opacus is imported through this package, so Opacus is first imported here, and the handler it added is
taken off again; logging stays as the program configured it.
"""

import logging as _logging

_root_handlers = list(_logging.getLogger().handlers)
import opacus  # noqa: E402,F401 - first imported here, so that its basicConfig() can be undone once

for _handler in [h for h in _logging.getLogger().handlers if h not in _root_handlers]:
    _logging.getLogger().removeHandler(_handler)
