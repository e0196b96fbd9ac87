"""From a verified identity (DN + FQANs) to a local account.

Order of decisions, each one final:

1. the ban list: a banned DN, or any FQAN at or below a banned FQAN, is denied (203);
2. a fixed account (``--account nobody``) when one is configured;
3. the grid-mapfile: FQAN lines first (the proxy's FQANs in order, primary
   first), then the DN line; no line means denied (203);
4. a ``.prefix`` target is a pool: an account is leased through the gridmapdir.

The gridmapdir follows gLExec/LCMAPS: every pool account is a file named
after it; a free account has link count 1; a lease is a hard link to it named
after the URL-encoded, lower-cased DN (``:<fqan>`` appended for FQAN pools).
Unlike LCMAPS, leases expire: a lease whose mtime is older than the expiry is
released by the next wrapper that needs an account. Use refreshes the mtime
(:meth:`GridmapDir.touch`), and a running job touches its lease periodically.

Races are settled with link(2) and rename(2), both atomic on one filesystem:
a new lease is ``link(account, lease)`` followed by a check that the account
now has exactly two links (a third means another wrapper won the same account
at the same moment, and we back off); a release first renames the lease to a
private name and re-checks its mtime there, restoring it if a user touched it
in between. Time is a parameter (``now``, seconds since the epoch).
"""

from __future__ import annotations

import errno
import os
import pwd
import secrets
import stat
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from broker.errors import DnSyntaxError
from broker.fileio import validate_component
from payload_wrapper.errors import AuthorizationDenied, ClientError, WrapperSystemError

__all__ = [
    "Account",
    "BanList",
    "GridmapDir",
    "GridmapEntry",
    "Mapping",
    "is_fqan",
    "lease_name",
    "lookup_account",
    "map_identity",
    "normalize_fqan",
    "parse_ban_text",
    "parse_gridmapfile",
]

_MAX_NAME = 255
_ATTEMPTS = 16


# --------------------------------------------------------------------------- accounts


@dataclass(frozen=True)
class Account:
    """A local account the payload may run as."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary groups, from the group database
    home: str


def lookup_account(name: str) -> Account:
    """The account ``name`` from the password database; 202 when it does not exist."""
    try:
        validate_component(name, what="account name")
    except DnSyntaxError as exc:
        raise WrapperSystemError(
            f"the mapping gave an unusable account name: {exc.message}"
        ) from None
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise WrapperSystemError(
            f"the account {name!r} chosen by the mapping does not exist on this node; "
            "the site admin must create it or fix the grid-mapfile",
            reason="no_account",
        ) from None
    groups = tuple(g for g in os.getgrouplist(name, entry.pw_gid) if g != entry.pw_gid)
    return Account(entry.pw_name, entry.pw_uid, entry.pw_gid, groups, entry.pw_dir)


# --------------------------------------------------------------------------- FQANs and bans


def is_fqan(text: str) -> bool:
    """True for ``/atlas/Role=pilot`` (first component without '='), false for a DN."""
    first = text.lstrip("/").split("/", 1)[0]
    return text.startswith("/") and "=" not in first


def normalize_fqan(fqan: str) -> str:
    """Drop the ``Role=NULL`` / ``Capability=NULL`` padding VOMS adds."""
    parts = [p for p in fqan.split("/") if p and p not in ("Role=NULL", "Capability=NULL")]
    return "/" + "/".join(parts)


def _fqan_under(fqan: str, pattern: str) -> bool:
    fqan, pattern = normalize_fqan(fqan), normalize_fqan(pattern)
    return fqan == pattern or fqan.startswith(pattern + "/")


def _unquote_line(line: str) -> str:
    line = line.strip()
    if len(line) >= 2 and line[0] == line[-1] == '"':
        return line[1:-1]
    return line


def parse_ban_text(text: str) -> tuple[str, ...]:
    """One DN or FQAN per line (quotes optional); ``#`` starts a comment line."""
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            out.append(_unquote_line(line))
    return tuple(out)


def ban_entry(text: str) -> str:
    """A ban entry as the list compares it: a DN (``/DC=…/CN=…``) or an FQAN (``/vo/group``,
    also written ``fqan:/vo/group`` as in policies and ``allowed_owners``).

    Anything else is refused: an entry that could never match would ban nobody silently.
    """
    entry = text.strip()
    if entry.lower().startswith("fqan:"):
        fqan = entry[5:].strip()
        if not is_fqan(fqan):
            raise WrapperSystemError(
                f"the ban entry {text!r} is not an FQAN: write fqan:/vo[/group][/Role=role]",
                reason="bad_ban",
            )
        return fqan
    if not entry.startswith("/") or entry == "/":
        raise WrapperSystemError(
            f"the ban entry {text!r} is neither a DN (/DC=org/.../CN=name) nor an FQAN "
            "(/vo/group or fqan:/vo/group); it would ban nobody",
            reason="bad_ban",
        )
    return entry


@dataclass(frozen=True)
class BanList:
    """Banned DNs (compared without case) and FQANs (a group bans everything below it)."""

    entries: tuple[str, ...] = ()

    @classmethod
    def from_sources(cls, entries: Iterable[str], ban_file: Path | None) -> BanList:
        items = list(entries)
        if ban_file is not None:
            try:
                items.extend(parse_ban_text(ban_file.read_text(encoding="utf-8")))
            except FileNotFoundError:
                raise WrapperSystemError(
                    f"the ban file {ban_file} does not exist; a configured ban list must be "
                    "readable, so the wrapper refuses to run without it"
                ) from None
            except (OSError, UnicodeDecodeError) as exc:
                raise WrapperSystemError(f"cannot read the ban file {ban_file}: {exc}") from exc
        return cls(tuple(ban_entry(item) for item in items))

    @property
    def has_fqans(self) -> bool:
        return any(is_fqan(e) for e in self.entries)

    def match(self, dn: str, fqans: Sequence[str]) -> str | None:
        """The ban entry that hits this identity, or None."""
        for entry in self.entries:
            if is_fqan(entry):
                if any(_fqan_under(f, entry) for f in fqans):
                    return entry
            elif entry.casefold() == dn.casefold():
                return entry
        return None


# --------------------------------------------------------------------------- grid-mapfile


@dataclass(frozen=True)
class GridmapEntry:
    pattern: str  # a DN, or an FQAN (optionally ending in /*)
    target: str  # an account, or .prefix for a pool
    line: int

    @property
    def is_fqan(self) -> bool:
        return is_fqan(self.pattern)

    def matches_fqan(self, fqan: str) -> bool:
        if self.pattern.endswith("/*"):
            return _fqan_under(fqan, self.pattern[:-2])
        return normalize_fqan(fqan) == normalize_fqan(self.pattern)


def parse_gridmapfile(text: str, *, source: str = "grid-mapfile") -> list[GridmapEntry]:
    """``"DN" account``, ``"DN" .pool``, ``"/vo/Role=x" .pool``; comma lists take the first."""
    entries = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith('"'):
            end = line.find('"', 1)
            if end < 0:
                raise WrapperSystemError(f"{source} line {number}: the quoted DN is not closed")
            pattern, rest = line[1:end], line[end + 1 :].strip()
        else:
            pattern, _, rest = line.rpartition(" ")
            pattern, rest = pattern.strip(), rest.strip()
        target = rest.split(",")[0].strip()
        if not pattern.startswith("/") or not target:
            raise WrapperSystemError(
                f"{source} line {number} is not '\"DN\" account' or '\"FQAN\" .pool': {raw!r}"
            )
        entries.append(GridmapEntry(pattern, target, number))
    return entries


# --------------------------------------------------------------------------- gridmapdir


def lease_name(dn: str, fqan: str | None = None) -> str:
    """The lease file name: the URL-encoded DN, ``:<encoded FQAN>`` for VOMS pools.

    Unlike gLExec the case is kept: DNs are case-sensitive identities, and lower-casing
    would let ``CN=Alice`` and ``CN=alice`` share one pool account (and its files).
    """
    name = urllib.parse.quote(dn, safe="")
    if fqan is not None:
        name += ":" + urllib.parse.quote(normalize_fqan(fqan), safe="")
    if len(name.encode()) > _MAX_NAME:
        raise ClientError(
            f"the DN {dn!r} is too long to be leased a pool account (the encoded lease name "
            f"would exceed {_MAX_NAME} bytes)",
            reason="dn_too_long",
        )
    return name


class GridmapDir:
    """Pool-account leases in a gridmapdir, with expiry (see the module docstring)."""

    def __init__(self, path: Path, *, expiry: float) -> None:
        self.path = path
        self.expiry = expiry
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise WrapperSystemError(
                f"the gridmapdir {path} is not usable ({exc.strerror}); the admin must create it"
            ) from exc
        if not stat.S_ISDIR(st.st_mode):
            raise WrapperSystemError(f"the gridmapdir {path} is not a directory")
        if st.st_mode & 0o002:
            raise WrapperSystemError(
                f"the gridmapdir {path} is world-writable; anyone could forge leases: "
                f"run chmod o-w {path}"
            )

    def _pool(self, prefix: str) -> list[tuple[str, os.stat_result]]:
        found = []
        for name in sorted(os.listdir(self.path)):
            if not name.startswith(prefix) or name.startswith(("%", ".")) or ":" in name:
                continue
            try:
                st = os.lstat(self.path / name)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                found.append((name, st))
        return found

    def _expired(self, st: os.stat_result, now: float) -> bool:
        return now - st.st_mtime > self.expiry

    def touch(self, lease: str, now: float) -> None:
        """Mark the lease as used at ``now``; raises FileNotFoundError if it is gone."""
        os.utime(self.path / lease, (now, now), follow_symlinks=False)

    def lease(self, dn: str, prefix: str, *, now: float, fqan: str | None = None) -> str:
        """The pool account (name) leased to ``dn``: the existing lease, or a new one."""
        name = lease_name(dn, fqan)
        pool = prefix.lstrip(".")
        for _ in range(_ATTEMPTS):
            account = self._existing(name, pool, now)
            if account is not None:
                return account
            self.release_expired(now, pool=pool)
            account = self._new_lease(name, pool, now)
            if account is not None:
                return account
        raise WrapperSystemError(
            f"could not settle a lease in {self.path} after {_ATTEMPTS} attempts; "
            "another process keeps changing it"
        )

    def _existing(self, name: str, pool: str, now: float) -> str | None:
        lease_path = self.path / name
        try:
            self.touch(name, now)  # touch first: a releaser that renamed it sees the new mtime
            st = os.lstat(lease_path)
        except FileNotFoundError:
            return None
        for account, ast in self._pool(pool):
            if (ast.st_ino, ast.st_dev) == (st.st_ino, st.st_dev):
                return account
        if st.st_nlink == 1:
            # A lease whose account file was removed by the admin: a dangling name.
            self._unlink_quietly(lease_path)
            return None
        raise WrapperSystemError(
            f"the lease {lease_path} does not point to an account of the pool '{pool}' "
            "(its account may have been removed from the pool); the admin must remove the lease"
        )

    def _new_lease(self, name: str, pool: str, now: float) -> str | None:
        accounts = self._pool(pool)
        if not accounts:
            raise WrapperSystemError(
                f"the gridmapdir {self.path} holds no account of the pool '.{pool}'; "
                "the admin must create one file per pool account there"
            )
        for account, ast in accounts:
            if ast.st_nlink != 1:
                continue
            lease_path = self.path / name
            try:
                os.link(self.path / account, lease_path, follow_symlinks=False)
            except FileExistsError:
                return None  # another wrapper leased for the same DN: use theirs
            st = os.lstat(self.path / account)
            if st.st_nlink == 2:
                self.touch(name, now)
                return account
            # Someone else linked the same account at the same moment: back off.
            self._unlink_quietly(lease_path)
        raise WrapperSystemError(
            f"all {len(accounts)} accounts of the pool '.{pool}' in {self.path} are leased; "
            "retry later, or ask the site admin to add accounts or shorten the lease expiry",
            reason="pool_exhausted",
        )

    def release_expired(self, now: float, *, pool: str | None = None) -> list[str]:
        """Release every lease unused for longer than the expiry; returns the lease names."""
        released = []
        for name in sorted(os.listdir(self.path)):
            if not name.startswith("%"):
                continue
            path = self.path / name
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode) or not self._expired(st, now):
                continue
            if self._release(path, now):
                released.append(name)
        return released

    def _release(self, path: Path, now: float) -> bool:
        hidden = self.path / f".release-{secrets.token_hex(8)}"
        try:
            os.rename(path, hidden)
        except FileNotFoundError:
            return False
        try:
            st = os.lstat(hidden)
            if not self._expired(st, now):
                # A wrapper touched it between our check and the rename: give it back.
                try:
                    os.link(hidden, path, follow_symlinks=False)
                except FileExistsError:
                    pass
                return False
            return True
        finally:
            self._unlink_quietly(hidden)

    def release(self, dn: str, fqan: str | None = None) -> None:
        """Give the lease of ``dn`` back now (an admin action; jobs leave leases to expire)."""
        self._unlink_quietly(self.path / lease_name(dn, fqan))

    @staticmethod
    def _unlink_quietly(path: Path) -> None:
        try:
            os.unlink(path)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise


# --------------------------------------------------------------------------- the decision


@dataclass(frozen=True)
class Mapping:
    """The outcome of authorization and mapping."""

    account: Account
    rule: str  # how: "fixed", "gridmapfile line 3", "pool .atlpilot (lease ...)"
    lease: str | None = None  # the lease file name, to touch while the job runs


def map_identity(
    dn: str,
    fqans: Sequence[str],
    *,
    bans: BanList,
    account: str | None = None,
    gridmap: Sequence[GridmapEntry] = (),
    gridmapdir: GridmapDir | None = None,
    gridmap_source: str = "grid-mapfile",
    now: float,
    caller_uid: int,
    switching: bool = True,
) -> Mapping:
    """Authorize ``dn``/``fqans`` and choose the local account (see the module docstring)."""
    banned = bans.match(dn, fqans)
    if banned is not None:
        raise AuthorizationDenied(
            f"the credential of {dn} is banned on this node (ban list entry {banned!r}); "
            "contact the site or VO admins if you think this is wrong",
            reason="banned",
        )
    lease: str | None = None
    if account is not None:
        name, rule = account, "fixed account"
    else:
        entry = _find_entry(dn, fqans, gridmap)
        if entry is None:
            shown = ", ".join(fqans) if fqans else "none"
            raise AuthorizationDenied(
                f"no {gridmap_source} entry maps {dn} (FQANs: {shown}) to a local account; "
                "ask the site admin to add your DN or VO role",
                reason="not_mapped",
            )
        if entry.target.startswith("."):
            if gridmapdir is None:
                raise WrapperSystemError(
                    f"{gridmap_source} line {entry.line} maps to the pool {entry.target}, but "
                    "no gridmapdir is configured; set gridmapdir"
                )
            fqan = _first_matching_fqan(entry, fqans)
            name = gridmapdir.lease(dn, entry.target, now=now, fqan=fqan)
            lease = lease_name(dn, fqan)
            rule = f"pool {entry.target} ({gridmap_source} line {entry.line})"
        else:
            name, rule = entry.target, f"{gridmap_source} line {entry.line}"
    target = lookup_account(name)
    if switching and target.uid == 0:
        raise AuthorizationDenied(
            f"the mapping ({rule}) chose {name}, which is root; payloads never run as root",
            reason="root_target",
        )
    if switching and target.uid == caller_uid:
        raise AuthorizationDenied(
            f"the mapping ({rule}) chose {name}, the caller's own account; the payload must "
            "run under a different account from the pilot (or use mode none)",
            reason="caller_target",
        )
    return Mapping(target, rule, lease)


def _find_entry(
    dn: str, fqans: Sequence[str], gridmap: Sequence[GridmapEntry]
) -> GridmapEntry | None:
    for fqan in fqans:
        for entry in gridmap:
            if entry.is_fqan and entry.matches_fqan(fqan):
                return entry
    for entry in gridmap:
        if not entry.is_fqan and entry.pattern == dn:
            return entry
    return None


def _first_matching_fqan(entry: GridmapEntry, fqans: Sequence[str]) -> str | None:
    if not entry.is_fqan:
        return None
    return next((f for f in fqans if entry.matches_fqan(f)), None)
