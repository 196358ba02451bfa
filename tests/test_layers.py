"""
The boundary between the HTTP channel and the proxy: the channel's
request implements the interface the proxy uses, and neither module
imports the other, so knowledge of one never leaks into the other.
"""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial import unittest
from zope.interface.verify import verifyClass

from ssp import channel, proxy
from ssp.channel import ProxyRequest
from ssp.interfaces import IExchange


def ssp_imports(module: object) -> set[str]:
    """
    The C{ssp} modules that C{module}'s source imports, anywhere in it.
    """
    tree = ast.parse(Path(module.__file__).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found.update(n for n in names if n.startswith("ssp."))
    return found


class ExchangeBoundaryTests(unittest.SynchronousTestCase):
    def test_request_implements_exchange(self):
        self.assertTrue(IExchange.implementedBy(ProxyRequest))
        self.assertTrue(verifyClass(IExchange, ProxyRequest))

    def test_channel_knows_nothing_of_the_proxy(self):
        imported = ssp_imports(channel)
        self.assertTrue(imported, "no ssp imports parsed: the check would be vacuous")
        for upper in ("ssp.proxy", "ssp.pipeline", "ssp.service"):
            self.assertNotIn(upper, imported)

    def test_proxy_knows_the_channel_only_as_an_exchange(self):
        imported = ssp_imports(proxy)
        self.assertIn("ssp.interfaces.IExchange", imported)
        self.assertNotIn("ssp.channel", imported)
