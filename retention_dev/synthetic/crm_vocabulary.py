"""The synthetic CRM's vocabulary: its local time zone, the made-up names, places, events,
courses and surveys, and the mix of contact categories in the bulk block."""

from __future__ import annotations

from zoneinfo import ZoneInfo

import numpy as np

LOCAL_TZ = ZoneInfo("Europe/Stockholm")
DAY = 86_400

FIRST_NAMES = np.array(
    ["Alva", "Bror", "Cilla", "Dag", "Ebba", "Frej", "Greta", "Hjalmar", "Idun", "Jarl", "Kajsa", "Loke"]
)
LAST_NAMES = np.array(
    ["Exempelsson", "Testberg", "Provlund", "Syntetisk", "Påhittad", "Fiktivdal", "Modellqvist", "Demoström"]
)
ROLES = np.array(["Developer", "Identity architect", "IT manager", "Librarian", "Researcher", "Administrator"])
STREETS = np.array(["Exempelgatan", "Testvägen", "Påhittade gränd", "Synthetic Street", "Fiktiva allén"])
DOMAINS = np.array(["example.org", "example.com", "example.net"])
EVENTS = np.array(["Federation day", "eduroam workshop", "Sambi webinar", "Identity forum", "Service onboarding"])
COURSES = np.array(["SAML basics", "OIDC for operators", "Federation metadata", "MFA in practice"])
SURVEYS = np.array(["Member survey", "Service satisfaction", "Event evaluation"])

# Contact categories of the bulk block: (kind, organisation pool, due?)
NOT_DUE = (("member", "active"), ("member", "recent"), ("lead", None))
NOT_DUE_P = (0.75, 0.05, 0.20)
DUE = (("member", "old"), ("lead", None), ("lead", None), ("member", "recent"))
DUE_P = (0.50, 0.35, 0.075, 0.075)  # old former member, stale lead, opted-out lead, opted-out recent ex-member
