"""
twistd dropin for the Spine Security Proxy: C{twistd ssp}.

Only a L{ServiceMaker} lives here so that every twistd invocation, which
scans all dropins, stays cheap; the real code is in L{ssp.tap}.
"""

from twisted.application.service import ServiceMaker

sspServiceMaker = ServiceMaker(
    "Spine Security Proxy",
    "ssp.tap",
    "A mutual-TLS forwarding proxy enforcing Spine authorisation for GP Connect.",
    "ssp",
)
