# -*- test-case-name: tests.test_workers -*-
"""
Server endpoints for C{twistd ssp --workers}:

  - C{ssp-inherit:fd=N[:domain=INET]}: listen on a listening socket this
    process inherited as descriptor C{N}, as the master hands its socket
    to every worker.  Unlike C{systemd:} it needs no C{LISTEN_PID}, which
    a parent cannot know before it spawns the child.
  - C{ssp-reuseport:PORT[:interface=ADDRESS][:backlog=N]}: C{tcp:} with
    C{SO_REUSEPORT}, a socket of its own per worker with
    C{listen.reuse_port} (L{ssp.workers.ReusePortEndpoint}).

Kept tiny: every twistd run imports dropins.
"""

import socket

from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.internet.interfaces import IStreamServerEndpointStringParser
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IPlugin, IStreamServerEndpointStringParser)
class InheritedSocketParser:
    prefix = "ssp-inherit"

    def parseStreamServer(self, reactor, fd, domain="INET"):
        """
        @param fd: the inherited descriptor's number.
        @param domain: its address family without C{AF_}: C{INET},
            C{INET6} or C{UNIX}.
        """
        family = getattr(socket, f"AF_{domain}", None)
        if family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
            raise ValueError(f"ssp-inherit: unknown domain {domain!r}")
        return AdoptedStreamServerEndpoint(reactor, int(fd), family)


@implementer(IPlugin, IStreamServerEndpointStringParser)
class ReusePortParser:
    prefix = "ssp-reuseport"

    def parseStreamServer(self, reactor, port, interface="", backlog=50):
        """
        The arguments of C{tcp:}, in its order.
        """
        from ssp.workers import ReusePortEndpoint

        return ReusePortEndpoint(reactor, int(port), interface, int(backlog))


sspInheritedSocket = InheritedSocketParser()
sspReusePort = ReusePortParser()
