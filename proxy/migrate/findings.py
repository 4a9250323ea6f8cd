"""What `airgate import-nginx` reports on standard error: one `file:line: subject: message`
per finding, never a secret; and the test for the guides' placeholder secrets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy.migrate.common import PLACEHOLDER_PREFIXES, PLACEHOLDER_WORDS


@dataclass(frozen=True, slots=True)
class Finding:
    where: str  # "file:line"
    subject: str  # the directive or option
    message: str

    def render(self) -> str:
        return f"{self.where}: {self.subject}: {self.message}"


@dataclass
class Findings:
    """Everything that standard error will say. Never holds a secret."""

    items: list[Finding] = field(default_factory=list)

    def skipped(self, where: str, subject: str, reason: str) -> None:
        self.items.append(Finding(where, subject, f"not translated: {reason}"))

    def warn(self, where: str, subject: str, message: str) -> None:
        self.items.append(Finding(where, subject, f"warning: {message}"))

    def note(self, where: str, subject: str, message: str) -> None:
        self.items.append(Finding(where, subject, f"note: {message}"))

    def in_input_order(self) -> list[Finding]:
        """Sorted by file (in order of first mention), then line: the order an editor shows."""
        files: dict[str, int] = {}
        def key(item: Finding) -> tuple[int, int]:
            name, _, line = item.where.rpartition(":")
            return files.setdefault(name, len(files)), int(line) if line.isdigit() else 0
        return sorted(self.items, key=key)

    @property
    def skipped_count(self) -> int:
        return sum(1 for item in self.items if item.message.startswith("not translated"))


def looks_like_placeholder(value: str) -> bool:
    """True for the guides' stand-ins: `<secret token>`, `[YOUR_MODEL_ID]`, `xxxx`, `changeme`."""
    text = value.strip()
    lowered = text.lower()
    if ("<" in text and ">" in text) or ("[" in text and "]" in text):
        return True
    if text and len(set(lowered)) == 1 and lowered[0] in "x*.#":
        return True
    return lowered in PLACEHOLDER_WORDS or lowered.startswith(PLACEHOLDER_PREFIXES)
