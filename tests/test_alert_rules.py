"""foldhpc's Prometheus alert rules (configs/prometheus/foldhpc-alerts.yml, issue 25, items 2-3).

Two kinds of check:

* Prometheus's own tool: ``promtool check rules`` (the file loads: PromQL parses, templates parse)
  and ``promtool test rules`` on tests/prometheus/foldhpc-alerts_test.yml (every rule fires where it
  must, with its labels and expanded annotations, and stays quiet where it must not). Skipped with
  the reason where promtool is not installed (Debian's ``prometheus`` package has it); with
  ``FOLDHPC_REQUIRE_PROMETHEUS=1`` (.ci/run) a failure instead, so CI cannot pass without them.
* The contract, read from the YAML itself: the group and the seven alert names of issue 25, each with
  a severity, a summary, a description and a runbook link whose anchor is a heading of
  docs/runbook.md, and every metric an expression names is one ``foldhpc metrics`` publishes
  (:data:`foldhpc.monitor.metrics.METRICS`): a renamed metric must not leave a rule that never fires.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "configs" / "prometheus" / "foldhpc-alerts.yml"
RULE_TESTS = ROOT / "tests" / "prometheus" / "foldhpc-alerts_test.yml"
RUNBOOK = ROOT / "docs" / "runbook.md"
REQUIRE_ENV = "FOLDHPC_REQUIRE_PROMETHEUS"

#: the group and alert names of issue 25 (the metric spec): the e2e test and the runbook use them
GROUP = "foldhpc"
ALERTS = ("FoldhpcRunHung", "FoldhpcCrashLoop", "FoldhpcCheckpointStale", "FoldhpcRunFailed",
          "FoldhpcPendingTooLong", "FoldhpcLowGoodput", "FoldhpcNodeImplicated")
SEVERITIES = {"critical", "warning", "info"}


def _unavailable(what: str) -> None:
    """Skip with the reason, or fail where CI requires the Prometheus tooling."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but {what}", pytrace=False)
    pytest.skip(f"{what} (set {REQUIRE_ENV}=1 to make this a failure)")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    if exe is None:
        _unavailable("promtool is not installed (Debian: apt-get install prometheus)")
    assert exe is not None
    return subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


def shown(proc: subprocess.CompletedProcess[str]) -> str:
    return f"{' '.join(proc.args)} -> exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"


def test_promtool_check_rules() -> None:
    proc = promtool("check", "rules", str(RULES.relative_to(ROOT)))
    assert proc.returncode == 0, shown(proc)
    assert f"SUCCESS: {len(ALERTS)} rules found" in proc.stdout, shown(proc)


def test_promtool_test_rules() -> None:
    """Every rule, firing and not firing (the cases are in the test file)."""
    proc = promtool("test", "rules", str(RULE_TESTS.relative_to(ROOT)))
    assert proc.returncode == 0, shown(proc)
    assert "SUCCESS" in proc.stdout, shown(proc)


def test_rule_tests_cover_every_rule_firing_and_not() -> None:
    """The unit tests name every alert with a case that fires (exp_alerts with labels and
    annotations) and one that must stay quiet (exp_alerts: [])."""
    doc = _yaml(RULE_TESTS)
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in doc["tests"]:
        for check in case["alert_rule_test"]:
            exp = check.get("exp_alerts") or []
            if not exp:
                quiet.add(check["alertname"])
            elif all(a.get("exp_labels", {}).get("severity") and a.get("exp_annotations") for a in exp):
                fires.add(check["alertname"])
    assert fires == set(ALERTS), f"no firing case with labels and annotations for {set(ALERTS) - fires}"
    assert quiet == set(ALERTS), f"no not-firing case for {set(ALERTS) - quiet}"


def _yaml(path: Path) -> Any:
    try:
        import yaml
    except ModuleNotFoundError:
        _unavailable("PyYAML is not installed (pip install pyyaml)")
    return yaml.safe_load(path.read_text())


def rules() -> list[dict[str, Any]]:
    groups = _yaml(RULES)["groups"]
    assert [g["name"] for g in groups] == [GROUP]
    return list(groups[0]["rules"])


def github_anchor(heading: str) -> str:
    """The id GitHub gives a Markdown heading: lower case, punctuation but - and _ dropped,
    spaces as -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def runbook_anchors() -> set[str]:
    text = RUNBOOK.read_text()
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.MULTILINE)
    return {github_anchor(h) for h in headings}


def test_the_seven_alerts_of_issue_25() -> None:
    assert [r.get("alert") for r in rules()] == list(ALERTS)


@pytest.mark.parametrize("name", ALERTS)
def test_rule_has_severity_summary_description_and_runbook(name: str) -> None:
    rule = next(r for r in rules() if r.get("alert") == name)
    assert rule.get("labels", {}).get("severity") in SEVERITIES, rule
    ann = rule.get("annotations", {})
    for key in ("summary", "description"):
        assert isinstance(ann.get(key), str) and ann[key].strip(), f"{name}: annotations.{key} missing"
    # every alert says what it is about: the run (or, for a node, the node)
    subject = "{{ $labels.node }}" if name == "FoldhpcNodeImplicated" else "{{ $labels.run }}"
    assert subject in ann["summary"] and subject in ann["description"], name
    assert ann.get("runbook_url") == f"docs/runbook.md#{name.lower()}", name


def test_runbook_has_a_heading_for_every_alert() -> None:
    anchors = runbook_anchors()
    missing = [r["annotations"]["runbook_url"] for r in rules()
               if r["annotations"]["runbook_url"].split("#", 1)[1] not in anchors]
    assert not missing, f"{RUNBOOK.relative_to(ROOT)} has no heading for {missing}"
    # the heading is the rule's name itself, so a reader searching for the alert finds it
    text = RUNBOOK.read_text()
    for name in ALERTS:
        assert re.search(rf"^## {name}\s*$", text, flags=re.MULTILINE), f"no '## {name}' in the runbook"


def test_rules_use_only_published_metrics() -> None:
    """Every foldhpc_* name in an expression (or in an annotation's query) is a metric of the set
    ``foldhpc metrics`` publishes, as a query spells it (a counter with ``_total``)."""
    from foldhpc.monitor.metrics import METRICS

    published = {m.exposed for m in METRICS.values()}
    used: dict[str, set[str]] = {}
    for r in rules():
        text = r["expr"] + " ".join(r.get("annotations", {}).values())
        used[r["alert"]] = set(re.findall(r"\bfoldhpc_[a-z0-9_]+\b", text))
    assert all(used.values()), used
    unknown = {name: sorted(u - published) for name, u in used.items() if u - published}
    assert not unknown, f"rules name metrics foldhpc does not publish: {unknown}"
