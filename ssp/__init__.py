"""
The Spine Security Proxy: a mutual-TLS forwarding proxy enforcing Spine
authorisation for GP Connect.  C{twistd ssp} runs it; C{ssp} is the
operator command.
"""

#: The one place the version is written: setup.cfg, C{ssp --version},
#: C{twistd ssp --version}, the startup log line and C{ssp_build_info}.
__version__ = "0.1.0"
