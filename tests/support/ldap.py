"""A real OpenLDAP slapd on a loopback port, with its own configuration, data and test CA.

Independent of any system slapd: its own slapd.conf, database directory, pid file and port.
The directory holds a service account, users (some with names a filter would misread), groups
(groupOfNames with member DNs) and a group named like the reserved `anonymous`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tests.support.harness import Process, free_port
from tests.support.polling import wait_until

if TYPE_CHECKING:
    import trustme

SLAPD_BIN = shutil.which("slapd") or "/usr/sbin/slapd"
SLAPADD_BIN = shutil.which("slapadd") or "/usr/sbin/slapadd"
LDAPWHOAMI_BIN = shutil.which("ldapwhoami") or "/usr/bin/ldapwhoami"
LDAPMODIFY_BIN = shutil.which("ldapmodify") or "/usr/bin/ldapmodify"
SCHEMAS = Path("/etc/ldap/schema")
MODULES = Path("/usr/lib/ldap")

SUFFIX = "dc=example,dc=org"
PEOPLE = f"ou=people,{SUFFIX}"
GROUPS = f"ou=groups,{SUFFIX}"
SERVICE_DN = f"cn=reader,{SUFFIX}"
SERVICE_PASSWORD = "reader-secret"
ROOT_DN = f"cn=admin,{SUFFIX}"
ROOT_PASSWORD = "admin-secret"
# uid -> password; `we(ird)*` is a real name a filter must match literally.
LDAP_USERS = {
    "dave": "dave-directory-pw",
    "erin": "erin-directory-pw",
    "frank": "frank-directory-pw",
    "we(ird)*": "weird-directory-pw",
}
# group cn -> member uids
LDAP_GROUPS = {
    "builders": ["dave", "we(ird)*"],
    "readers": ["erin"],
    # A directory group may not make anyone `@anonymous` (the proxy drops it).
    "anonymous": ["frank"],
}


def user_dn(uid: str) -> str:
    escaped = "".join("\\" + c if c in ',+"\\<>;=#' else c for c in uid)
    return f"uid={escaped},{PEOPLE}"


def _ldif() -> str:
    entries = [
        f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\no: Example\ndc: example",
        f"dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people",
        f"dn: {GROUPS}\nobjectClass: organizationalUnit\nou: groups",
        f"dn: {SERVICE_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\n"
        f"cn: reader\nuserPassword: {SERVICE_PASSWORD}",
    ]
    for uid, password in LDAP_USERS.items():
        entries.append(
            f"dn: {user_dn(uid)}\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: {uid}\n"
            f"sn: {uid}\nuserPassword: {password}"
        )
    for name, members in LDAP_GROUPS.items():
        lines = [f"dn: cn={name},{GROUPS}", "objectClass: groupOfNames", f"cn: {name}"]
        lines += [f"member: {user_dn(uid)}" for uid in members]
        entries.append("\n".join(lines))
    return "\n\n".join(entries) + "\n"


@dataclass
class Slapd:
    """slapd with StartTLS (a certificate from `ca`) on ldap://127.0.0.1:PORT/, and ldaps://
    on TLS_PORT."""

    root: Path
    ca: trustme.CA
    port: int = field(default_factory=free_port)
    tls_port: int = field(default_factory=free_port)
    process: Process | None = None

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def tls_url(self) -> str:
        return f"ldaps://127.0.0.1:{self.tls_port}"

    @property
    def ca_file(self) -> Path:
        return self.root / "ca.pem"

    def write(self) -> None:
        """Configuration, certificates and the database, loaded offline with slapadd."""
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        cert = self.ca.issue_cert("127.0.0.1", "localhost")
        cert.private_key_pem.write_to_path(str(self.root / "key.pem"))
        cert.cert_chain_pems[0].write_to_path(str(self.root / "cert.pem"))
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        includes = "\n".join(
            f"include {SCHEMAS / name}.schema"
            for name in ("core", "cosine", "inetorgperson", "nis")
        )
        (self.root / "slapd.conf").write_text(
            f"""{includes}
modulepath {MODULES}
moduleload back_mdb
pidfile {self.root / "slapd.pid"}
argsfile {self.root / "slapd.args"}
# As many directories do (RFC 4513 5.1.2): a DN with an empty password binds, unauthenticated.
allow bind_anon_dn
TLSCACertificateFile {self.ca_file}
TLSCertificateFile {self.root / "cert.pem"}
TLSCertificateKeyFile {self.root / "key.pem"}
database mdb
maxsize 10485760
suffix "{SUFFIX}"
rootdn "{ROOT_DN}"
rootpw {ROOT_PASSWORD}
directory {data}
access to attrs=userPassword by anonymous auth by * none
access to * by users read by * none
"""
        )
        (self.root / "data.ldif").write_text(_ldif())
        subprocess.run(
            [SLAPADD_BIN, "-f", str(self.root / "slapd.conf"), "-l", str(self.root / "data.ldif")],
            check=True,
            capture_output=True,
        )

    def start(self) -> None:
        if not (self.root / "slapd.conf").exists():
            self.write()
        # -d 0: stay in the foreground (a child the test can kill), logging nothing extra.
        urls = f"{self.url}/ {self.tls_url}/"
        args = [SLAPD_BIN, "-f", str(self.root / "slapd.conf"), "-h", urls, "-d", "0"]
        self.process = Process(args, self.root / "slapd.log")
        self.process.start()
        process = self.process

        def answers() -> bool:
            process.check_alive()
            return self.answers()

        wait_until(answers, "slapd to answer")

    def whoami(self, dn: str, password: str) -> subprocess.CompletedProcess[str]:
        """ldapwhoami as `dn`: what the directory itself says of a simple bind."""
        return subprocess.run(
            [LDAPWHOAMI_BIN, "-x", "-H", self.url, "-D", dn, "-w", password],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
            env={**os.environ, "LDAPTLS_REQCERT": "never"},
        )

    def modify(self, ldif: str) -> None:
        """ldapmodify as the directory's root (`-a`: entries without changetype are added;
        `-M`: a referral entry is stored as an entry, not followed)."""
        subprocess.run(
            [LDAPMODIFY_BIN, "-a", "-M", "-x", "-H", self.url, "-D", ROOT_DN, "-w", ROOT_PASSWORD],
            input=ldif,
            text=True,
            check=True,
            capture_output=True,
            timeout=10,
        )

    def answers(self) -> bool:
        return self.whoami(SERVICE_DN, SERVICE_PASSWORD).returncode == 0

    def kill(self) -> None:
        """SIGKILL: the directory is gone at once (its data stays for a restart)."""
        assert self.process is not None and self.process.popen is not None
        self.process.popen.kill()
        self.process.popen.wait(10)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def proxy_env(self, **overrides: str) -> dict[str, str]:
        """The proxy's `ldap` settings for this directory (StartTLS with the test CA)."""
        password_file = self.root / "bind-password"
        password_file.write_text(SERVICE_PASSWORD + "\n")
        password_file.chmod(0o600)
        env = {
            "PROXY_LDAP_URL": self.url,
            "PROXY_LDAP_START_TLS": "true",
            "PROXY_LDAP_CA_FILE": str(self.ca_file),
            "PROXY_LDAP_BIND_DN": SERVICE_DN,
            "PROXY_LDAP_BIND_PASSWORD_FILE": str(password_file),
            "PROXY_LDAP_USER_BASE": PEOPLE,
            "PROXY_LDAP_GROUP_BASE": GROUPS,
            "PROXY_LDAP_TIMEOUT": "2",
        }
        env.update(overrides)
        return env
