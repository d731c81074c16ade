"""SecAgg+ core: the server gets exactly the survivors' sum, and nothing a client sends gives its input away."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pollinate.secagg import (ClientSession, MaskedInput, PublicKeys, Quantization, RoundConfig, SecAggError, ServerSession,
                    ShareDelivery, UnmaskRequest, UnmaskShares, dequantize_sum, minimum_threshold, quantize,
                    regular_graph, run_round)
from pollinate.secagg import shamir

SETTINGS = settings(max_examples=12, deadline=None)


def complete_round(n: int, length: int = 64, round_id: int = 3, q: Quantization = Quantization()) -> RoundConfig:
    neighbours = regular_graph(range(1, n + 1), n - 1, seed=0)
    return RoundConfig(round_id, neighbours, minimum_threshold(n - 1), length, q)


def random_inputs(config: RoundConfig, seed: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    q = config.quantization
    return {u: rng.integers(0, q.levels, config.vector_length, dtype=q.dtype) for u in config.neighbours}


def plain_sum(inputs: dict[int, np.ndarray], clients: list[int]) -> np.ndarray:
    return sum((inputs[u] for u in clients), np.zeros_like(inputs[clients[0]]))


def seeded(config: RoundConfig, seed: int = 0) -> dict[int, random.Random]:
    return {u: random.Random(seed * 1000 + u) for u in config.neighbours}  # reproducible tests only


def sessions_after_stage_1(config: RoundConfig):
    """A server and clients with keys advertised and stage 1 closed: (server, sessions, NeighbourKeys)."""
    server = ServerSession(config)
    sessions = {u: ClientSession(s, random.Random(u)) for u, s in server.setup().items()}
    for s in sessions.values():
        server.receive_keys(s.advertise_keys())
    return server, sessions, server.forward_keys()


# --- the sum ------------------------------------------------------------------------------------------

@SETTINGS
@given(n=st.integers(3, 6), length=st.integers(1, 40), bits=st.sampled_from([32, 64]), seed=st.integers(0, 2**16))
def test_masked_sum_equals_plaintext_sum_within_the_quantisation_bound(n: int, length: int, bits: int, seed: int):
    q = Quantization(clip=2.0, levels=2**12 if bits == 32 else 2**30, modulus_bits=bits)
    config = complete_round(n, length, q=q)
    rng = np.random.default_rng(seed)
    values = {u: rng.uniform(-1, 1, length).astype(np.float32) for u in config.neighbours}
    weights = {u: float(rng.uniform(0.1, 2.0)) for u in config.neighbours}
    result = run_round(config, {u: quantize(values[u], weights[u], q) for u in values})
    got = dequantize_sum(result.total, n, q)
    want = sum(weights[u] * values[u].astype(np.float64) for u in values)
    assert np.all(np.abs(got - want) <= n * q.step / 2 * (1 + 1e-9))


def test_stochastic_rounding_stays_within_one_step_per_client_and_is_seeded():
    q = Quantization(clip=1.0, levels=2**8)
    x = np.random.default_rng(1).uniform(-1, 1, 10_000).astype(np.float32)
    a, b = (quantize(x, 0.5, q, np.random.default_rng(7)) for _ in range(2))
    assert np.array_equal(a, b)
    error = dequantize_sum(a, 1, q) - 0.5 * x.astype(np.float64)
    assert np.abs(error).max() < q.step
    assert abs(error.mean()) < q.step / 20  # unbiased: the mean error shrinks like step / sqrt(len)


def test_quantisation_that_could_wrap_the_ring_is_refused():
    with pytest.raises(ValueError, match="overflow the 2\\^32 ring"):
        Quantization(levels=2**16 + 1).check_fits(2**16)
    with pytest.raises(ValueError, match="overflow"):
        complete_round(3, q=Quantization(levels=2**31))
    Quantization(levels=2**31, modulus_bits=64).check_fits(3)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_integer_sum_is_exact_when_clients_drop_after_each_stage(stage: int):
    config = RoundConfig(5, regular_graph(range(12), 8, seed=4), minimum_threshold(8), 300)
    inputs = random_inputs(config, seed=stage)
    result = run_round(config, inputs, drop_after={2: stage, 7: stage, 11: stage}, rngs=seeded(config))
    # A client that sent its masked input (stage 3) is in the sum even if it never answers stage 4.
    survivors = [u for u in config.neighbours if stage == 3 or u not in (2, 7, 11)]
    assert result.survivors == survivors and result.rejected == []
    assert np.array_equal(result.total, plain_sum(inputs, survivors))


def test_dropouts_at_every_stage_at_once_still_give_the_exact_sum():
    config = complete_round(10, length=100)  # 9 neighbours, t = 5: four may drop
    inputs = random_inputs(config, seed=9)
    result = run_round(config, inputs, drop_after={1: 0, 2: 1, 3: 2, 4: 3})
    assert result.survivors == [4, 5, 6, 7, 8, 9, 10]
    assert np.array_equal(result.total, plain_sum(inputs, result.survivors))


def test_too_many_dropped_neighbours_make_the_round_fail_with_secagg_error():
    config = complete_round(7)  # 6 neighbours each, t = 4: two dropouts are fine, three are not
    with pytest.raises(SecAggError, match=r"round cannot be unmasked: only 3 of the 4 shares needed for client \d"):
        run_round(config, random_inputs(config, 0), drop_after={1: 2, 2: 2, 3: 3})


# --- what clients reveal --------------------------------------------------------------------------------

def test_client_never_reveals_both_secrets_of_the_same_peer():
    config = complete_round(4, length=8)
    server, sessions, forwarded = sessions_after_stage_1(config)
    for u, s in sessions.items():
        server.receive_shares(s.share_keys(forwarded[u]))
    deliveries = server.route_shares()
    zero = np.zeros(8, np.uint32)
    for u, s in sessions.items():
        s.mask_input(deliveries[u], zero)
    greedy = UnmaskRequest(config.round_id, 1, survivors=[2, 3, 4], dropped=[2])
    with pytest.raises(SecAggError, match=r"both secrets of \[2\]"):
        sessions[1].unmask(greedy)
    honest = sessions[2].unmask(UnmaskRequest(config.round_id, 2, survivors=[1, 3], dropped=[4]))
    assert (honest.seed_owners, honest.key_owners) == ([1, 3], [4])
    with pytest.raises(SecAggError, match="after unmask"):  # a second request cannot ask for the other secret
        sessions[2].unmask(UnmaskRequest(config.round_id, 2, survivors=[4], dropped=[1, 3]))
    with pytest.raises(SecAggError, match="revealed both secrets"):
        UnmaskShares(config.round_id, 3, [1], [honest.seed_shares[0]], [1], [honest.seed_shares[0]], [])


def test_client_refuses_a_threshold_that_would_let_a_lying_server_collect_both_secrets():
    with pytest.raises(ValueError, match="threshold 2 must be in 3..4"):
        RoundConfig(1, regular_graph(range(5), 4, seed=0), 2, 8)
    good = ServerSession(complete_round(5)).setup()[1]
    with pytest.raises(SecAggError, match="more than half"):
        ClientSession(dataclasses.replace(good, threshold=2))


def test_masked_upload_of_a_zero_input_is_indistinguishable_from_uniform():
    length = 2**18
    config = complete_round(3, length=length)
    server, sessions, forwarded = sessions_after_stage_1(config)
    for u, s in sessions.items():
        server.receive_shares(s.share_keys(forwarded[u]))
    deliveries = server.route_shares()
    upload = sessions[1].mask_input(deliveries[1], np.zeros(length, np.uint32)).masked
    # Chi-square over 256 bins (255 dof): 377 is its 1 - 1e-6 quantile, so a real PRG fails ~never.
    for byte in (upload & 0xFF, upload >> 24):
        counts = np.bincount(byte.astype(np.int64), minlength=256)
        expected = length / 256
        assert ((counts - expected) ** 2 / expected).sum() < 377
    # Uniform on [0, 2^32): mean 2^31, standard error 2^32 / sqrt(12 * length) ~ 2.4e6; allow 6 of them.
    assert abs(upload.astype(np.float64).mean() - 2**31) < 6 * 2**32 / np.sqrt(12 * length)


# --- what the server rejects ----------------------------------------------------------------------------

def test_tampered_share_ciphertext_fails_authentication_and_is_recorded_not_fatal():
    config = complete_round(6, length=50)  # t = 3 of 5: one missing share per client is tolerable
    inputs = random_inputs(config, 1)

    def flip_one_bit(msg: object) -> object:
        if isinstance(msg, ShareDelivery) and msg.receiver == 4:
            i = msg.senders.index(2)
            bad = bytearray(msg.ciphertexts[i])
            bad[40] ^= 1
            return dataclasses.replace(msg, ciphertexts=msg.ciphertexts[:i] + [bytes(bad)] + msg.ciphertexts[i + 1:])
        return msg

    result = run_round(config, inputs, intercept=flip_one_bit)
    assert result.undecryptable == [(2, 4)]
    assert np.array_equal(result.total, plain_sum(inputs, list(config.neighbours)))


def test_share_ciphertexts_are_bound_to_their_sender_and_receiver():
    config = complete_round(5, length=20)

    def swap_senders(msg: object) -> object:  # route 2's ciphertext as if it came from 3, and vice versa
        if isinstance(msg, ShareDelivery) and msg.receiver == 1:
            order = {2: 3, 3: 2}
            return dataclasses.replace(msg, ciphertexts=[msg.ciphertexts[msg.senders.index(order.get(s, s))]
                                                         for s in msg.senders])
        return msg

    with pytest.raises(SecAggError, match="could not decrypt their share"):
        run_round(config, random_inputs(config, 2), drop_after={4: 2}, intercept=swap_senders)


def test_replayed_duplicated_missized_and_unknown_messages_are_rejected_and_the_round_survives():
    config = complete_round(4, length=16)
    server = ServerSession(config)
    sessions = {u: ClientSession(s, random.Random(u)) for u, s in server.setup().items()}
    keys = {u: s.advertise_keys() for u, s in sessions.items()}
    server.receive_keys(keys[1])
    with pytest.raises(SecAggError, match="for round 2, this is round 3; rejected \\(a replay"):
        server.receive_keys(dataclasses.replace(keys[2], round_id=2))
    with pytest.raises(SecAggError, match="second PublicKeys from client 1; rejected \\(duplicate\\)"):
        server.receive_keys(keys[1])
    with pytest.raises(SecAggError, match="from client 9, which is not in this round"):
        server.receive_keys(dataclasses.replace(keys[2], sender=9))
    with pytest.raises(SecAggError, match="masking_key from client 2 is 31 bytes, expected 32"):
        PublicKeys(3, 2, keys[2].encryption_key, keys[2].masking_key[:31])
    with pytest.raises(SecAggError, match="must be an int"):
        PublicKeys("3", 2, keys[2].encryption_key, keys[2].masking_key)  # type: ignore[arg-type]
    for u in (2, 3, 4):
        server.receive_keys(keys[u])
    forwarded = server.forward_keys()
    with pytest.raises(SecAggError, match="late or out of order"):
        server.receive_keys(keys[1])
    shares = {u: s.share_keys(forwarded[u]) for u, s in sessions.items()}
    with pytest.raises(SecAggError, match=r"ciphertexts\[0\] is 169 bytes, expected 170"):
        dataclasses.replace(shares[1], ciphertexts=[c[:-1] for c in shares[1].ciphertexts])
    with pytest.raises(SecAggError, match=r"address \[2, 3\], expected exactly its neighbours with keys \[2, 3, 4\]"):
        server.receive_shares(dataclasses.replace(shares[1], receivers=[2, 3], ciphertexts=shares[1].ciphertexts[:2]))
    for u in sessions:
        server.receive_shares(shares[u])
    deliveries = server.route_shares()
    with pytest.raises(SecAggError, match="ShareDelivery for round 4 reached client 1 in round 3"):
        sessions[1].mask_input(dataclasses.replace(deliveries[1], round_id=4), np.zeros(16, np.uint32))
    inputs = random_inputs(config, 5)
    uploads = {u: sessions[u].mask_input(deliveries[u], inputs[u]) for u in (2, 3, 4)}
    with pytest.raises(SecAggError, match=r"is uint32 \(15,\), expected uint32 \(16,\)"):
        server.receive_masked_input(MaskedInput(3, 2, uploads[2].masked[:15]))
    with pytest.raises(SecAggError, match="1-D uint32/uint64"):
        MaskedInput(3, 2, uploads[2].masked.astype(np.float32))
    for u in (2, 3, 4):
        server.receive_masked_input(uploads[u])
    with pytest.raises(SecAggError, match="second MaskedInput from client 2"):
        server.receive_masked_input(uploads[2])
    requests = server.unmask_requests()
    assert requests[2].dropped == [1]  # client 1's masked input was never accepted: it dropped
    for u in (2, 3, 4):
        server.receive_unmask(sessions[u].unmask(requests[u]))
    assert np.array_equal(server.aggregate(), plain_sum(inputs, [2, 3, 4]))


# --- Shamir -----------------------------------------------------------------------------------------------

@SETTINGS
@given(secret=st.binary(min_size=1, max_size=64), n=st.integers(1, 12), data=st.data())
def test_any_threshold_shares_reconstruct_the_secret(secret: bytes, n: int, data: st.DataObject):
    t = data.draw(st.integers(1, n))
    shares = shamir.split(secret, t, n, random.Random(n * t))
    chosen = data.draw(st.lists(st.sampled_from(shares), min_size=t, max_size=n, unique=True))
    assert shamir.combine(chosen) == secret


@SETTINGS
@given(secret=st.binary(min_size=32, max_size=32), t=st.integers(2, 8), seed=st.integers(0, 2**32))
def test_threshold_minus_one_shares_and_a_wrong_one_do_not_reconstruct(secret: bytes, t: int, seed: int):
    shares = shamir.split(secret, t, t + 2, random.Random(seed))
    x, payload = shares[t]
    wrong = (x, payload[:-1] + bytes([payload[-1] ^ 1]))
    try:
        assert shamir.combine(shares[:t - 1] + [wrong]) != secret
    except ValueError as err:
        assert "a share is wrong" in str(err)
    with pytest.raises(ValueError, match="does not lie on the polynomial"):  # with a spare share it is caught
        shamir.combine(shares[:t] + [wrong])


def test_shamir_refuses_too_few_duplicate_and_mismatched_shares():
    shares = shamir.split(b"k" * 32, 3, 5, random.Random(0))
    with pytest.raises(ValueError, match="too few shares: 2 given, 3 needed"):
        shamir.combine(shares[:2])
    with pytest.raises(ValueError, match="duplicate share x-coordinates \\[1\\]"):
        shamir.combine([shares[0], shares[0], shares[1]])
    with pytest.raises(ValueError, match="payload lengths"):
        shamir.combine([shares[0], shares[1], (3, shares[2][1][:-1])])
    other = shamir.split(b"k" * 16, 3, 5, random.Random(0))
    with pytest.raises(ValueError, match="different splits"):
        shamir.combine(shares[:2] + other[2:3])


# --- the graph ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("n", "k", "degree"), [(20, 6, 6), (21, 4, 4), (21, 5, 6), (8, 7, 7), (8, 30, 7), (9, 7, 8)])
def test_graph_is_regular_symmetric_and_a_function_of_its_seed(n: int, k: int, degree: int):
    graph = regular_graph(range(100, 100 + n), k, seed=11)
    assert {len(vs) for vs in graph.values()} == {degree}  # n * k odd: degree k + 1, as documented
    assert all(u in graph[v] and u not in graph[u] for u, vs in graph.items() for v in vs)
    assert graph == regular_graph(range(100, 100 + n), k, seed=11)
    if degree < n - 1:
        assert graph != regular_graph(range(100, 100 + n), k, seed=12)
