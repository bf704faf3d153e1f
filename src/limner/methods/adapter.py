"""The encoder and identity families' template: pretrain an adapter once, then personalize by encoding.

    pretrain(base, data, out) -> adapter folder      hours, once per base (the shared training loop)
    encode(base, adapter, subject, out) -> concept   seconds per subject, no training
    personalize = encode with the adapter named by `adapter=` (or the method's shipped one for the base)

An adapter folder holds the weights in the method's official layout and `adapter.json`: method,
variant, base fingerprint, what it was trained on, steps, time, settings. A concept records its
adapter by fingerprint, and eval's cache key includes that fingerprint (`key_inputs`), so a concept
encoded with one adapter is never reused for another.
"""

from __future__ import annotations

import json
from abc import abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

from limner.errors import LimnerError
from limner.io import write_json_atomic
from limner.methods.base import Capabilities, Method, Score
from limner.subject import Subject

if TYPE_CHECKING:
    from limner.models.loading import Base

ADAPTER_MANIFEST = "adapter.json"


def write_adapter_manifest(out: Path, method: str, base: Base, **fields: Any) -> dict:
    manifest = {"method": method, "base_fingerprint": base.fingerprint, "base_path": str(base.path)} | fields
    write_json_atomic(Path(out) / ADAPTER_MANIFEST, manifest)
    return manifest


def read_adapter_manifest(folder: Path) -> dict:
    path = Path(folder) / ADAPTER_MANIFEST
    if not path.exists():
        raise LimnerError(f"adapter {folder} has no {ADAPTER_MANIFEST}; give a folder that `limner pretrain` wrote")
    return json.loads(path.read_text())


def adapter_fingerprint(folder: Path) -> str:
    """The adapter's weights and settings: not its logs or checkpoints."""
    from limner.models.loading import fingerprint

    return fingerprint(Path(folder), skip=("train_log.csv", "README.md", "checkpoints", "logs"))


class AdapterMethod(Method):
    capabilities = Capabilities(needs_adapter=True)

    @abstractmethod
    def pretrain(self, base: Base, data: Any, out: Path, **settings: Any) -> Path:
        """Trains the method's adapter on many subjects; writes an adapter folder and returns it."""

    @abstractmethod
    def encode(self, base: Base, adapter: Path, subject: Subject, out: Path, **settings: Any) -> Path:
        """Encodes the subject's references with the adapter into a concept folder (seconds, no training)."""

    def default_adapter(self, base: Base) -> Path | None:
        """The adapter limner ships for this base (the world's), if any."""
        return None

    def adapter_for(self, base: Base, adapter: str | Path | None) -> Path:
        folder = Path(adapter) if adapter is not None else self.default_adapter(base)
        if folder is None:
            raise LimnerError(
                f"{self.name} needs a pretrained adapter for this base: pass --set adapter=DIR (a folder that "
                f"`limner pretrain --method {self.name}` wrote, or the method's official files)"
            )
        manifest = read_adapter_manifest(folder)
        if manifest.get("method") != self.name:
            raise LimnerError(f"adapter {folder} is a {manifest.get('method')} adapter, not {self.name}'s")
        if manifest.get("base_fingerprint") not in (None, base.fingerprint):
            raise LimnerError(
                f"adapter {folder} was pretrained on base {manifest['base_fingerprint']} but the loaded base is "
                f"{base.fingerprint} ({base.path}); pretrain one for this base"
            )
        return folder

    def personalize(
        self,
        base: Base,
        subject: Subject | list[Subject],
        out: Path,
        *,
        score: Score | None = None,
        adapter: str | Path | None = None,
        **overrides: Any,
    ) -> Path:
        if isinstance(subject, (list, tuple)):
            if len(subject) != 1:
                raise LimnerError(f"{self.name} encodes one subject per concept, got {len(subject)}")
            (subject,) = subject
        return self.encode(base, self.adapter_for(base, adapter), subject, Path(out), **overrides)

    def key_inputs(self, overrides: dict) -> dict:
        adapter = overrides.get("adapter")
        return {"adapter": adapter_fingerprint(Path(adapter))} if adapter is not None else {}
