"""A tamper-evident audit log of federated rounds: one hash-chained JSON line per hospital per round.

Each line is `json.dumps(entry, sort_keys=True, separators=(",", ":"))` plus "\\n". The entry holds
`seq`, its 1-based line number, and `prev_sha256`, the SHA-256 hex of the previous line's exact bytes
without the newline; line 1's `prev_sha256` is GENESIS, 64 zeros. Entries hold counts, digests and
short labels only, never model values or patient data: lists, arrays and long strings are refused.

What the chain detects, assuming one spot was changed: a line edited, removed, inserted, repeated or
moved, and a torn last line (a crash while writing). What it cannot detect on its own: the last
line(s) removed (the rest is a valid prefix), the last line edited, or the whole tail from some line
on rewritten with fresh hashes (there is no secret key; anyone can recompute SHA-256). The remedy is
an anchor outside the file: the run logs `AuditLog.head()` (entry count, last hash) to MLflow, and
whoever checks the log compares `verify(path).entries` and `.last_sha256` with it.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from fedbrain.errors import InputError

GENESIS = "0" * 64
FIELDS = frozenset({"round", "node_id", "hospital", "examples", "payload_sha256", "payload_bytes", "time",
                    "aggregation", "phase", "status", "reason", "arrays"})
CHAIN_FIELDS = frozenset({"seq", "prev_sha256"})
MAX_STRING = 200  # a digest is 64 characters; anything much longer is not a label


def _sha(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def _dump(entry: dict) -> bytes:  # the one serialisation: the hash covers exact bytes
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _clean(entry: dict, allowed: frozenset) -> dict:
    """The entry with plain JSON scalars; ValueError for a key or value an audit line must not hold."""
    unknown = set(entry) - allowed
    if unknown:
        raise ValueError(f"audit entry: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    clean = {}
    for key, value in entry.items():
        if value is None or isinstance(value, bool):
            pass
        elif isinstance(value, numbers.Integral):  # numpy integers too (a sample count often is one)
            value = int(value)
        elif isinstance(value, numbers.Real) and math.isfinite(value):
            value = float(value)
        elif not (isinstance(value, str) and len(value) <= MAX_STRING):
            # An array, list or long text could carry model values or patient data out of the run.
            raise ValueError(f"audit entry: {key!r} is {type(value).__name__} {str(value)[:40]!r}...; only "
                             f"finite numbers, booleans and strings of at most {MAX_STRING} characters")
        clean[key] = value
    return clean


@dataclass(frozen=True)
class AuditResult:
    ok: bool
    entries: int  # lines that verified: the trusted prefix before first_bad_line
    first_bad_line: int | None  # 1-based
    reason: str | None
    rounds: tuple = ()  # distinct rounds in the trusted prefix, sorted
    hospitals: tuple = ()  # distinct hospital names (node ids where no name), sorted
    last_sha256: str = GENESIS  # hash of the last trusted line; GENESIS for none


def _parse(line: bytes) -> tuple[dict | None, str | None]:
    """(entry, None) for a line that is well formed on its own, else (None, why not)."""
    if not line:
        return None, "empty line"
    try:
        entry = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    except ValueError:
        return None, "not valid JSON"
    if not isinstance(entry, dict):
        return None, "not a JSON object"
    try:
        _clean(entry, FIELDS | CHAIN_FIELDS)
    except ValueError as exc:
        return None, str(exc)
    prev = entry.get("prev_sha256")
    if type(entry.get("seq")) is not int or not (isinstance(prev, str) and re.fullmatch("[0-9a-f]{64}", prev)):
        return None, "no valid seq and prev_sha256 (not written by AuditLog)"
    if _dump(entry) != line:  # the hash covers exact bytes: a re-formatted line is an edited line
        return None, "not in canonical JSON form (edited by hand?)"
    return entry, None


def verify(path) -> AuditResult:
    """Check the chain of the log at `path`; InputError only if the file cannot be read."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: audit log not found") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read the audit log ({exc.strerror or exc})") from None
    lines = data.split(b"\n")
    torn = lines.pop()  # what follows the last newline: b"" unless a write was cut short
    parsed = [_parse(line) for line in lines]
    hashes = [_sha(line) for line in lines]

    def fits(k: int, after: int) -> tuple[bool, bool]:  # (seq fits, prev_sha256 fits) line k after line `after`
        entry = parsed[k - 1][0]
        return entry["seq"] == after + 1, entry["prev_sha256"] == (hashes[after - 1] if after else GENESIS)

    def result(bad: int | None, reason: str | None = None) -> AuditResult:
        trusted = [parsed[i][0] for i in range(len(lines) if bad is None else bad - 1)]
        rounds = {e["round"] for e in trusted if type(e.get("round")) is int}
        hospitals = {str(e.get("hospital", e.get("node_id"))) for e in trusted if ("hospital" in e or "node_id" in e)}
        return AuditResult(bad is None, len(trusted), bad, reason, tuple(sorted(rounds)), tuple(sorted(hospitals)),
                           hashes[len(trusted) - 1] if trusted else GENESIS)

    for k in range(1, len(lines) + 1):
        entry, why = parsed[k - 1]
        if entry is None:
            return result(k, why)
        seq_ok, prev_ok = fits(k, k - 1)
        if seq_ok and prev_ok:
            continue
        # The break shows at line k; name the line that was actually tampered with where that is certain.
        if k > 1 and lines[k - 1] == lines[k - 2]:
            return result(k, f"repeats line {k - 1}")
        if k > 1 and all(fits(k, k - 2)):
            return result(k - 1, f"inserted: line {k} continues the chain from "
                                 + (f"line {k - 2}" if k > 2 else "the start"))
        if not seq_ok:
            following = parsed[k][0] if k < len(lines) else None
            if entry["seq"] == k + 1 and following is not None and following["seq"] == k:
                return result(k, f"seq {k + 1}, expected {k}: swapped with line {k + 1}")
            return result(k, f"seq {entry['seq']}, expected {k}: " + ("a line before it was removed (or it was moved)"
                             if entry["seq"] > k else "a line was inserted before it (or it was moved)"))
        # seq fits, prev_sha256 does not: line k-1 was edited, or this line's prev_sha256 was. If line k+1
        # vouches for this line's exact bytes, this line is original and line k-1 is the edited one.
        if k > 1 and k < len(lines) and parsed[k][0] is not None and all(fits(k + 1, k)):
            return result(k - 1, f"changed after it was written: line {k}'s prev_sha256 no longer matches it")
        return result(k, "prev_sha256 does not match " + (f"line {k - 1}: line {k - 1} or this line was changed"
                                                         if k > 1 else "the start of the log"))
    if torn:
        return result(len(lines) + 1, "incomplete last line (a crash while writing?)")
    return result(None)


class AuditLog:
    """Appends hash-chained entries to `path`; an existing log (a resumed run) must verify and is continued."""

    def __init__(self, path):
        self.path = Path(path)
        self._entries, self._last, self._size = 0, GENESIS, 0
        if self.path.exists():
            found = verify(self.path)
            if not found.ok:
                raise InputError(f"{self.path}: line {found.first_bad_line}: {found.reason}; refusing to append "
                                 "to a broken audit log (keep it as evidence and start a new one)")
            self._entries, self._last, self._size = found.entries, found.last_sha256, self.path.stat().st_size
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def head(self) -> tuple[int, str]:
        """(entries, SHA-256 of the last line): log these outside the file, e.g. to MLflow, to anchor the tail."""
        return self._entries, self._last

    def append(self, entry: dict) -> dict:
        """Validate, chain and durably write one entry; returns the entry as written."""
        if CHAIN_FIELDS & set(entry):
            raise ValueError("audit entry: 'seq' and 'prev_sha256' are set by AuditLog, not by the caller")
        entry = _clean(entry, FIELDS)
        entry.setdefault("time", datetime.now(timezone.utc).isoformat(timespec="milliseconds"))
        entry.update(seq=self._entries + 1, prev_sha256=self._last)
        line = _dump(entry)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size != self._size:  # a second writer would fork the chain
                raise InputError(f"{self.path}: changed by another writer since it was opened; not appending")
            # The whole line in one write at the end (O_APPEND), then fsync: a crash leaves the log with
            # either this complete line or a torn last line, which verify reports. The loop only
            # matters for a short write.
            data = line + b"\n"
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:  # make the new file's directory entry durable too
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        self._entries, self._last, self._size = self._entries + 1, _sha(line), self._size + len(line) + 1
        return entry


def payload_digest(records) -> tuple[str, int]:
    """SHA-256 hex and byte count of what a hospital sent: a Flower `RecordDict`.

    Hashed, records in sorted key order, every field length-prefixed so that different payloads never
    give the same byte stream: the record's kind and key; for an ArrayRecord its array count, then per
    array in sorted name order its name, dtype, shape, stype and raw bytes (`Array.data`); for a
    MetricRecord or ConfigRecord its sorted-key JSON (bytes values as hex). The byte count is the arrays'
    raw bytes plus those JSON texts: the payload's size, not its size on the wire (no protobuf framing).
    """
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord  # lazily: `audit verify` needs no Flower

    digest, size = hashlib.sha256(), 0

    def put(field: bytes):
        digest.update(len(field).to_bytes(8, "big") + field)

    for key in sorted(records):
        record = records[key]
        if isinstance(record, ArrayRecord):
            put(b"arrays"), put(key.encode()), put(str(len(record)).encode())
            for name in sorted(record):
                array = record[name]
                for field in (name, array.dtype, repr(tuple(array.shape)), array.stype):
                    put(str(field).encode())
                put(array.data)
                size += len(array.data)
        elif isinstance(record, (MetricRecord, ConfigRecord)):
            text = json.dumps(dict(record), sort_keys=True, separators=(",", ":"),
                              default=lambda value: value.hex() if isinstance(value, bytes) else str(value)).encode()
            put(b"metrics" if isinstance(record, MetricRecord) else b"config"), put(key.encode()), put(text)
            size += len(text)
        else:
            raise TypeError(f"payload_digest: {key!r} is a {type(record).__name__}, not a Flower record")
    return digest.hexdigest(), size


def reply_entry(server_round: int, phase: str, node_id: int, hospital: int | None, reply, aggregation: str) -> dict:
    """The audit entry of one reply the server received (a Flower Message): who, what digest, how big.
    Only counts, digests and labels: the message's values stay out of the log."""
    entry = {"round": server_round, "phase": phase, "node_id": node_id, "hospital": hospital,
             "aggregation": aggregation}
    if reply.has_error():
        return entry | {"status": "failed", "reason": str(reply.error.reason)[:MAX_STRING]}
    digest, size = payload_digest(reply.content)
    # What kind of arrays arrived (names, dtypes, shapes; never values): shows, for example, that an
    # encrypted run's server received ciphertexts only.
    arrays = " ".join(f"{key}/{name}:{array.dtype}[{'x'.join(map(str, array.shape))}]" for key, record in
                      sorted(reply.content.array_records.items()) for name, array in sorted(record.items()))
    examples = None
    for record in reply.content.metric_records.values():
        examples = record.get("num-examples", examples)
        if entry["hospital"] is None and "hospital" in record:
            entry["hospital"] = int(record["hospital"])
    return entry | {"status": "received", "payload_sha256": digest, "payload_bytes": size, "examples": examples,
                    "arrays": arrays[:MAX_STRING]}
