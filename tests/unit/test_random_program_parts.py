"""The pure parts of the random differential test: generation, event folding, the model."""

from __future__ import annotations

from typing import Any

from helpers.program_model import Model
from helpers.program_twin import job_summary, outcome
from helpers.programs import Backup, BitmapCmd, Io, Merge, NodeSpec, Target, generate

KiB, MiB = 1 << 10, 1 << 20


def _jsc(job: str, *statuses: str) -> list[dict[str, Any]]:
    return [{"event": "JOB_STATUS_CHANGE", "data": {"id": job, "status": s}} for s in statuses]


def test_a_seed_names_one_program() -> None:
    assert generate(7) == generate(7)
    assert generate(7) != generate(8)
    assert {n.name for n in generate(7, index=3).nodes} == {"n3a", "n3b"}


def test_job_summary_folds_drains_and_grouped_timing() -> None:
    """QEMU's drain pairs and a cancelled member's ``waiting`` go; offset only on success."""
    events = [
        *_jsc("j", "created", "running", "paused", "running", "waiting", "aborting"),
        {"event": "BLOCK_JOB_CANCELLED",
         "data": {"device": "j", "type": "backup", "len": 2, "offset": 1, "speed": 0}},
        *_jsc("j", "concluded", "null"),
        *_jsc("other", "created"),
    ]
    summary = job_summary(events, "j")
    assert summary["statuses"] == ["created", "running", "aborting", "BLOCK_JOB_CANCELLED",
                                   "concluded", "null"]
    assert summary["end"] == {"event": "BLOCK_JOB_CANCELLED", "device": "j", "type": "backup",
                              "len": 2, "speed": 0}
    assert outcome(summary) == "cancelled"
    assert outcome(job_summary(_jsc("j", "created", "aborting", "concluded", "null"), "j")) \
        == "aborted"


def test_model_counts_whole_job_clusters_and_follows_a_successful_backup() -> None:
    node = NodeSpec("n0a", "drive", 4 * MiB + 512, 64 * KiB, False, "qemu-img")
    model = Model((node,))
    model.bitmap_cmd(BitmapCmd("add", "n0a", "old", granularity=512))
    model.bitmap_cmd(BitmapCmd("add", "n0a", "b0", granularity=512))
    model.io(Io("n0a", "write", 4 * MiB, 512), "wrote 512/512 bytes at offset 4194304")
    full = Backup("j1", "n0a", "full", Target("new"))
    inc = Backup("j2", "n0a", "incremental", Target("fresh", 128 * KiB), bitmap="old")
    assert model.job_len(full, 64 * KiB) == 65 * 64 * KiB  # the partial last cluster whole
    assert model.job_len(inc, 128 * KiB) == 128 * KiB
    model.start(inc, 128 * KiB)
    model.io(Io("n0a", "write", 0, 1), "wrote 1/1 bytes at offset 0")
    model.end("j2", "completed")
    assert [(b["name"], b["count"]) for b in model.expect("n0a")] == [
        ("old", 512), ("b0", 1024)]  # synced: only the write made meanwhile, listed first


def test_model_merges_coarse_granules_into_fine_ones() -> None:
    node = NodeSpec("n0a", "drive", 1 * MiB, 64 * KiB, False, "qemu-img")
    model = Model((node,))
    model.bitmap_cmd(BitmapCmd("add", "n0a", "fine", granularity=4 * KiB))
    model.bitmap_cmd(BitmapCmd("add", "n0a", "coarse", granularity=256 * KiB, disabled=True))
    coarse = model.nodes["n0a"].find("coarse")
    assert coarse is not None
    coarse.dirty.add(3)  # [768k, 1M): 64 granules of the fine one
    model.merge(Merge("n0a", "fine", ((None, "coarse"),)))
    assert model.expect("n0a")[1]["count"] == 256 * KiB
