"""Packed Paillier aggregation: keys, packing bounds, DJN encryption, wire format, tamper checks.

Most tests use one 1024-bit key made once per module: the code paths do not depend on the key size
(Packing and the wire width are computed from n), and a 1024-bit key makes key generation and each
decryption several times cheaper, so the file stays fast. 1024 bits is NOT a key size to deploy
(ensure_keys refuses it); one test makes and uses a real 2048-bit key pair end to end.
"""

from __future__ import annotations

import stat

import numpy as np
import pytest
from phe import paillier as phe

from fedbrain.errors import InputError
from fedbrain.secure import packing as packing_module
from fedbrain.secure.packing import CHECK_BITS, CiphertextError, EncodingError, Packing, pack, quantize, unpack
from fedbrain.secure.paillier import (
    Encryptor, KeyMismatch, add_encrypted, decrypt_range, decrypt_values, encrypt, encrypt_values, ensure_keys,
    fingerprint, from_array, load_private_key, load_public_key, require_key, share_ranges, to_array,
)


@pytest.fixture(scope="module")
def keys():
    return phe.generate_paillier_keypair(n_length=1024)


@pytest.fixture(scope="module")
def packing():
    return Packing(1024)


def weighted_updates(rng, hospitals: int, count: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Each hospital's update times its weight fraction (fractions sum to 1), and their exact sum."""
    fractions = rng.dirichlet(np.ones(hospitals))
    updates = []
    for k in range(hospitals):
        u = rng.normal(0, 0.01, count)
        u[:5] = [-3.999, 3.999, -1e-9, 1e-9, 0.0]          # large-but-in-range, tiny, zero
        u[5:10] = rng.uniform(-3.999, 3.999, 5)
        updates.append(u * fractions[k])
    return updates, np.sum(updates, axis=0)


def aggregate(pub, updates, packing, rng=None):
    return add_encrypted([encrypt_values(pub, u, packing, rng) for u in updates], pub)


@pytest.mark.parametrize("hospitals", [2, 3, 5, 10])
def test_packed_sum_equals_weighted_sum_within_bound(keys, packing, hospitals):
    pub, priv = keys
    rng = np.random.default_rng(hospitals)
    count = 3 * packing.slots + 7  # a partly filled last plaintext
    updates, exact = weighted_updates(rng, hospitals, count)
    total = aggregate(pub, updates, packing)
    assert total.shape == (packing.ciphertexts(count), 2 * 128)
    decoded = decrypt_values(priv, total, packing, count, hospitals)
    assert decoded.dtype == np.float64 and decoded.shape == (count,)
    assert np.max(np.abs(decoded - exact)) < packing.error_bound(hospitals)


def test_max_hospitals_at_the_extremes_never_carry(keys):
    """The padding proof at its boundary: max_hospitals encodings of +-largest values, slot by slot."""
    pub, priv = keys
    small = Packing(1024, max_hospitals=4)
    largest = 4 - 2.0 ** -20
    pattern = np.array([largest, -largest, largest, 0.0, -largest, -largest])
    values = np.resize(pattern, 2 * small.slots)
    total = add_encrypted([encrypt_values(pub, values, small) for _ in range(4)], pub)
    decoded = decrypt_values(priv, total, small, values.size, 4)
    assert np.max(np.abs(decoded - 4 * values)) < small.error_bound(4)


def test_more_than_max_hospitals_is_refused(keys):
    pub, priv = keys
    small = Packing(1024, max_hospitals=4)
    values = np.full(10, 0.5)
    total = add_encrypted([encrypt_values(pub, values, small) for _ in range(5)], pub)
    plaintexts = decrypt_range(priv, total, 0, total.shape[0])
    with pytest.raises(InputError, match="hospitals_added=5 is outside 1..max_hospitals=4"):
        unpack(plaintexts, small, values.size, 5)
    with pytest.raises(CiphertextError, match="reads 5 x its tag, expected 4"):  # a caller who miscounts
        unpack(plaintexts, small, values.size, 4)


def test_wrong_count_of_hospitals_is_detected(keys, packing):
    pub, priv = keys
    total = aggregate(pub, [np.full(5, 0.1)] * 3, packing)
    with pytest.raises(CiphertextError, match="reads 3 x its tag, expected 2"):
        decrypt_values(priv, total, packing, 5, 2)


@pytest.mark.parametrize("bad, message", [
    ([0.1, np.nan, 0.2], "1 of 3 values cannot be encoded: 1 NaN or infinite"),
    ([0.1, np.inf, -np.inf], "2 of 3 values cannot be encoded: 2 NaN or infinite"),
    ([4.0, -5.5, 1.0, 3.99],
     r"2 of 4 values cannot be encoded: 2 with \|value\| >= 2\^2 = 4 \(largest magnitude 5.5\)"),
])
def test_unencodable_values_are_refused(keys, packing, bad, message):
    with pytest.raises(EncodingError, match=message):
        encrypt_values(keys[0], np.array(bad), packing)


def test_stochastic_rounding_is_unbiased_and_within_one_unit(packing):
    rng = np.random.default_rng(0)
    ulp = 2.0 ** -packing.fraction_bits
    values = np.full(200_000, 0.3 * ulp) + rng.integers(-1000, 1000, 200_000) * ulp
    q = quantize(values, packing, rng)
    error = q - np.ldexp(values, packing.fraction_bits)
    assert np.all(np.abs(error) < 1)
    assert abs(error.mean()) < 4 * 0.5 / np.sqrt(values.size)


def test_pack_unpack_without_encryption_is_exact_on_the_grid(packing):
    values = np.arange(-500, 500) * 2.0 ** -packing.fraction_bits  # on the grid: rounding is exact
    assert np.array_equal(unpack(pack(values, packing), packing, values.size, 1), values)


def test_djn_ciphertexts_decrypt_with_phe_and_add_to_phe_ciphertexts(keys):
    pub, priv = keys
    plaintexts = [0, 1, 12345, pub.n - 1, 2 ** 1000 + 17]
    ciphertexts = encrypt(pub, plaintexts)
    assert [priv.raw_decrypt(int(c)) for c in ciphertexts] == plaintexts
    again = encrypt(pub, plaintexts)
    assert all(a != b for a, b in zip(ciphertexts, again))  # fresh randomness every time
    mixed = int(encrypt(pub, [7])[0]) * pub.raw_encrypt(5) % pub.nsquare  # phe's own r^n obfuscation
    assert priv.raw_decrypt(mixed) == 12
    assert priv.decrypt(phe.EncryptedNumber(pub, int(encrypt(pub, [42])[0]))) == 42
    with pytest.raises(EncodingError):
        encrypt(pub, [pub.n])


def test_encryptor_refuses_a_too_short_exponent(keys):
    with pytest.raises(InputError, match="exponent_bits"):
        Encryptor(keys[0], exponent_bits=128)


def test_a_flipped_byte_decrypts_to_garbage_that_the_check_refuses(keys, packing):
    pub, priv = keys
    values = np.linspace(-0.01, 0.01, 2 * packing.slots)
    total = aggregate(pub, [values, values], packing)
    tampered = total.copy()
    tampered[1, 100] ^= 0x10  # mid-ciphertext: still a valid-looking element of Z*_{n^2}
    assert len(from_array(tampered, pub)) == 2  # honest: the wire format cannot tell (malleable)
    with pytest.raises(CiphertextError, match="ciphertext 1"):
        decrypt_values(priv, tampered, packing, values.size, 2)
    one = encrypt_values(pub, values, packing)
    one[0, 200] ^= 0x01  # corrupted before the server added it
    with pytest.raises(CiphertextError):
        decrypt_values(priv, add_encrypted([one, encrypt_values(pub, values, packing)], pub), packing, values.size, 2)


def test_reordered_ciphertexts_are_refused(keys, packing):
    pub, priv = keys
    values = np.zeros(3 * packing.slots)
    a, b = encrypt_values(pub, values, packing), encrypt_values(pub, values, packing)
    with pytest.raises(CiphertextError, match="fail the check field"):
        decrypt_values(priv, add_encrypted([a, b[[1, 0, 2]]], pub), packing, values.size, 2)


def test_a_deliberate_homomorphic_edit_is_not_detected(keys, packing):
    """Documented limit: a party with the public key can add to a slot and keep the check field.

    Outside the honest-but-curious threat model (it would need MACs or zero-knowledge proofs).
    """
    pub, priv = keys
    values = np.zeros(packing.slots)
    total = from_array(aggregate(pub, [values], packing), pub)
    edit = int(encrypt(pub, [1 << (CHECK_BITS + 5 * packing.slot_bits)])[0])  # +1 unit in one slot
    edited = to_array([total[0] * edit % pub.nsquare], pub)
    decoded = decrypt_values(priv, edited, packing, values.size, 1)
    assert np.count_nonzero(decoded) == 1


@pytest.mark.parametrize("damage, reason", [
    (lambda a: a[:, :-1], r"shape \(count, 256\)"),                    # truncated ciphertexts
    (lambda a: a.ravel()[:-3], r"shape \(count, 256\)"),               # a truncated flat buffer
    (lambda a: a.astype(np.int16), "dtype int16"),
    (lambda a: np.vstack([a, np.zeros((1, 256), np.uint8)]), r"ciphertext 2 \(row 2 of 3\) is 0"),
    (lambda a: np.vstack([a, np.full((1, 256), 255, np.uint8)]), r"ciphertext 2 \(row 2 of 3\) is >= n"),
])
def test_malformed_arrays_are_refused(keys, packing, damage, reason):
    pub = keys[0]
    array = encrypt_values(pub, np.zeros(2 * packing.slots), packing)
    with pytest.raises(CiphertextError, match=reason):
        from_array(damage(array), pub)


def test_a_value_sharing_a_factor_with_n_is_refused(keys):
    pub, priv = keys
    with pytest.raises(CiphertextError, match="shares a factor with n"):
        from_array(to_array([priv.p], pub), pub)


def test_add_refuses_mismatched_or_missing_updates(keys, packing):
    pub = keys[0]
    a = encrypt_values(pub, np.zeros(2 * packing.slots), packing)
    b = encrypt_values(pub, np.zeros(3 * packing.slots), packing)
    with pytest.raises(CiphertextError, match=r"different lengths.*\[2, 3\]"):
        add_encrypted([a, b], pub)
    with pytest.raises(CiphertextError, match="no encrypted updates"):
        add_encrypted([], pub)


def test_shared_decryption_by_ranges_equals_one_decryption(keys, packing):
    pub, priv = keys
    rng = np.random.default_rng(1)
    count = 7 * packing.slots - 3
    updates, exact = weighted_updates(rng, 3, count)
    total = aggregate(pub, updates, packing)
    ranges = share_ranges(total.shape[0], 3)
    assert ranges == [(0, 3), (3, 5), (5, 7)]
    parts = [decrypt_range(priv, total, start, stop) for start, stop in ranges]
    decoded = unpack([p for part in parts for p in part], packing, count, 3)
    assert np.max(np.abs(decoded - exact)) < packing.error_bound(3)
    start, stop = ranges[1]  # a hospital can check (and decode) its own share alone
    share = unpack(parts[1], packing, (stop - start) * packing.slots, 3, first_ciphertext=start)
    assert np.array_equal(share, decoded[start * packing.slots:stop * packing.slots])
    with pytest.raises(CiphertextError, match="fail the check field"):
        unpack(parts[1], packing, (stop - start) * packing.slots, 3)  # tags of another position
    with pytest.raises(InputError, match="outside the aggregate"):
        decrypt_range(priv, total, 5, 8)


def test_share_ranges_cover_everything_evenly():
    assert share_ranges(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert share_ranges(2, 3) == [(0, 1), (1, 2), (2, 2)]
    assert share_ranges(0, 2) == [(0, 0), (0, 0)]
    with pytest.raises(InputError):
        share_ranges(5, 0)


def test_packing_parameters_are_validated_and_match_the_key(keys):
    assert (Packing(2048).slots, Packing(2048).slot_bits, Packing(3072).slots) == (87, 23, 131)
    assert Packing(2048).used_bits <= 2048 - packing_module.MARGIN_BITS
    with pytest.raises(InputError, match="max_hospitals"):
        Packing(2048, max_hospitals=0)
    with pytest.raises(InputError, match="too wide"):
        Packing(2048, fraction_bits=40, integer_bits=20)
    with pytest.raises(InputError, match="made for 2048-bit keys, the key is 1024 bits"):
        encrypt_values(keys[0], np.zeros(3), Packing(2048))


def test_key_files_made_once_private_and_reused_2048_round_trip(tmp_path):
    public_path, private_path = ensure_keys(tmp_path / "keys")
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert ensure_keys(tmp_path / "keys") == (public_path, private_path)
    pub, priv = load_public_key(public_path), load_private_key(private_path)
    assert pub.n.bit_length() == 2048 and priv.public_key == pub
    assert list(tmp_path.joinpath("keys").glob(".paillier_*")) == []  # no temporary files left
    require_key(pub, fingerprint(priv.public_key))
    # one real-size round trip: 3 hospitals, 2 ciphertexts each
    packing = Packing(2048)
    updates, exact = weighted_updates(np.random.default_rng(2), 3, packing.slots + 10)
    total = aggregate(pub, updates, packing)
    assert total.shape == (2, 512)
    decoded = decrypt_values(priv, total, packing, exact.size, 3)
    assert np.max(np.abs(decoded - exact)) < packing.error_bound(3)
    with pytest.raises(InputError, match="holds a 2048-bit key, 3072 bits were asked for"):
        ensure_keys(tmp_path / "keys", bits=3072)


def test_key_size_and_key_file_errors(tmp_path, keys):
    with pytest.raises(InputError, match="one of"):
        ensure_keys(tmp_path, bits=1024)
    (tmp_path / "only_public").mkdir()
    (tmp_path / "only_public" / "paillier_public.json").write_text("{}")
    with pytest.raises(InputError, match="without"):
        ensure_keys(tmp_path / "only_public")
    with pytest.raises(InputError, match="no Paillier key"):
        load_private_key(tmp_path / "absent.json")
    with pytest.raises(InputError, match="not a fedbrain-paillier-public-1 file"):
        load_public_key(tmp_path / "only_public" / "paillier_public.json")


def test_the_public_key_loads_from_its_file_or_its_text_and_a_private_key_is_refused(tmp_path, keys):
    """The kubernetes launcher hands the ServerApp the public key file's text in the run config."""
    import json

    pub, priv = keys
    public_text = json.dumps({"format": "fedbrain-paillier-public-1", "bits": 1024, "n": format(pub.n, "x")})
    (tmp_path / "public.json").write_text(public_text)
    assert load_public_key(public_text) == pub
    assert load_public_key(str(tmp_path / "public.json")) == pub == load_public_key(tmp_path / "public.json")
    private_text = json.dumps({"format": "fedbrain-paillier-private-1", "bits": 1024, "n": format(pub.n, "x"),
                               "p": format(priv.p, "x"), "q": format(priv.q, "x")})
    (tmp_path / "private.json").write_text(private_text)
    for given in (private_text, tmp_path / "private.json"):
        with pytest.raises(InputError, match="PRIVATE key; the server side takes the public key only") as error:
            load_public_key(given)
        message = str(error.value)
        assert not any(secret in message for secret in (format(priv.p, "x"), str(priv.p), format(priv.q, "x")))
    assert load_private_key(tmp_path / "private.json").p in (priv.p, priv.q)
    with pytest.raises(InputError, match="the Paillier key given as text is not a readable Paillier key file"):
        load_public_key('{"format": ')
    with pytest.raises(InputError, match="read from its key file only, not given as text") as error:
        load_private_key(private_text)
    assert format(priv.p, "x") not in str(error.value)


def test_a_different_key_is_refused_by_fingerprint(keys):
    pub = keys[0]
    other, _ = phe.generate_paillier_keypair(n_length=1024)
    mine, theirs = fingerprint(pub), fingerprint(other)
    assert len(mine) == 64 and mine != theirs
    with pytest.raises(KeyMismatch, match=f"hospital 2 holds Paillier key {theirs[:12]}.*key is {mine[:12]}"):
        require_key(other, mine, "hospital 2")
    assert isinstance(KeyMismatch("x"), InputError)
    # ciphertexts under another key do not decode either
    packing = Packing(1024)
    foreign = encrypt_values(other, np.zeros(5), packing)
    with pytest.raises(CiphertextError):
        decrypt_values(keys[1], foreign, packing, 5, 1)
