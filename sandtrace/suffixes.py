"""Registrable domains by the Public Suffix List: `pypi.org` for `files.pypi.org`, but
`example.co.uk` for `www.example.co.uk` and `alice.github.io` for `alice.github.io` (each
name below a public suffix belongs to someone else), so that a wildcard proposed for names
never spans owners.

The list is the distribution's copy (Debian's `publicsuffix` package); where it is missing,
no registrable domain is known and nothing is grouped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

PUBLIC_SUFFIX_LIST = Path("/usr/share/publicsuffix/public_suffix_list.dat")


@dataclass(slots=True)
class PublicSuffixes:
    """The list's rules: plain (`co.uk`), wildcards (`*.ck`: every label below ck) and
    exceptions (`!www.ck`: not a suffix after all)."""

    rules: set[str] = field(default_factory=set)
    wildcards: set[str] = field(default_factory=set)
    exceptions: set[str] = field(default_factory=set)

    @classmethod
    def parse(cls, text: str) -> PublicSuffixes:
        out = cls()
        for line in text.splitlines():
            rule = line.strip().split(" ", 1)[0].lower()
            if not rule or rule.startswith("//"):
                continue
            if rule.startswith("!"):
                out.exceptions.add(rule[1:])
            elif rule.startswith("*."):
                out.wildcards.add(rule[2:])
            else:
                out.rules.add(rule)
        return out

    @classmethod
    def read(cls, path: Path = PUBLIC_SUFFIX_LIST) -> PublicSuffixes | None:
        """The list at path; None when it cannot be read."""
        try:
            return cls.parse(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            return None

    def registrable(self, name: str) -> str | None:
        """The registrable domain of name (its public suffix and one label more), or None
        when name is itself a public suffix. The longest rule that matches wins, an
        exception over the others."""
        labels = name.split(".")
        for i in range(len(labels)):
            candidate = ".".join(labels[i:])
            parent = ".".join(labels[i + 1 :])
            if candidate in self.exceptions:
                suffix_at = i + 1  # the exception's own name is registrable
            elif candidate in self.rules or (parent and parent in self.wildcards):
                suffix_at = i
            else:
                continue
            return ".".join(labels[suffix_at - 1 :]) if suffix_at > 0 else None
        # no rule: the list's default rule `*`, the last label is the suffix
        return ".".join(labels[-2:]) if len(labels) > 1 else None
