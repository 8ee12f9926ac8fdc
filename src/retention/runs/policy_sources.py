"""Which policy a preview compares: a file, or ``REV:PATH`` read with git from a repository
(default: the project's checkout; ``RETENTION_POLICY_REPO`` to change it), and what differs
between two policies rule by rule."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from retention import config
from retention.domain.policy import Policy, PolicyError, parse_policy

DEFAULT_POLICY_PATH = "include/policies/retention.yaml"


@dataclass(frozen=True)
class PolicySource:
    """A loaded policy and where it came from (``commit`` when read from git)."""

    spec: str
    policy: Policy
    text: bytes
    commit: str | None = None

    def describe(self) -> dict:
        return {
            "source": self.policy.source, "version": self.policy.version, "label": self.policy.version_label,
            "commit": self.commit,
        }


def policy_repo(repo: str | Path | None = None) -> Path:
    return Path(repo or os.environ.get("RETENTION_POLICY_REPO") or config.PROJECT_ROOT)


def _git(repo: Path, *args: str) -> tuple[int, bytes, str]:
    try:
        out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, timeout=60)
    except FileNotFoundError:
        raise PolicyError("git is not installed; give the policy as a file instead") from None
    except subprocess.TimeoutExpired:
        raise PolicyError(f"git {args[0]} in {repo} timed out") from None
    lines = out.stderr.decode(errors="replace").strip().splitlines()
    return out.returncode, out.stdout, (lines[-1] if lines else "")


def read_git_policy(rev: str, path: str, repo: str | Path | None = None) -> PolicySource:
    """The policy file ``path`` as committed in revision ``rev`` of the git repository ``repo``."""
    repo_dir = policy_repo(repo)
    spec = f"{rev}:{path}"
    if not rev or not path or rev.startswith("-") or "\n" in spec:
        raise PolicyError(f"{spec}: expected REV:PATH, e.g. HEAD:{DEFAULT_POLICY_PATH}")
    rc, out, err = _git(repo_dir, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    commit = out.decode().strip()
    if rc != 0 or not commit:
        why = f": {err}" if err else ""
        raise PolicyError(f"{spec}: {rev!r} is not a revision of the git repository {repo_dir}{why}")
    rc, data, err = _git(repo_dir, "cat-file", "blob", f"{commit}:{path.removeprefix('./')}")
    if rc != 0:
        raise PolicyError(f"{spec}: revision {rev} ({commit[:12]}) of {repo_dir} has no file {path!r}")
    return PolicySource(spec, parse_policy(data, source=spec), data, commit)


def _find_file(spec: str) -> Path | None:
    """A relative path is tried from the working directory, then from the project root."""
    path = Path(spec)
    for candidate in [path] if path.is_absolute() else [path, config.PROJECT_ROOT / path]:
        if candidate.is_file():
            return candidate
    return None


def read_policy(spec: str, repo: str | Path | None = None) -> PolicySource:
    """A policy from a file path, or from git when ``spec`` is ``REV:PATH`` and no such file exists."""
    spec = str(spec or "").strip()
    if not spec:
        raise PolicyError("no policy given")
    path = _find_file(spec)
    if path is not None:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise PolicyError(f"{path}: cannot read policy file: {exc.strerror}") from None
        return PolicySource(spec, parse_policy(data, source=str(path)), data)
    if ":" in spec:
        rev, _, rel = spec.partition(":")
        return read_git_policy(rev, rel, repo)
    raise PolicyError(f"{spec}: cannot read policy file: no such file (for a git revision write REV:PATH)")


def old_rev_spec(rev: str, new_spec: str, repo: str | Path | None = None) -> str:
    """``--old-rev REV``: the new policy's own file as of REV when it lies in the repository,
    else the project's policy path as of REV."""
    path = _find_file(new_spec)
    if path is not None:
        try:
            return f"{rev}:{path.resolve().relative_to(policy_repo(repo).resolve()).as_posix()}"
        except ValueError:
            pass
    return f"{rev}:{DEFAULT_POLICY_PATH}"


def policy_changes(old: Policy, new: Policy) -> list[str]:
    """What differs between two policies, rule by rule, in words (no data involved)."""
    out = []
    old_rules = {r.id: r.model_dump(by_alias=True) for r in old.rules}
    new_rules = {r.id: r.model_dump(by_alias=True) for r in new.rules}
    for rule_id in sorted(old_rules.keys() | new_rules.keys()):
        a, b = old_rules.get(rule_id), new_rules.get(rule_id)
        if a is None:
            out.append(f"rule {rule_id}: added ({b['records']}, {b['period']})")
        elif b is None:
            out.append(f"rule {rule_id}: removed")
        else:
            diffs = [f"{k} {a[k]!r} -> {b[k]!r}" for k in a if a[k] != b.get(k)]
            if diffs:
                out.append(f"rule {rule_id}: " + ", ".join(diffs))
    for name in ("timezone", "protections", "plan_guard"):
        if getattr(old, name) != getattr(new, name):
            out.append(f"{name} changed")
    return out


def load_policies(old_spec: str, new_spec: str, repo: str | Path | None = None) -> tuple[PolicySource, PolicySource]:
    return read_policy(old_spec, repo), read_policy(new_spec, repo)
