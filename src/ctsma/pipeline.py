"""Cached, resumable multi-stage runs with one overall progress display.

A stage is a function that writes its outputs under ``<out>/<stage name>/`` and returns a small
JSON-able summary. When it finishes, a marker ``<out>/.stages/<name>.json`` records the summary,
the run time and a hash of the settings that the stage depends on. A rerun skips every stage
whose marker matches its settings, so an interrupted run resumes at the first unfinished stage,
and changing one setting reruns only the stages that depend on it (and those after it, unless it is one of the
stage's ``own`` settings, which no later stage depends on, or an ``extent`` that a later stage is free of). A
runner made with ``code=code_fingerprint()`` also reruns everything after the package's code or shipped configs
changed, so an updated installation never reports results that older code produced. A stage that reruns because
its key changed starts from an empty folder (its own resumable work, made with other settings or code, is not
reused), unless only its ``extent`` or ``own`` settings changed, which its finished work does not depend on, or,
for a ``per_unit`` stage, the extent of a stage before it; a stage that was interrupted resumes in its folder.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import progress
from .io.atomic import to_jsonable, write_json


def settings_hash(settings: Any) -> str:
    """A stable short hash of JSON-able settings."""
    text = json.dumps(to_jsonable(settings), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def code_fingerprint(root: Path | None = None) -> str:
    """A short hash of the ``ctsma`` package's Python sources and shipped configs (training configs, registration
    presets: what a stage's result depends on beside its settings); ``root`` is the package folder (default: this
    installation's)."""
    root = Path(root) if root is not None else Path(__file__).resolve().parent
    res = root / "resources"
    h = hashlib.sha256()
    for f in sorted(list(root.rglob("*.py")) + list((res / "Configs").rglob("*.yaml"))
                    + list((res / "Presets").rglob("*.json"))):
        if "__pycache__" in f.parts:
            continue
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _finished(rec: dict | None, key: str) -> bool:
    """Whether a stage's record says it finished with ``key``."""
    return rec is not None and rec.get("key") == key and "seconds" in rec


@dataclass
class Stage:
    """One stage and its settings, of three kinds by what depends on them (all JSON-able, ``None``: none):

    * ``settings``: this stage's outputs, the later stages' (they are in their keys too) and the finished work in
      its folder: a change reruns it from an empty folder, and every stage after it;
    * ``extent``: this stage's outputs and the later stages', but not the work its folder already holds, each unit
      of which (a knee) comes out the same whatever their value, and is checked by the stage before it is reused
      (e.g. the size of a cohort whose knee i does not depend on it): a change reruns it in its folder, which keeps
      that work, and every stage after it (from empty folders, except as below);
    * ``own``: this stage's outputs only, neither the later stages' nor its finished work (e.g. on which knees a side
      comparison that no later stage reads is made): a change reruns this stage alone, in its folder.

    Two flags say how a stage depends on the ``extent`` of the stages before it:

    * ``extent_free``: not at all (e.g. a model trained on a cohort's first knees, whatever its size): a change of
      that extent does not rerun it;
    * ``per_unit``: its outputs do, but its folder's work is one unit (knee) at a time, each checked against its
      inputs before it is reused (registrations, dataset shards): a change of that extent reruns it in its folder.
    """

    name: str
    run: Callable[[Path], dict]
    settings: Any = None
    title: str = ""
    extent: Any = None
    own: Any = None
    extent_free: bool = False
    per_unit: bool = False


@dataclass
class StageRunner:
    """Runs stages in order, skipping the ones already finished with the same settings."""

    out_dir: Path
    timings: dict[str, float] = field(default_factory=dict)
    summaries: dict[str, dict] = field(default_factory=dict)
    cached: dict[str, bool] = field(default_factory=dict)
    code: str = ""      # e.g. code_fingerprint(): a different value reruns every stage

    def marker(self, name: str) -> Path:
        return Path(self.out_dir) / ".stages" / f"{name}.json"

    def keys(self, stages: list[Stage]) -> list[str]:
        """Each stage's key: a hash of all its settings and of the settings that the stages before it pass on."""
        return [key for key, _ in self._keys(stages)]

    def _keys(self, stages: list[Stage]) -> list[tuple[str, str]]:
        """Each stage's key and work key. Two chains run through the stages: the settings (the first stage's upstream:
        ``code``) and the extents. The work key hashes the stage's ``settings`` with the settings chain, and the
        extents before it unless it is ``extent_free`` or ``per_unit``: its folder's finished work is reused while
        its work key is unchanged. Its key adds the extents before it (unless ``extent_free``), its own ``extent``
        and its ``own`` settings: it reruns when its key changed. (A chain of stages without extents gets the keys
        of a plain chain of settings.)"""
        out, chain, extents = [], self.code, None
        for st in stages:
            work = settings_hash({"settings": st.settings, "upstream": chain})
            chain = work
            seen = work if extents is None or st.extent_free else settings_hash({"extents": extents, "work": work})
            if st.extent is not None:
                extents = settings_hash({"extent": st.extent, "upstream": extents})
            key = seen if st.extent is None else settings_hash({"extent": st.extent, "upstream": seen})
            key = key if st.own is None else settings_hash({"own": st.own, "upstream": key})
            out.append((key, work if st.per_unit else seen))
        return out

    def _record(self, name: str) -> dict | None:
        mk = self.marker(name)
        return json.loads(mk.read_text(encoding="utf-8")) if mk.is_file() else None

    def pending(self, stages: list[Stage]) -> list[str]:
        """The names of the stages that :meth:`run_all` would run: not finished, or finished with another key."""
        return [st.name for st, key in zip(stages, self.keys(stages)) if not _finished(self._record(st.name), key)]

    def run_all(self, stages: list[Stage]) -> dict[str, dict]:
        n = len(stages)
        for i, (st, (key, work)) in enumerate(zip(stages, self._keys(stages)), 1):
            prev = ", ".join(f"{k} {v:.0f} s" for k, v in self.timings.items())
            label = st.title or st.name
            mk = self.marker(st.name)
            rec = self._record(st.name)
            if _finished(rec, key):
                self.timings[st.name] = float(rec["seconds"])
                self.summaries[st.name] = rec.get("summary", {})
                self.cached[st.name] = True
                progress.info(f"[{i}/{n}] {label}: done earlier ({rec['seconds']:.0f} s), skipped")
                progress.emit("demo", i, n, f"{st.name} (cached)")
                continue
            progress.info(f"[{i}/{n}] {label} ..." + (f"   (so far: {prev})" if prev else ""))
            progress.emit("demo", i - 1, n, st.name)
            stage_dir = Path(self.out_dir) / st.name
            if rec is not None and rec.get("key") != key and rec.get("work") != work and stage_dir.is_dir():
                # made with other settings or code: the stage's own resumable work (knees, registrations, dataset
                # shards) must not be reused, so it starts empty
                shutil.rmtree(stage_dir)
            stage_dir.mkdir(parents=True, exist_ok=True)
            # interrupted: the next run resumes in stage_dir
            write_json(mk, {"key": key, "work": work, "started": time.time()})
            t0 = time.perf_counter()
            summary = st.run(stage_dir) or {}
            seconds = time.perf_counter() - t0
            self.timings[st.name] = seconds
            self.summaries[st.name] = summary
            self.cached[st.name] = False
            write_json(mk, {"key": key, "work": work, "seconds": seconds, "summary": summary, "finished": time.time()})
            progress.info(f"[{i}/{n}] {label}: finished in {seconds:.0f} s")
        progress.emit("demo", n, n, "done")
        return self.summaries
