"""Offline text: docstrings of a fixed list of standard-library modules.

Always available, deterministic for a given Python version, and over 1 MB, enough for a
few hundred thousand tokens. This file imports only the standard library: it runs itself
in a bare child interpreter to collect the text (see `stdlib_docs`).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import subprocess
import sys
import warnings
from collections.abc import Iterator

# Modules present on every CPython 3.10+ install (no tkinter, no modules
# removed in 3.13), sorted so the document order is fixed.
STDLIB_MODULES = tuple(sorted("""
    argparse array ast asyncio.base_events asyncio.events asyncio.futures
    asyncio.locks asyncio.queues asyncio.streams asyncio.subprocess asyncio.tasks
    asyncio.transports base64 binascii bisect builtins bz2 cProfile calendar cmath
    cmd code codecs codeop collections collections.abc colorsys compileall
    concurrent.futures concurrent.futures.process concurrent.futures.thread
    configparser contextlib contextvars copy csv dataclasses datetime dbm decimal
    difflib dis doctest email.charset email.feedparser email.generator email.header
    email.headerregistry email.message email.parser email.policy email.utils enum
    filecmp fileinput fnmatch fractions ftplib functools gc getopt getpass gettext
    glob graphlib gzip hashlib heapq hmac html html.parser http.client
    http.cookiejar http.cookies http.server imaplib importlib importlib.abc
    importlib.metadata importlib.resources importlib.util inspect io ipaddress
    itertools json json.decoder json.encoder linecache locale logging
    logging.handlers lzma mailbox marshal math mimetypes modulefinder
    multiprocessing.connection multiprocessing.managers multiprocessing.pool
    multiprocessing.queues multiprocessing.shared_memory multiprocessing.synchronize
    netrc numbers operator optparse os os.path pathlib pdb pickle pickletools
    pkgutil platform plistlib poplib pprint profile pstats py_compile pyclbr pydoc
    queue quopri random re reprlib rlcompleter runpy sched secrets selectors shelve
    shlex shutil signal smtplib socket socketserver sqlite3 ssl stat statistics
    string struct subprocess symtable sys sysconfig tarfile tempfile textwrap
    threading time timeit token tokenize trace traceback tracemalloc types typing
    unicodedata unittest.case unittest.loader unittest.mock unittest.runner
    unittest.suite urllib.error urllib.parse urllib.request urllib.response
    urllib.robotparser uuid venv warnings wave weakref wsgiref.handlers
    wsgiref.simple_server xml.dom.expatbuilder xml.dom.minidom xml.etree.ElementTree
    xml.sax.handler xml.sax.saxutils xmlrpc.client zipfile zipimport zlib zoneinfo
""".split()))



@functools.cache
def stdlib_docs() -> tuple[str, ...]:
    """Deduplicated, non-empty docstrings of STDLIB_MODULES, in a fixed order.

    Collected in a bare child interpreter (-I -S: no site-packages, no .pth
    hooks) because libraries patch stdlib objects on import (Ray replaces
    sys.excepthook and inspect.isgenerator); collecting in-process would make
    the text, and every tokenizer and batch built from it, depend on what the
    caller imported first.
    """
    child = subprocess.run([sys.executable, "-I", "-S", __file__], capture_output=True,
                           text=True, encoding="utf-8", check=False)
    if child.returncode != 0:
        raise RuntimeError(f"collecting stdlib docstrings failed: {child.stderr.strip()[-500:]}")
    return tuple(json.loads(child.stdout))


def collect_stdlib_docs() -> list[str]:
    """The stdlib documents as seen by this interpreter (run in a bare child)."""
    seen: set[str] = set()
    docs: list[str] = []
    with warnings.catch_warnings():
        # Some modules and aliases (typing.io, ...) warn on access; irrelevant here.
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in STDLIB_MODULES:
            docs.extend(_new_docs(name, seen))
    return docs


def _new_docs(name: str, seen: set[str]) -> Iterator[str]:
    """Docstrings of module `name` not yet in `seen` (which is updated)."""
    try:
        module = importlib.import_module(name)
    except ImportError:
        return  # a stripped-down Python build; the other modules still give enough text
    for obj in _documented_objects(module):
        doc = inspect.getdoc(obj)
        if doc and doc.strip() and doc not in seen:
            seen.add(doc)
            yield doc


def _documented_objects(module) -> Iterator[object]:
    """The module, then its public classes and functions, each class followed by its methods."""
    yield module
    for name in _public_names(module):
        value = getattr(module, name, None)
        if inspect.isroutine(value):
            yield value
        elif inspect.isclass(value):
            yield value
            for attr, member in sorted(vars(value).items()):
                if not attr.startswith("_") and (inspect.isroutine(member) or isinstance(member, property)):
                    yield member


def _public_names(module) -> list[str]:
    """`__all__` where defined: some modules (concurrent.futures) add lazily loaded
    names to their globals on first access, so `vars` would depend on what other
    code touched earlier."""
    names = getattr(module, "__all__", None)
    if names is None:
        names = [name for name in vars(module) if not name.startswith("_")]
    return sorted(set(names))


if __name__ == "__main__":
    # Child process of stdlib_docs.
    json.dump(collect_stdlib_docs(), sys.stdout)
