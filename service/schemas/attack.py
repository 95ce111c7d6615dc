"""MITRE ATT&CK (Enterprise) ids and names for the Sigma ``attack.*`` tags sandtrace's rules use.

A rule's tags name tactics by their short name (``attack.command-and-control``) and
techniques by id (``attack.t1059.004``); a SIEM wants both the id and the name of each
(ECS ``threat.*``, OCSF ``attack``). The table holds every tactic of the Enterprise matrix
and the techniques and sub-techniques the built-in rules (rules/*.yml) name; a test keeps it
complete for them. A tag it does not know still gives its id, without a name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ATTACK_URL = "https://attack.mitre.org"

# Sigma's tactic tag (the tactic's short name) -> (tactic id, name)
TACTICS: dict[str, tuple[str, str]] = {
    "reconnaissance": ("TA0043", "Reconnaissance"),
    "resource-development": ("TA0042", "Resource Development"),
    "initial-access": ("TA0001", "Initial Access"),
    "execution": ("TA0002", "Execution"),
    "persistence": ("TA0003", "Persistence"),
    "privilege-escalation": ("TA0004", "Privilege Escalation"),
    "defense-evasion": ("TA0005", "Defense Evasion"),
    "credential-access": ("TA0006", "Credential Access"),
    "discovery": ("TA0007", "Discovery"),
    "lateral-movement": ("TA0008", "Lateral Movement"),
    "collection": ("TA0009", "Collection"),
    "command-and-control": ("TA0011", "Command and Control"),
    "exfiltration": ("TA0010", "Exfiltration"),
    "impact": ("TA0040", "Impact"),
}

# technique or sub-technique id -> name (a sub-technique's name without its technique's)
TECHNIQUES: dict[str, str] = {
    "T1018": "Remote System Discovery",
    "T1021": "Remote Services",
    "T1021.004": "SSH",
    "T1027": "Obfuscated Files or Information",
    "T1036": "Masquerading",
    "T1036.004": "Masquerade Task or Service",
    "T1036.005": "Match Legitimate Resource Name or Location",
    "T1041": "Exfiltration Over C2 Channel",
    "T1046": "Network Service Discovery",
    "T1059": "Command and Scripting Interpreter",
    "T1059.004": "Unix Shell",
    "T1059.006": "Python",
    "T1070": "Indicator Removal",
    "T1070.004": "File Deletion",
    "T1071": "Application Layer Protocol",
    "T1090": "Proxy",
    "T1095": "Non-Application Layer Protocol",
    "T1105": "Ingress Tool Transfer",
    "T1133": "External Remote Services",
    "T1140": "Deobfuscate/Decode Files or Information",
    "T1204": "User Execution",
    "T1204.002": "Malicious File",
    "T1496": "Resource Hijacking",
    "T1552": "Unsecured Credentials",
    "T1552.005": "Cloud Instance Metadata API",
    "T1562": "Impair Defenses",
    "T1562.001": "Disable or Modify Tools",
    "T1564": "Hide Artifacts",
    "T1564.001": "Hidden Files and Directories",
    "T1571": "Non-Standard Port",
    "T1572": "Protocol Tunneling",
    "T1580": "Cloud Infrastructure Discovery",
    "T1610": "Deploy Container",
    "T1611": "Escape to Host",
    "T1620": "Reflective Code Loading",
}

_TECHNIQUE_TAG = re.compile(r"^attack\.(t\d{4})(?:\.(\d{3}))?$", re.IGNORECASE)
_TACTIC_TAG = re.compile(r"^attack\.([a-z][a-z-]*)$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Named:
    """A tactic, technique or sub-technique: its id, name ("" when not in the table) and page."""

    id: str
    name: str
    reference: str


@dataclass(frozen=True, slots=True)
class Attack:
    """What a rule's tags say of ATT&CK, in the order the tags name them."""

    tactics: list[Named]
    techniques: list[Named]
    subtechniques: list[Named]  # each under the technique its id starts with


def technique(technique_id: str) -> Named:
    """A technique (T1059) or sub-technique (T1059.004) with its name and page."""
    return Named(
        technique_id,
        TECHNIQUES.get(technique_id, ""),
        f"{ATTACK_URL}/techniques/{technique_id.replace('.', '/')}/",
    )


def attack_of(tags: list[str]) -> Attack:
    """The tactics, techniques and sub-techniques named by Sigma-style ATT&CK tags:
    ``attack.t1059.004`` gives technique T1059 and sub-technique T1059.004,
    ``attack.command-and-control`` the tactic TA0011 Command and Control. A tactic tag the
    table does not know (not a tactic, e.g. ``attack.s0002`` software) is left out."""
    tactics: list[Named] = []
    techniques: list[Named] = []
    subtechniques: list[Named] = []
    for tag in tags:
        if m := _TECHNIQUE_TAG.match(tag):
            t = technique(m.group(1).upper())
            if t not in techniques:
                techniques.append(t)
            if m.group(2):
                sub = technique(f"{t.id}.{m.group(2)}")
                if sub not in subtechniques:
                    subtechniques.append(sub)
        elif (m := _TACTIC_TAG.match(tag)) and m.group(1).lower() in TACTICS:
            tactic_id, name = TACTICS[m.group(1).lower()]
            tactic = Named(tactic_id, name, f"{ATTACK_URL}/tactics/{tactic_id}/")
            if tactic not in tactics:
                tactics.append(tactic)
    return Attack(tactics, techniques, subtechniques)
