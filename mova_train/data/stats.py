"""Per-reader sample accounting (seen / accepted / filtered / rejected by reason) and the rejected-fraction guard."""

from __future__ import annotations

from mova_train.data.errors import TooManyRejectedError

# Below this many samples per reader a few bad clips would look like a large fraction; the end-of-epoch check
# still covers small finite runs.
MIN_SAMPLES_FOR_REJECT_CHECK = 32


def empty_stats() -> dict:
    return {"seen": 0, "accepted": 0, "filtered": 0, "rejected": {}, "shard_errors": 0, "examples": {}}


def merge_stats(parts: list[dict]) -> dict:
    out = empty_stats()
    for p in parts:
        for k in ("seen", "accepted", "filtered", "shard_errors"):
            out[k] += p[k]
        for reason, n in p["rejected"].items():
            out["rejected"][reason] = out["rejected"].get(reason, 0) + n
        for reason, msg in p["examples"].items():
            out["examples"].setdefault(reason, msg)
        # accepted samples by shard set (several sets only) and captions dropped, when there were any
        for label, n in p.get("sets", {}).items():
            sets = out.setdefault("sets", {})
            sets[label] = sets.get(label, 0) + n
        if p.get("captions_dropped"):
            out["captions_dropped"] = out.get("captions_dropped", 0) + p["captions_dropped"]
    out["rejected"] = dict(sorted(out["rejected"].items()))
    out["rejected_total"] = sum(out["rejected"].values())
    return out


def check_rejected(stats: dict, max_fraction: float, where: str, *, final: bool) -> None:
    seen = stats["seen"]
    rejected = sum(stats["rejected"].values())
    if seen == 0 or (not final and seen < MIN_SAMPLES_FOR_REJECT_CHECK):
        return
    if rejected > max_fraction * seen:
        reasons = ", ".join(f"{r}={n}" for r, n in sorted(stats["rejected"].items()))
        examples = "; ".join(f"[{r}] {m}" for r, m in sorted(stats["examples"].items()))
        raise TooManyRejectedError(
            f"{where}: {rejected} of {seen} samples rejected ({rejected / seen:.1%} > "
            f"data.max_rejected_fraction={max_fraction}); by reason: {reasons}. Examples: {examples}"
        )
