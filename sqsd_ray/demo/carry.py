"""What of a SmolLM2 benchmark seed outlives the machine it ran on.

One seed of ``bench/smollm2_seeds.py`` takes longer than a working session, and the next session may get a new
machine. So after its scores, and after each ranking, a seed writes its *carry* to a folder that is committed
(``docs/results/smollm2/seed-N/``):

    carry.json                        world fingerprints, the aligned model's fingerprint, init note, rankings done
    aligned/adapter/                  the alignment's LoRA adapter (the merged model is rebuilt from it)
    aligned/aligned.json              the alignment's own record (refusals before / after, steps)
    scores/<method>.parquet           each method's score file (ids and numbers, no text)
    experiment/<ranking>/...          each finished ranking's table.csv, evaluation metrics and partition
    timings.json                      every invocation's stage times

On another machine the seed continues from it: the world is written anew from the reference data and must hash
the same file by file, the aligned model is merged anew from the carried adapter and must hash the same tensor
by tensor, and only the rankings not yet done are fine-tuned, from the carried score files. Directions,
sensitivity runs, the layer search and the scoring are not run again. A mismatch stops the seed with the file
that differs: continuing would mix two different aligned models or corpora in one seed's table.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

CARRY_FILE = "carry.json"
# what seed_figures and the band experiment's skip read of a finished ranking, relative to its directory
# (table.csv, the mark of a finished ranking, last: a copy cut short leaves no ranking that looks finished)
RANKING_FILES = ("evaluation/metrics.csv", "{arm}/partition/partition.csv", "{arm}/partition/partition.json",
                 "table.csv")


class CarryMismatch(RuntimeError):
    """The carried seed was made from other data or another aligned model than this machine makes."""


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tensor_digest(model_dir: Path) -> str:
    """sha256 over every tensor of the directory's safetensors files (name, dtype, shape, bytes), in name order:
    the same weights give the same digest whatever the file's layout or metadata."""
    import torch
    from safetensors import safe_open

    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in sorted(f.keys()):
                tensor = f.get_tensor(name).contiguous()
                digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
                digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())  # bf16 has no numpy type
    return digest.hexdigest()


class SeedCarry:
    """The carry folder of one seed: ``save_*`` after the stages that finish, ``restore_*`` on a new machine."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    @property
    def record(self) -> dict:
        path = self.folder / CARRY_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    @property
    def has_scores(self) -> bool:
        """True once a session finished the seed's scores: later sessions start from them."""
        return bool(self.record.get("scores"))

    def _write_record(self, record: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / CARRY_FILE).write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")

    # -- after the scores ---------------------------------------------------------------------------------------
    def save_upstream(self, world_files: dict[str, Path], aligned: Path, scores: dict[str, Path],
                      init_note: str) -> None:
        """The world's fingerprints, the alignment (adapter + record + fingerprint), the score files, the init note."""
        adapter = Path(aligned) / "adapter"
        if not (adapter / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{adapter}: the aligned model keeps no adapter (aligned before adapters were "
                                    "kept): remove its cache folder and align again to carry this seed")
        target = self.folder / "aligned"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(adapter, target / "adapter")
        shutil.copy2(Path(aligned) / "aligned.json", target / "aligned.json")
        (self.folder / "scores").mkdir(parents=True, exist_ok=True)
        for method, path in scores.items():
            shutil.copy2(path, self.folder / "scores" / f"{method}.parquet")
        self._write_record({
            "world": {kind: file_digest(path) for kind, path in sorted(world_files.items())},
            "aligned_tensors_sha256": tensor_digest(aligned),
            "scores": {method: f"scores/{method}.parquet" for method in scores},
            "init_note": init_note, "rankings_done": self.record.get("rankings_done", [])})
        log.info("carry: the seed's alignment, world fingerprints and %d score files saved to %s", len(scores),
                 self.folder)

    # -- after each ranking -------------------------------------------------------------------------------------
    def has_ranking(self, name: str, arm: str) -> bool:
        """Whether the carry holds ranking ``name`` (folder ``arm``) whole."""
        return name in self.record.get("rankings_done", []) and all(
            (self.folder / "experiment" / arm / relative.format(arm=arm)).is_file() for relative in RANKING_FILES)

    def save_ranking(self, name: str, arm_out: Path) -> None:
        """A finished ranking's table, evaluation metrics and partition."""
        arm = arm_out.name
        for relative in RANKING_FILES:
            source = arm_out / relative.format(arm=arm)
            target = self.folder / "experiment" / arm / relative.format(arm=arm)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
        record = self.record
        record["rankings_done"] = sorted(set(record.get("rankings_done", [])) | {name})
        self._write_record(record)

    def save_timings(self, timings: Path) -> None:
        if timings.is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            shutil.copy2(timings, self.folder / "timings.json")

    # -- on a machine without the seed's work -------------------------------------------------------------------
    def check_world(self, world_files: dict[str, Path]) -> None:
        """Every world file hashes as it did when the seed was scored."""
        carried = self.record["world"]
        made = {kind: file_digest(path) for kind, path in world_files.items()}
        differ = sorted(kind for kind in carried if made.get(kind) != carried[kind])
        if differ or set(made) != set(carried):
            names = ", ".join(differ) or f"the set of files ({sorted(made)} vs {sorted(carried)})"
            raise CarryMismatch(f"{self.folder}: this machine writes another world than the carried seed's: "
                                f"{names} differ (reference data or code changed since). Continuing would "
                                "mix two corpora in one seed; run the seed again with --fresh")

    def restore_aligned(self, target: Path, merge: Callable[[Path, Path], None],
                        accept_other_bits: bool = False) -> Path:
        """The aligned model in ``target`` (the alignment cache), merged there from the carried adapter unless the
        cache holds that very adapter's merge already; its tensors must hash as carried (or as a digest accepted
        earlier with ``accept_other_bits``)."""
        adapter = self.folder / "aligned" / "adapter"
        cached = target / "adapter" / "adapter_model.safetensors"
        if (target / "aligned.json").is_file() and cached.is_file() \
                and file_digest(cached) == file_digest(adapter / "adapter_model.safetensors"):
            return self._check_aligned(target, accept_other_bits)
        # nothing cached, or an alignment trained here on its own: the seed's is merged from its adapter
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        merge(adapter, tmp)
        shutil.copytree(adapter, tmp / "adapter")
        shutil.copy2(self.folder / "aligned" / "aligned.json", tmp / "aligned.json")
        try:
            self._check_aligned(tmp, accept_other_bits)
        except CarryMismatch:
            shutil.rmtree(tmp, ignore_errors=True)  # never leave a merge that failed its check in the cache
            raise
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        log.info("carry: aligned model merged from the carried adapter into %s", target)
        return target

    def _check_aligned(self, model_dir: Path, accept_other_bits: bool) -> Path:
        record = self.record
        made, carried = tensor_digest(model_dir), record["aligned_tensors_sha256"]
        accepted = record.get("aligned_rebuilt_with_other_bits", [])
        if made == carried or made in accepted:
            return model_dir
        message = (f"{model_dir}: the aligned model merged here hashes {made[:12]}, the carried seed's {carried[:12]} "
                   "(other CPU kernels or library versions can round the merge differently)")
        if not accept_other_bits:
            raise CarryMismatch(message + "; pass --accept-other-bits to continue and record it, or --fresh to run "
                                "the seed again")
        log.warning("%s; continuing as asked, and recorded in the seed's results", message)
        record["aligned_rebuilt_with_other_bits"] = [*accepted, made]
        self._write_record(record)
        return model_dir

    def restore_scores(self) -> dict[str, Path]:
        return {method: self.folder / relative for method, relative in self.record["scores"].items()}

    def restore_rankings(self, experiment_dir: Path, arm_dirs: dict[str, str]) -> list[str]:
        """Each ranking the carry holds whole (``arm_dirs``: name → folder) put back under ``experiment_dir``, so
        that the seed skips it; returns their names."""
        restored = []
        for name, arm in arm_dirs.items():
            if not self.has_ranking(name, arm):
                continue
            target = experiment_dir / arm
            if not (target / "table.csv").is_file():
                shutil.copytree(self.folder / "experiment" / arm, target, dirs_exist_ok=True)
            restored.append(name)
        return restored

    def restore_timings(self, timings: Path) -> None:
        """The carried invocations' stage times merged with those already in ``timings`` (keyed by start)."""
        carried = self.folder / "timings.json"
        if not carried.is_file():
            return
        sessions = {s["started"]: s for s in json.loads(carried.read_text())}
        if timings.is_file():
            sessions.update({s["started"]: s for s in json.loads(timings.read_text())})
        timings.parent.mkdir(parents=True, exist_ok=True)
        timings.write_text(json.dumps(sorted(sessions.values(), key=lambda s: s["started"]), indent=1))


__all__ = ["CarryMismatch", "SeedCarry", "file_digest", "tensor_digest"]
