"""Packing model values into Paillier plaintexts (BatchCrypt-style) and decoding their sums.

A plaintext is one integer below n holding `slots` fixed-point values plus a check field:

    most significant                                                  least significant
    [ zero margin ][ slot 0 ][ slot 1 ] ... [ slot slots-1 ][ check field, CHECK_BITS ]

Encoding one hospital's values (the caller has already multiplied them by the hospital's weight
fraction n_k / N):
- each value v must be finite with |v| < 2^integer_bits (else EncodingError, nothing is encoded);
- stochastic rounding to fixed point: x = v * 2^fraction_bits, q = floor(x) + [u < x - floor(x)]
  with u uniform in [0, 1), so E[q] = x and |q - x| < 1; q is clipped to [-B, B] with
  B = 2^(integer_bits + fraction_bits) - 1 (only |x| in (B, B + 1) is affected: still |q - x| < 1,
  but no longer unbiased there);
- offset slots: the slot holds e = q + B, an integer in [0, 2B] = [0, 2^value_bits - 2] with
  value_bits = integer_bits + fraction_bits + 1;
- the check field holds tag(j) = 1 + (j mod 2^TAG_BITS) for the plaintext's index j in the update.

Why no carry ever crosses a slot (the proof the widths rest on): the sum of k <= max_hospitals
encodings of one slot is at most k * (2^value_bits - 2) < 2^value_bits * 2^padding_bits, with
padding_bits = ceil(log2(max_hospitals)), which is the slot's width; it holds for ANY in-range
values, so it does not depend on the weight fractions summing to <= 1 (that only keeps the decoded
sum meaningful as a weighted average). The check field's sum is at most k * 2^TAG_BITS <
2^CHECK_BITS. The whole packed sum stays below 2^used_bits <= 2^(key_bits - MARGIN_BITS) < n / 2, so
the Paillier addition mod n never wraps either. Offset slots cost the same bits as two's complement
with padding (BatchCrypt), but their sum decodes exactly whatever the caller's fractions, and an
out-of-range slot sum is itself evidence of corruption.

Error bound of a decoded sum of k hospitals' encodings, for every value:
    |decoded - sum_k v_k| < k * 2^-fraction_bits      (deterministic; strict)
and the error is unbiased with standard deviation <= sqrt(k) / 2 * 2^-fraction_bits (each hospital's
rounding error is independent, zero-mean, variance <= 1/4 ulp^2). Decoding itself is exact: slot sums
are integers below 2^53, converted to float64 and scaled by a power of two.

Tamper check at decoding (see `unpack`): Paillier is malleable and a flipped ciphertext byte still
decrypts, to a plaintext that is in effect uniformly random below n. Decoding refuses (CiphertextError)
a plaintext with any bit set above used_bits (a random plaintext passes that with probability
< 2^-(key_bits - 1 - used_bits)), whose check field is not exactly hospitals_added * tag(j) (random:
2^-CHECK_BITS), or whose slot sums exceed hospitals_added * 2B, or whose unused slots (after the
last value) do not decode to exactly 0. So random corruption, ciphertexts added out of order or
from another update position, ciphertexts under another key, and a wrong count of hospitals added
(including more than max_hospitals) are detected. What it does NOT detect: a deliberate homomorphic
edit by a party holding the public key (multiplying in Enc(d) for a d that leaves the check field
alone), or a whole update replayed from another round. That is outside the honest-but-curious
threat model; stopping it would take MACs or zero-knowledge proofs.

Randomness for rounding comes from numpy's Generator seeded from the OS (or the caller's rng): it
does not protect anything secret (the server learns the sum of rounded values, which is the point),
so it need not be cryptographic. The encryption randomness (paillier.py) is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedbrain.errors import InputError

CHECK_BITS = 40     # the check field's width
TAG_BITS = 20       # tag(j) = 1 + (j mod 2^TAG_BITS): max_hospitals * 2^TAG_BITS < 2^CHECK_BITS
MARGIN_BITS = 2     # used_bits <= key_bits - MARGIN_BITS, so a sum stays below n / 2
MAX_HOSPITALS = 2 ** 16
CHUNK = 2048        # plaintexts packed/unpacked per numpy pass (bounds the bit arrays' memory)


class EncodingError(InputError):
    """Values that cannot be encoded under a Packing (NaN, infinite, or too large)."""


class CiphertextError(InputError):
    """Malformed, truncated or tampered ciphertexts, or plaintexts that fail the check at decoding."""


@dataclass(frozen=True)
class Packing:
    """Fixed-point slots for one key size; see the module docstring for the layout and bounds."""

    key_bits: int
    fraction_bits: int = 16
    integer_bits: int = 2
    max_hospitals: int = 16

    def __post_init__(self):
        if not 1 <= self.fraction_bits <= 40:
            raise InputError(f"fraction_bits must be 1..40, got {self.fraction_bits}")
        if not 0 <= self.integer_bits <= 20:
            raise InputError(f"integer_bits must be 0..20, got {self.integer_bits}")
        if not 1 <= self.max_hospitals <= MAX_HOSPITALS:
            raise InputError(f"max_hospitals must be 1..{MAX_HOSPITALS}, got {self.max_hospitals}")
        if self.slot_bits > 62:
            raise InputError(f"a slot of {self.slot_bits} bits is too wide (at most 62): lower fraction_bits, "
                             "integer_bits or max_hospitals")
        if self.slots < 1:
            raise InputError(f"a {self.key_bits}-bit key has no room for one {self.slot_bits}-bit slot")

    @property
    def value_bits(self) -> int:
        return self.integer_bits + self.fraction_bits + 1

    @property
    def padding_bits(self) -> int:
        return (self.max_hospitals - 1).bit_length()  # ceil(log2(max_hospitals))

    @property
    def slot_bits(self) -> int:
        return self.value_bits + self.padding_bits

    @property
    def offset(self) -> int:
        return 2 ** (self.integer_bits + self.fraction_bits) - 1

    @property
    def slots(self) -> int:
        return (self.key_bits - MARGIN_BITS - CHECK_BITS) // self.slot_bits

    @property
    def used_bits(self) -> int:
        return CHECK_BITS + self.slots * self.slot_bits

    @property
    def plaintext_bytes(self) -> int:
        return (self.used_bits + 7) // 8

    @property
    def limit(self) -> float:
        return 2.0 ** self.integer_bits

    def ciphertexts(self, count: int) -> int:
        """How many plaintexts (ciphertexts) `count` values take."""
        return -(-count // self.slots)

    def error_bound(self, hospitals: int) -> float:
        """The strict bound on |decoded - exact| per value for a sum of `hospitals` encodings."""
        return hospitals * 2.0 ** -self.fraction_bits

    def check_key(self, n: int) -> None:
        if n.bit_length() != self.key_bits:
            raise InputError(f"this Packing was made for {self.key_bits}-bit keys, the key is {n.bit_length()} bits")


def _tags(first: int, count: int) -> np.ndarray:
    return 1 + (np.arange(first, first + count, dtype=np.uint64) % (1 << TAG_BITS))


def _to_bits(values: np.ndarray, width: int) -> np.ndarray:
    """uint64 array (...,) -> its low `width` bits, most significant first, as uint8 (..., width)."""
    nbytes = (width + 7) // 8
    big = values.astype(">u8").view(np.uint8).reshape(values.shape + (8,))[..., 8 - nbytes:]
    return np.unpackbits(big, axis=-1)[..., nbytes * 8 - width:]


def _from_bits(bits: np.ndarray) -> np.ndarray:
    """uint8 bits (..., width), most significant first -> uint64 (...,). width <= 64."""
    width = bits.shape[-1]
    nbytes = (width + 7) // 8
    lead = nbytes * 8 - width
    if lead:
        bits = np.concatenate([np.zeros(bits.shape[:-1] + (lead,), np.uint8), bits], axis=-1)
    full = np.zeros(bits.shape[:-1] + (8,), np.uint8)
    full[..., 8 - nbytes:] = np.packbits(bits, axis=-1)
    return full.view(">u8")[..., 0].astype(np.uint64)


def _refuse_unencodable(v: np.ndarray, packing: Packing) -> None:
    finite = np.isfinite(v)
    too_large = finite & (np.abs(v) >= packing.limit)
    bad = int(np.count_nonzero(~finite)) + int(np.count_nonzero(too_large))
    if bad:
        nonfinite = int(np.count_nonzero(~finite))
        largest = float(np.max(np.abs(v[too_large]))) if too_large.any() else None
        parts = []
        if too_large.any():
            parts.append(f"{int(np.count_nonzero(too_large))} with |value| >= 2^{packing.integer_bits} = "
                         f"{packing.limit:g} (largest magnitude {largest:.6g})")
        if nonfinite:
            parts.append(f"{nonfinite} NaN or infinite")
        raise EncodingError(f"{bad} of {v.size} values cannot be encoded: {'; '.join(parts)}. Clip or scale the "
                            f"update, or raise integer_bits")


def quantize(values, packing: Packing, rng: np.random.Generator | None = None) -> np.ndarray:
    """Stochastically rounded fixed-point integers q (int64), |q| <= offset; EncodingError if unencodable."""
    v = np.asarray(values, dtype=np.float64).ravel()
    _refuse_unencodable(v, packing)
    rng = rng if rng is not None else np.random.default_rng()
    x = np.ldexp(v, packing.fraction_bits)  # exact: a power-of-two scaling
    low = np.floor(x)
    q = low + (rng.random(x.shape) < (x - low))
    return np.clip(q, -packing.offset, packing.offset).astype(np.int64)


def pack(values, packing: Packing, rng: np.random.Generator | None = None) -> list[int]:
    """One hospital's (already weighted) values -> plaintext integers, each < 2^used_bits."""
    q = quantize(values, packing, rng)
    count = q.size
    total = packing.ciphertexts(count)
    slots = np.full(total * packing.slots, packing.offset, dtype=np.uint64)  # unused slots hold 0
    slots[:count] = (q + packing.offset).astype(np.uint64)
    slots = slots.reshape(total, packing.slots)
    lead = packing.plaintext_bytes * 8 - packing.used_bits
    plaintexts: list[int] = []
    width = packing.plaintext_bytes
    for first in range(0, total, CHUNK):
        block = slots[first:first + CHUNK]
        rows = block.shape[0]
        bits = np.concatenate([
            np.zeros((rows, lead), np.uint8),
            _to_bits(block, packing.slot_bits).reshape(rows, -1),
            _to_bits(_tags(first, rows), CHECK_BITS),
        ], axis=1)
        raw = np.packbits(bits, axis=1).tobytes()
        plaintexts.extend(int.from_bytes(raw[i:i + width], "big") for i in range(0, len(raw), width))
    return plaintexts


def unpack(plaintexts, packing: Packing, count: int, hospitals_added: int, first_ciphertext: int = 0) -> np.ndarray:
    """Decrypted sums of `hospitals_added` encodings -> `count` float64 sums (see the module's checks).

    `first_ciphertext` is the position of plaintexts[0] in the update, for decoding one hospital's
    share (decrypt_range) on its own; the tags it checks depend on it.
    """
    k = hospitals_added
    if not 1 <= k <= packing.max_hospitals:
        raise InputError(f"hospitals_added={k} is outside 1..max_hospitals={packing.max_hospitals}: with more "
                         "addends than the padding bits allow, slots could carry into each other")
    plaintexts = list(plaintexts)
    if count < 0 or packing.ciphertexts(count) != len(plaintexts):
        raise CiphertextError(f"{count} values take {packing.ciphertexts(max(count, 0))} plaintexts of "
                              f"{packing.slots} slots, got {len(plaintexts)}")
    width = packing.plaintext_bytes
    limit = 1 << packing.used_bits
    out = np.empty(len(plaintexts) * packing.slots, dtype=np.float64)
    for first in range(0, len(plaintexts), CHUNK):
        block = plaintexts[first:first + CHUNK]
        high = [first + i for i, p in enumerate(block) if not 0 <= p < limit]
        if high:
            raise CiphertextError(f"{len(high)} decrypted plaintext(s) have bits above the packed width, first at "
                                  f"ciphertext {first_ciphertext + high[0]}: corrupted or tampered ciphertexts, "
                                  "or ones encrypted under another key")
        raw = np.frombuffer(b"".join(int(p).to_bytes(width, "big") for p in block), np.uint8)
        bits = np.unpackbits(raw.reshape(len(block), width), axis=1)[:, width * 8 - packing.used_bits:]
        tags = _from_bits(bits[:, -CHECK_BITS:])
        wrong = np.flatnonzero(tags != k * _tags(first_ciphertext + first, len(block)))
        if wrong.size:
            j = int(wrong[0])
            seen = int(tags[j]) / int(_tags(first_ciphertext + first + j, 1)[0])
            raise CiphertextError(f"{wrong.size} plaintext(s) fail the check field, first at ciphertext "
                                  f"{first_ciphertext + first + j} (it reads {seen:g} x its tag, expected "
                                  f"{k}): corrupted, reordered or foreign ciphertexts, or a different number of "
                                  f"hospitals was added than {k}")
        sums = _from_bits(bits[:, :-CHECK_BITS].reshape(len(block), packing.slots, packing.slot_bits))
        if np.any(sums > k * 2 * packing.offset):
            raise CiphertextError(f"slot sums above {k} x the largest encoding near ciphertext "
                                  f"{first_ciphertext + first}: corrupted ciphertexts")
        decoded = sums.astype(np.int64) - k * packing.offset
        out[first * packing.slots:(first + len(block)) * packing.slots] = np.ldexp(
            decoded.ravel().astype(np.float64), -packing.fraction_bits)
    if np.any(out[count:] != 0):
        raise CiphertextError("the unused slots after the last value do not decode to 0: corrupted ciphertexts")
    return out[:count]
