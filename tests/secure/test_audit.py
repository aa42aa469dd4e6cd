"""The audit log: any one edited, removed, inserted or moved line is found and named; prefixes pass."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from click.testing import CliRunner

from fedbrain.cli import main
from fedbrain.errors import InputError
from fedbrain.secure.audit import GENESIS, AuditLog, payload_digest, verify

HOSPITALS = ["hospital_a", "hospital_b", "hospital_c"]


def entry(round_, hospital):
    return {"round": round_, "node_id": 1000 + HOSPITALS.index(hospital), "hospital": hospital, "examples": 120,
            "payload_sha256": hashlib.sha256(f"{round_}/{hospital}".encode()).hexdigest(),
            "payload_bytes": 4096, "aggregation": "fedavg", "phase": "fit", "status": "ok"}


@pytest.fixture
def log(tmp_path):
    """9 lines: 3 rounds x 3 hospitals."""
    audit = AuditLog(tmp_path / "audit.jsonl")
    for round_ in (1, 2, 3):
        for hospital in HOSPITALS:
            audit.append(entry(round_, hospital))
    return audit


def lines(path):
    return path.read_bytes().splitlines(keepends=True)


def rewrite(path, new_lines):
    path.write_bytes(b"".join(new_lines))


def canonical(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def test_intact_log_passes_and_matches_the_head(log):
    result = verify(log.path)
    assert result.ok and result.first_bad_line is None and result.reason is None
    assert result.entries == 9 and result.rounds == (1, 2, 3) and result.hospitals == tuple(HOSPITALS)
    assert (result.entries, result.last_sha256) == log.head()
    first = json.loads(lines(log.path)[0])
    assert first["seq"] == 1 and first["prev_sha256"] == GENESIS and first["time"].endswith("+00:00")
    second = json.loads(lines(log.path)[1])
    assert second["prev_sha256"] == hashlib.sha256(lines(log.path)[0].rstrip(b"\n")).hexdigest()


# Each case tampers around line 4 and states the line verify names, and why.
def edit_field(old):
    # Line 4 stays well formed and still fits after line 3; the break shows at line 5 (its
    # prev_sha256 no longer matches), and line 6 vouches for line 5's bytes, so line 4 is named.
    row = json.loads(old[3])
    row["examples"] += 1
    return old[:3] + [canonical(row)] + old[4:]


def edit_prev_hash(old):
    # Line 4's own prev_sha256 no longer matches line 3, and line 5 no longer vouches for line 4.
    row = json.loads(old[3])
    row["prev_sha256"] = "f" * 64
    return old[:3] + [canonical(row)] + old[4:]


def edit_by_hand(old):
    # A space added by an editor: line 4 is no longer in canonical form (its hash covers exact bytes).
    return old[:3] + [old[3].replace(b'"examples":120', b'"examples": 120')] + old[4:]


def delete(old):
    # The old line 5 now sits at line 4 with seq 5.
    return old[:3] + old[4:]


def insert_forged(old):
    # A well-made forgery: seq 4 and the right prev_sha256 after line 3, so line 4 alone looks fine; the
    # old line 4 (now line 5, seq 4) continues the chain from line 3, which shows line 4 was inserted.
    row = json.loads(old[3])
    row.update(examples=999, prev_sha256=hashlib.sha256(old[2].rstrip(b"\n")).hexdigest())
    return old[:3] + [canonical(row)] + old[3:]


def insert_copy(old):
    # A verbatim copy of line 3 inserted at line 4: it repeats line 3.
    return old[:3] + [old[2]] + old[3:]


def swap(old):
    # The old line 5 is at line 4 with seq 5, and the old line 4 follows it with seq 4.
    return old[:3] + [old[4], old[3]] + old[5:]


@pytest.mark.parametrize("tamper, fragment", [
    (edit_field, "changed after it was written"),
    (edit_prev_hash, "prev_sha256 does not match line 3"),
    (edit_by_hand, "not in canonical JSON form"),
    (delete, "seq 5, expected 4"),
    (insert_forged, "inserted: line 5 continues the chain from line 3"),
    (insert_copy, "repeats line 3"),
    (swap, "swapped with line 5"),
])
def test_one_tampered_line_is_named(log, tamper, fragment):
    rewrite(log.path, tamper(lines(log.path)))
    result = verify(log.path)
    assert not result.ok and result.first_bad_line == 4, result
    assert fragment in result.reason
    assert result.entries == 3 and result.rounds == (1,)  # only lines 1-3 are trusted


def test_what_the_chain_alone_cannot_see_the_head_does(log):
    # Editing the second-to-last line shows only at the last line, which nothing follows to vouch for it,
    # so verify names the last line and says which two it could be.
    old = lines(log.path)
    row = json.loads(old[7])
    row["status"] = "failed"
    rewrite(log.path, old[:7] + [canonical(row), old[8]])
    result = verify(log.path)
    assert result.first_bad_line == 9 and "line 8 or this line was changed" in result.reason

    # Removing the last line, or editing it, leaves a valid chain: only the head recorded outside
    # the file (MLflow) shows it.
    rewrite(log.path, old[:8])
    assert verify(log.path).ok and (verify(log.path).entries, verify(log.path).last_sha256) != log.head()
    row = json.loads(old[8])
    row["examples"] = 1
    rewrite(log.path, old[:8] + [canonical(row)])
    result = verify(log.path)
    assert result.ok and result.entries == 9 and result.last_sha256 != log.head()[1]


def test_cut_after_a_complete_line_passes_a_torn_line_fails(log):
    old = lines(log.path)
    rewrite(log.path, old[:5])
    result = verify(log.path)
    assert result.ok and result.entries == 5 and result.rounds == (1, 2)

    rewrite(log.path, old[:5] + [old[5][:40]])  # a crash in the middle of writing line 6
    result = verify(log.path)
    assert not result.ok and result.first_bad_line == 6 and result.entries == 5
    assert result.reason == "incomplete last line (a crash while writing?)"

    rewrite(log.path, [])
    assert verify(log.path).ok and verify(log.path).entries == 0


def test_reopening_continues_the_chain(log):
    resumed = AuditLog(log.path)
    assert resumed.head() == log.head()
    for hospital in HOSPITALS:
        written = resumed.append(entry(4, hospital))
    assert written["seq"] == 12
    result = verify(log.path)
    assert result.ok and result.entries == 12 and result.rounds == (1, 2, 3, 4)
    assert (result.entries, result.last_sha256) == resumed.head()


def test_a_broken_log_is_not_continued(log):
    rewrite(log.path, delete(lines(log.path)))
    with pytest.raises(InputError, match="line 4: seq 5, expected 4.*refusing to append"):
        AuditLog(log.path)

    rewrite(log.path, lines(log.path)[:3] + [b'{"round":'])
    with pytest.raises(InputError, match="line 4: incomplete last line"):
        AuditLog(log.path)


def test_a_second_writer_is_refused(log):
    other = AuditLog(log.path)
    other.append(entry(4, "hospital_a"))
    with pytest.raises(InputError, match="another writer"):
        log.append(entry(4, "hospital_b"))
    assert verify(log.path).ok and verify(log.path).entries == 10


@pytest.mark.parametrize("bad, message", [
    ({"examples": np.zeros(3)}, "ndarray"),
    ({"examples": [1, 2]}, "list"),
    ({"reason": "x" * 201}, "at most 200"),
    ({"examples": float("nan")}, "finite"),
    ({"weights": 1.0}, "unknown key"),
    ({"seq": 7}, "set by AuditLog"),
])
def test_entries_that_could_hold_model_values_are_refused(log, bad, message):
    before = log.path.read_bytes()
    with pytest.raises(ValueError, match=message):
        log.append({**entry(4, "hospital_a"), **bad})
    assert log.path.read_bytes() == before and log.head()[0] == 9


def test_numpy_scalars_are_written_as_plain_numbers(tmp_path):
    written = AuditLog(tmp_path / "a.jsonl").append({"round": np.int64(2), "examples": np.float32(3.5)})
    assert written["round"] == 2 and type(written["round"]) is int and written["examples"] == 3.5


def test_payload_digest_is_deterministic_and_sees_one_byte(tmp_path):
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    rng = np.random.default_rng(0)
    weights = [rng.normal(size=(4, 3)).astype("float32"), rng.normal(size=3).astype("float32")]

    def payload(arrays, examples=120):
        return RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord({"num-examples": examples}),
                           "config": ConfigRecord({"tag": b"\x01"})})

    digest, size = payload_digest(payload(weights))
    assert len(digest) == 64 and (digest, size) == payload_digest(payload([w.copy() for w in weights]))
    array_bytes = sum(len(a.data) for a in ArrayRecord(weights).values())
    assert size > array_bytes >= sum(w.nbytes for w in weights)

    flipped = weights[1].copy()
    flipped.view(np.uint8)[5] ^= 1
    assert payload_digest(payload([weights[0], flipped]))[0] != digest
    assert payload_digest(payload(weights, examples=121))[0] != digest
    assert payload_digest(payload(weights[::-1]))[0] != digest  # the same arrays under other names


def test_cli_audit_verify(log, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["audit", "verify", str(log.path)])
    assert result.exit_code == 0, result.output
    assert (f"{log.path}: intact, 9 entries, rounds 1-3, hospitals [hospital_a, hospital_b, hospital_c], "
            f"last hash {log.head()[1][:12]}") in result.output

    rewrite(log.path, swap(lines(log.path)))
    result = runner.invoke(main, ["audit", "verify", str(log.path)])
    assert result.exit_code == 1 and f"{log.path}: line 4: seq 5, expected 4" in result.output
    assert "Traceback" not in result.output

    result = runner.invoke(main, ["audit", "verify", str(tmp_path / "missing.jsonl")])
    assert result.exit_code == 2 and "error:" in result.output and "audit log not found" in result.output
