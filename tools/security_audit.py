"""The steps of ``examples/security-audit.yaml``: scan -> analyze -> report, offline.

``scan`` reads one part of a source tree and reports findings: risky calls
found in the Python syntax tree (``eval``, ``exec``, ``pickle.loads``,
``subprocess`` with ``shell=True``, ``os.system``, ``yaml.load`` without a
safe loader, ``tempfile.mktemp``, weak hashes) and text that looks like a
secret (private-key blocks, AWS access keys, literal passwords and tokens).
``analyze`` merges the scans, counts and ranks them; ``report`` writes a
Markdown report and returns its path. Each runs as a ``python`` task; the
workflow hands each step its dependencies' results as ``inputs``.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

SEVERITY_WEIGHT = {"high": 5, "medium": 3, "low": 1}
TEXT_SUFFIXES = {".py", ".toml", ".yaml", ".yml", ".json", ".md", ".cfg", ".ini", ".sh", ".conf"}
SKIP_DIRS = {".git", ".venv", "venv", "__pycache__", ".pantheon", "node_modules", ".mypy_cache",
             ".ruff_cache", ".pytest_cache", ".hypothesis", "build", "dist"}  # fmt: skip

# Built from parts so that this file does not report itself.
_KEY_BLOCK = "-----BEGIN " + r"(?:RSA |EC |DSA |OPENSSH )?" + "PRIVATE " + "KEY-----"
SECRET_PATTERNS: list[tuple[str, str, re.Pattern[str]]] = [
    ("private-key", "high", re.compile(_KEY_BLOCK)),
    ("aws-access-key", "high", re.compile(r"\b" + "AKIA" + r"[0-9A-Z]{16}\b")),
    (
        "hardcoded-secret",
        "medium",
        re.compile(
            r"""(?i)\b(?:password|passwd|secret|api_?key|auth_?token|access_?token)\b\s*[:=]\s*"""
            r"""['"][^'"\s]{8,}['"]"""
        ),
    ),
]

# (rule, severity, dotted call name) for calls that deserve a look in review.
RISKY_CALLS: dict[str, tuple[str, str]] = {
    "eval": ("eval", "high"),
    "exec": ("exec", "high"),
    "pickle.loads": ("pickle-load", "high"),
    "pickle.load": ("pickle-load", "high"),
    "marshal.loads": ("marshal-load", "high"),
    "os.system": ("os-system", "medium"),
    "os.popen": ("os-popen", "medium"),
    "tempfile.mktemp": ("insecure-tempfile", "medium"),
    "hashlib.md5": ("weak-hash", "low"),
    "hashlib.sha1": ("weak-hash", "low"),
    "__import__": ("dynamic-import", "low"),
    "importlib.import_module": ("dynamic-import", "low"),
}
SUBPROCESS_CALLS = {"subprocess.run", "subprocess.Popen", "subprocess.call",
                    "subprocess.check_call", "subprocess.check_output"}  # fmt: skip


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else node.attr
    return ""


def _python_findings(path: Path, text: str, rel: str) -> list[dict[str, Any]]:
    try:
        tree = ast.parse(text, filename=str(path))
    except SyntaxError as exc:
        return [_finding("unparsable", "low", rel, exc.lineno or 0, str(exc.msg))]
    lines = text.splitlines()
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        line = lines[node.lineno - 1].strip() if 0 < node.lineno <= len(lines) else ""
        if name in RISKY_CALLS:
            rule, severity = RISKY_CALLS[name]
            found.append(_finding(rule, severity, rel, node.lineno, line))
        elif name in SUBPROCESS_CALLS and any(
            k.arg == "shell" and isinstance(k.value, ast.Constant) and k.value.value is True
            for k in node.keywords
        ):
            found.append(_finding("subprocess-shell", "high", rel, node.lineno, line))
        elif name == "yaml.load" and not any(k.arg == "Loader" for k in node.keywords):
            found.append(_finding("yaml-unsafe-load", "high", rel, node.lineno, line))
    return found


def _finding(rule: str, severity: str, file: str, line: int, snippet: str) -> dict[str, Any]:
    return {"rule": rule, "severity": severity, "file": file, "line": line,
            "snippet": snippet[:160]}  # fmt: skip


def _files(base: Path) -> list[Path]:
    if base.is_file():
        return [base]
    out = []
    for path in sorted(base.rglob("*")):
        if any(part in SKIP_DIRS for part in path.relative_to(base).parts):
            continue
        if path.is_file() and path.suffix in TEXT_SUFFIXES:
            out.append(path)
    return out


async def scan(root: str, part: str, ctx: Any = None) -> dict[str, Any]:
    """Findings in ``root/part`` (a directory or a file), with progress reports."""
    base = Path(root) / part
    if not base.exists():
        raise FileNotFoundError(f"{base} does not exist")
    files = _files(base)
    findings: list[dict[str, Any]] = []
    lines = 0
    for i, path in enumerate(files, 1):
        text = path.read_text(errors="replace")
        lines += text.count("\n") + 1
        rel = str(path.relative_to(root))
        for number, line in enumerate(text.splitlines(), 1):
            for rule, severity, pattern in SECRET_PATTERNS:
                if pattern.search(line):
                    findings.append(_finding(rule, severity, rel, number, line.strip()))
        if path.suffix == ".py":
            findings.extend(_python_findings(path, text, rel))
        if ctx is not None and (i % 10 == 0 or i == len(files)):
            await ctx.progress(i / len(files), f"{i}/{len(files)} files of {part}")
    return {"part": part, "files": len(files), "lines": lines, "findings": findings}


def analyze(inputs: dict[str, Any]) -> dict[str, Any]:
    """Merge the scans: totals, counts by rule and severity, files ranked by risk."""
    findings = [f for scan_result in inputs.values() for f in scan_result["findings"]]
    by_file: Counter[str] = Counter()
    for f in findings:
        by_file[f["file"]] += SEVERITY_WEIGHT[f["severity"]]
    order = {"high": 0, "medium": 1, "low": 2}
    return {
        "parts": sorted(r["part"] for r in inputs.values()),
        "files": sum(r["files"] for r in inputs.values()),
        "lines": sum(r["lines"] for r in inputs.values()),
        "total": len(findings),
        "by_severity": dict(Counter(f["severity"] for f in findings)),
        "by_rule": dict(Counter(f["rule"] for f in findings).most_common()),
        "riskiest_files": [{"file": f, "score": s} for f, s in by_file.most_common(10)],
        "findings": sorted(findings, key=lambda f: (order[f["severity"]], f["file"], f["line"])),
    }


def report(inputs: dict[str, Any], out: str) -> dict[str, Any]:
    """Write the Markdown report of the analysis to ``out``; returns its path and totals."""
    (analysis,) = inputs.values()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    sev = analysis["by_severity"]
    lines = [
        "# Security audit",
        "",
        f"Generated {datetime.now(UTC).isoformat(timespec='seconds')} by the Pantheon-ES "
        "workflow `examples/security-audit.yaml`.",
        "",
        f"Scanned {analysis['files']} files ({analysis['lines']} lines) in "
        f"{', '.join(analysis['parts'])}: **{analysis['total']} findings** "
        f"({sev.get('high', 0)} high, {sev.get('medium', 0)} medium, {sev.get('low', 0)} low).",
        "",
        "These are leads for a reviewer, not verdicts: a test may call `eval` on purpose.",
        "",
        "## By rule",
        "",
        "| rule | findings |",
        "|---|---|",
        *(f"| {rule} | {count} |" for rule, count in analysis["by_rule"].items()),
        "",
        "## Riskiest files (high 5, medium 3, low 1 point per finding)",
        "",
        "| file | score |",
        "|---|---|",
        *(f"| `{r['file']}` | {r['score']} |" for r in analysis["riskiest_files"]),
        "",
        "## Findings",
        "",
        "| severity | rule | where | code |",
        "|---|---|---|---|",
        *(
            f"| {f['severity']} | {f['rule']} | `{f['file']}:{f['line']}` | "
            f"`{f['snippet'].replace('|', '/').replace('`', '')}` |"
            for f in analysis["findings"]
        ),
        "",
    ]
    path.write_text("\n".join(lines))
    return {"report": str(path), "findings": analysis["total"], "by_severity": sev}
