"""Who sent a request: authenticators behind one seam, and the credentials they check.

`backend.py` is the seam (`Authenticator`, and `Authenticators` asking them in order); each
backend is one module (`htpasswd.py` for Basic against the user table, `ldap.py` for Basic
against an LDAP directory, `directory.py` talking to it, `tokens.py` for access tokens,
`anonymous.py` for `@anonymous`). `credentials.py` parses Basic and checks passwords with a
cache, `hashpool.py` shares the hashing threads fairly, `pacing.py` slows clients that ignore
429s, `htpasswd_file.py` reads the user table and `passwd.py` edits it for the CLI;
`tokens_file.py` reads and writes the tokens file, `atomic_file.py` rewrites either safely.
"""

from proxy.auth.anonymous import AnonymousAuthenticator
from proxy.auth.backend import Authenticator, Authenticators
from proxy.auth.credentials import CredentialChecker
from proxy.auth.htpasswd import HtpasswdAuthenticator
from proxy.auth.htpasswd_file import HtpasswdError, load_htpasswd
from proxy.auth.pacing import RefusalPacer

__all__ = [
    "AnonymousAuthenticator",
    "Authenticator",
    "Authenticators",
    "CredentialChecker",
    "HtpasswdAuthenticator",
    "HtpasswdError",
    "RefusalPacer",
    "load_htpasswd",
]
