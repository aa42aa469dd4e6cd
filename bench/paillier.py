"""Paillier encrypted aggregation: packed + DJN encryption vs phe's one EncryptedNumber per float (not a test).

  .venv/bin/python bench/paillier.py [--values 2800000] [--hospitals 3] [--ciphertexts 1500] [--full]

Baseline: phe used as it comes, `public_key.encrypt(float)` -> one EncryptedNumber (one ciphertext)
per model value, `private_key.decrypt` per value, timed on `--sample` values and extrapolated per
value. fedbrain's path: fedbrain.secure.packing (BatchCrypt-style slots: 87 values per plaintext at
2048 bits) + fedbrain.secure.paillier (DJN fixed-base encryption, CRT decryption shared by ranges).
Both use the same 2048-bit key (made once under build/bench/paillier/keys, then reused).

The update is realistic: `--values` float32 deltas ~ N(0, 0.01), each hospital's multiplied by its
weight 1/hospitals. Packing and decoding run on the whole update; encryption, the server's addition
and decryption are timed on the first `--ciphertexts` ciphertexts and projected to the update's
count (they cost the same for every ciphertext); `--full` runs the whole round instead. Prints
(a) encryption seconds per model value, packed+DJN vs the baseline, and the ratio (target >= 500x);
(b) decryption seconds per value, packed vs the baseline; (c) ciphertext expansion, bytes of an
encrypted update / (4 bytes x values) (target <= 1.5); (d) projected seconds per round: encryption
per hospital, the server's addition of all hospitals' updates, shared decryption per hospital;
and the sums' largest error against the documented bound. Also times DJN with a 2 x 112-bit
exponent (not used: a stronger assumption) and decryption in 2 processes (both cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
WORK = PROJECT / "build" / "bench" / "paillier"
sys.path.insert(0, str(PROJECT / "src"))

import numpy as np  # noqa: E402

from fedbrain.secure.packing import Packing, pack, unpack  # noqa: E402
from fedbrain.secure.paillier import (  # noqa: E402
    Encryptor, add_encrypted, decrypt_range, encryptor, ensure_keys, load_private_key,
    load_public_key, share_ranges, to_array,
)


def seconds(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def baseline(public, private, sample: int) -> tuple[float, float]:
    """phe's own path: seconds per value to encrypt one float, and to decrypt it."""
    values = np.random.default_rng(1).normal(0, 0.01, sample) / 3
    encrypted, enc = seconds(lambda: [public.encrypt(float(v)) for v in values])
    decrypted, dec = seconds(lambda: [private.decrypt(e) for e in encrypted])
    assert np.allclose(decrypted, values)
    return enc / sample, dec / sample


def _decrypt_part(args):
    key_path, array, start, stop = args
    return decrypt_range(load_private_key(key_path), array, start, stop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--values", type=int, default=2_800_000, help="model values per update")
    parser.add_argument("--hospitals", type=int, default=3)
    parser.add_argument("--ciphertexts", type=int, default=1500, help="ciphertexts timed per step (projected)")
    parser.add_argument("--sample", type=int, default=50, help="values encrypted one per ciphertext by phe")
    parser.add_argument("--full", action="store_true", help="encrypt, add and decrypt the whole update")
    args = parser.parse_args()
    k = args.hospitals

    public_path, private_path = ensure_keys(WORK / "keys", 2048)
    public, private = load_public_key(public_path), load_private_key(private_path)
    packing = Packing(public.n.bit_length())
    total = packing.ciphertexts(args.values)
    timed = total if args.full else min(args.ciphertexts, total)
    timed_values = min(args.values, timed * packing.slots)
    scale = total / timed

    rng = np.random.default_rng(0)
    updates = [(rng.normal(0, 0.01, args.values).astype(np.float32) / np.float32(k)) for _ in range(k)]
    exact = np.sum([u.astype(np.float64) for u in updates], axis=0)

    # (a) encryption: pack the whole update, encrypt (and serialize) `timed` ciphertexts per hospital
    _, table_s = seconds(encryptor, public)  # once per process and key
    pack_s, enc_s, wire_s, arrays, packed = [], [], [], [], []
    for u in updates:
        plaintexts, s = seconds(pack, u, packing)
        pack_s.append(s)
        packed.append(plaintexts)
        ciphertexts, s = seconds(encryptor(public).encrypt, plaintexts[:timed])
        enc_s.append(s)
        array, s = seconds(to_array, ciphertexts, public)
        wire_s.append(s)
        arrays.append(array)
    per_hospital_enc = min(pack_s) + (min(enc_s) + min(wire_s)) * scale
    phe_enc, phe_dec = baseline(public, private, args.sample)
    short = Encryptor(public, exponent_bits=224)
    _, short_s = seconds(short.encrypt, plaintexts[:200])
    _, djn_s = seconds(encryptor(public).encrypt, plaintexts[:200])

    # server: add all hospitals' arrays (deserialize, multiply, serialize)
    aggregate, add_s = seconds(add_encrypted, arrays, public)

    # (b) shared decryption: each hospital one range of the (timed) aggregate; then the decoding
    ranges = share_ranges(aggregate.shape[0], k)
    parts, dec_s = [], []
    for start, stop in ranges:
        part, s = seconds(decrypt_range, private, aggregate, start, stop)
        parts.append(part)
        dec_s.append(s)
    plaintexts = [p for part in parts for p in part]
    decoded, unpack_s = seconds(unpack, plaintexts, packing, timed_values, k)
    error = float(np.max(np.abs(decoded - exact[:timed_values])))
    assert error < packing.error_bound(k), (error, packing.error_bound(k))
    # the decoding of a whole update, on the plaintexts its decryption yields (the sums of the packed
    # plaintexts: no wrap mod n, packing.py), and its error against the exact sum of every value
    whole = [sum(column) for column in zip(*packed)]
    decoded_full, unpack_full_s = seconds(unpack, whole, packing, args.values, k)
    error = max(error, float(np.max(np.abs(decoded_full - exact))))
    assert error < packing.error_bound(k), (error, packing.error_bound(k))
    # both cores for one hospital's decryption (the sample's ranges in 2 processes, vs 1 process)
    half = share_ranges(aggregate.shape[0], 2)
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(_decrypt_part, [(private_path, aggregate[:2], 0, 1)] * 2))  # start the workers
        _, two_s = seconds(lambda: list(pool.map(_decrypt_part, [(private_path, aggregate, a, b) for a, b in half])))
    one_s = sum(dec_s)

    dec_per_ct = one_s / timed
    per_value_dec = (dec_per_ct * total + unpack_full_s) / args.values
    enc_per_value = per_hospital_enc / args.values
    expansion = total * aggregate.shape[1] / (4 * args.values)
    share_dec = dec_per_ct * max(b - a for a, b in share_ranges(total, k)) + unpack_full_s / k
    result = {
        "key_bits": public.n.bit_length(), "values": args.values, "hospitals": k, "slots": packing.slots,
        "ciphertexts": total, "timed_ciphertexts": timed, "djn_table_s": round(table_s, 3),
        "pack_s": round(min(pack_s), 3), "djn_encrypt_ms": round(min(enc_s) / timed * 1e3, 3),
        "djn_224bit_encrypt_ms": round(short_s / 200 * 1e3, 3), "djn_same_run_ms": round(djn_s / 200 * 1e3, 3),
        "phe_encrypt_ms": round(phe_enc * 1e3, 3), "decrypt_ms": round(dec_per_ct * 1e3, 3),
        "phe_decrypt_ms": round(phe_dec * 1e3, 3), "unpack_s": round(unpack_full_s, 3),
        "add_ms_per_ciphertext": round(add_s / timed * 1e3, 4), "expansion": round(expansion, 3),
        "decrypt_1_process_s": round(one_s, 3), "decrypt_2_processes_s": round(two_s, 3),
        "max_error": error, "error_bound": packing.error_bound(k),
    }
    print(json.dumps(result))
    print(f"BENCH paillier ({public.n.bit_length()}-bit key, {packing.slots} values per ciphertext, "
          f"{args.values:,} values, {k} hospitals, {timed:,} of {total:,} ciphertexts timed"
          f"{'' if args.full else ' and projected'}):")
    print(f"  (a) encrypt per value: packed+DJN {enc_per_value * 1e6:.2f} us vs phe encrypt(float) "
          f"{phe_enc * 1e6:.0f} us (baseline): {phe_enc / enc_per_value:.0f}x; per ciphertext DJN "
          f"{min(enc_s) / timed * 1e3:.3f} ms vs phe {phe_enc * 1e3:.2f} ms ({phe_enc / (min(enc_s) / timed):.1f}x); "
          f"DJN with a 224-bit exponent (not used) {short_s / 200 * 1e3:.3f} ms")
    print(f"  (b) decrypt per value: packed {per_value_dec * 1e6:.2f} us vs phe decrypt {phe_dec * 1e6:.0f} us "
          f"(baseline): {phe_dec / per_value_dec:.0f}x; per ciphertext {dec_per_ct * 1e3:.3f} ms; "
          f"the timed aggregate in 2 processes {two_s:.2f} s vs 1 process {one_s:.2f} s ({one_s / two_s:.2f}x)")
    print(f"  (c) expansion: {total * aggregate.shape[1]:,} bytes / (4 x {args.values:,}) = {expansion:.3f} "
          f"(phe one per float: {aggregate.shape[1] / 4:.0f})")
    print(f"  (d) per round: encrypt {per_hospital_enc:.1f} s per hospital (pack {min(pack_s):.2f} s); server add "
          f"of {k} updates {add_s * scale:.2f} s; shared decryption {share_dec:.1f} s per hospital (of "
          f"{dec_per_ct * total + unpack_full_s:.1f} s in all); CPU in all "
          f"{k * per_hospital_enc + add_s * scale + dec_per_ct * total + unpack_full_s:.0f} s")
    print(f"  largest error of the decoded sums {error:.3g} < bound {k} x 2^-{packing.fraction_bits} = "
          f"{packing.error_bound(k):.3g}", flush=True)


if __name__ == "__main__":
    main()
