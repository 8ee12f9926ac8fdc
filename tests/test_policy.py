import subprocess
import sys

import pytest

from retention.config import DEFAULT_POLICY
from retention.domain.policy import PolicyError, load_policy, parse_policy

TEXT = DEFAULT_POLICY.read_text()


def test_shipped_policy_covers_every_rule_of_the_brief():
    policy = load_policy(DEFAULT_POLICY)
    assert {r.id for r in policy.rules} == {
        "newsletter-unsubscribed", "newsletter-pending", "former-member-contact", "lead", "event-participation",
        "course-registration", "survey-response", "invoice", "support-ticket", "soft-deleted-ticket", "ticket-requester",
    }
    for rule in policy.rules:
        assert rule.clause, rule.id
        if rule.period_source == "decision":
            assert rule.decided_by, rule.id
    decisions = {r.id for r in policy.rules if r.period_source == "decision"}
    assert decisions == {"newsletter-pending", "lead", "course-registration", "survey-response", "soft-deleted-ticket"}


def test_version_is_content_hash():
    a = parse_policy(TEXT, "a.yaml")
    b = parse_policy(TEXT + "\n# a comment\n", "b.yaml")
    assert a.version == parse_policy(TEXT, "c.yaml").version
    assert a.version != b.version


@pytest.mark.parametrize(
    "old,new,expected",
    [
        ("period: P1Y\n    period_source: decision", "period: P1Q\n    period_source: decision",
         "bad.yaml: rule 'lead' (rules[3]), field 'period': 'P1Q' is not an ISO 8601 duration"),
        ("clock: course_end", "clock: course_start", "rule 'course-registration' (rules[5]): field 'clock'"),
        ("records: crm_invoice", "records: crm_invoices", "rule 'invoice' (rules[7]), field 'records': unknown record type"),
        ('clause: "4"\n    system: ticketing', 'clause: "9"\n    system: ticketing',
         "rule 'support-ticket' (rules[8]), field 'clause': clause '9' is not defined"),
        ("    action: erase\n\n  - id: newsletter-pending", "    action: shred\n\n  - id: newsletter-pending",
         "rule 'newsletter-unsubscribed' (rules[0]), field 'action'"),
        ("  - id: lead\n", "  - id: lead\n    colour: blue\n", "rule 'lead' (rules[3]), field 'colour': Extra inputs"),
        ("  - id: lead\n", "  - id: newsletter-pending\n", "rule 'newsletter-pending' (rules[3]), field 'id': duplicate rule id"),
        ("timezone: Europe/Stockholm", "timezone: Europe/Stokholm", "field 'timezone': Value error, unknown time zone"),
    ],
)
def test_broken_policy_names_file_rule_and_field(old, new, expected):
    assert old in TEXT
    with pytest.raises(PolicyError) as err:
        parse_policy(TEXT.replace(old, new, 1), "bad.yaml")
    assert expected.replace("Value error, ", "") in str(err.value)


def test_decision_without_decider_is_rejected():
    text = TEXT.replace('    decided_by: "IIS data protection coordinator (course material and evaluation sent within 90 days)"\n', "")
    with pytest.raises(PolicyError, match="rule 'course-registration' .*field 'decided_by'"):
        parse_policy(text, "bad.yaml")


def test_not_yaml_and_missing_file():
    with pytest.raises(PolicyError, match="x.yaml: not valid YAML"):
        parse_policy("rules: [", "x.yaml")
    with pytest.raises(PolicyError, match="nope.yaml: cannot read policy file"):
        load_policy("nope.yaml")


def test_validate_command(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "retention.cli", "policy", "validate"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "11 rules" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(TEXT.replace("period: P90D", "period: 90 days", 1))
    out = subprocess.run([sys.executable, "-m", "retention.cli", "policy", "validate", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2
    assert f"{bad}: rule 'course-registration' (rules[5]), field 'period'" in out.stderr
