"""Checks a federated run passes before any process starts: settings that cannot give their
guarantee stop here, with the key to change, instead of failing (or silently weakening) mid-run."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from fedbrain.dataset import hospital_examples
from fedbrain.errors import InputError
from fedbrain.privacy.settings import PrivacySettings


def check(params: dict, settings, roles: list[str], partition: Path, hospitals: list[int],
          echo: Callable[[str], None]) -> None:
    """`settings`: the launcher's FederatedSettings."""
    examples = {k: hospital_examples(partition, k) for k in hospitals}
    check_privacy(params, settings, roles, examples, echo)
    check_encryption(params, settings, roles, examples)


def check_privacy(params: dict, settings, roles: list[str], examples: dict[int, int],
                  echo: Callable[[str], None]) -> None:
    """Refuse DP settings that cannot hold; print each hospital's plan (noise, epsilon, delta)."""
    privacy = PrivacySettings.from_params(params)
    if not privacy.enabled:
        return
    for role in roles:
        privacy.check_training(settings.hospital_training(params, role), role)
    if privacy.mode == "client":
        if settings.fraction_train < 1.0:
            raise InputError("params.yaml: privacy.mode client is accounted with every hospital in every round; "
                             "set federated.fraction_train: 1.0")
        echo(f"privacy: client level, noise multiplier {privacy.client_noise(settings.rounds):.3f}, "
             f"clip {privacy.l2_norm_clip} per hospital update (the unit protected is one hospital)")
        return
    for k, count in examples.items():
        for role in roles:
            batch = int(settings.hospital_training(params, role).get("batch_size", 32))
            plan = privacy.example_plan(count, batch, settings.local_epochs, settings.rounds)
            echo(f"privacy: hospital {k} {role}: {plan.describe()}")


ADAM_STEP_BOUND = (1 - 0.9) / math.sqrt(1 - 0.999)  # per unit of learning rate


def check_encryption(params: dict, settings, roles: list[str], examples: dict[int, int]) -> None:
    """Paillier's packed slots must hold every update and the count of hospitals adding into them.

    An update is a hospital's weights after its round minus the ones it received. Adam moves a
    weight by at most rate x (1 - beta1) / sqrt(1 - beta2) per step (Kingma & Ba 2015, section 2.1;
    3.16 x the rate with Keras' betas 0.9 and 0.999), so a round by at most that x its steps. A slot
    that cannot hold that range could refuse an update mid-run (the hospital raises EncodingError
    rather than send a wrong value): it is refused here, before training."""
    from fedbrain.federated.encrypted import EncryptionSettings

    encryption = EncryptionSettings.from_params(params["federated"])
    if not encryption.enabled:
        return
    privacy = PrivacySettings.from_params(params)
    limit = 2.0 ** encryption.integer_bits
    if privacy.mode == "client":
        # Each hospital sends (its clipped update + its share of the noise) / m: a coordinate is at
        # most C, its noise share has std z C / sqrt(m); 7 standard deviations (a chance of about
        # 1e-11 per value) must fit, or a hospital would refuse to encode mid-run.
        m = len(examples)
        z, clip = privacy.client_noise(settings.rounds), privacy.l2_norm_clip
        reach = (clip + 7 * z * clip / math.sqrt(m)) / m
        if reach >= limit:
            raise InputError(f"params.yaml: federated.paillier.integer_bits {encryption.integer_bits} holds values "
                             f"below {limit:g}, but a noised client-level update share may reach {reach:.2f} "
                             f"(clip {clip}, noise multiplier {z:.2f}, {m} hospitals): raise "
                             f"federated.paillier.integer_bits to {math.floor(math.log2(reach)) + 1}")
    if len(examples) > encryption.max_hospitals:
        raise InputError(f"params.yaml: {len(examples)} hospitals but federated.paillier.max_hospitals is "
                         f"{encryption.max_hospitals}: raise it (each slot needs room for every hospital's value)")
    for role in roles:
        training = settings.hospital_training(params, role)
        batch = int(training.get("batch_size", 32))
        steps = settings.local_epochs * max(math.ceil(n / batch) for n in examples.values())
        bound = float(training.get("learning_rate", 0.001)) * ADAM_STEP_BOUND * steps
        if bound >= limit:
            raise InputError(f"params.yaml: federated.paillier.integer_bits {encryption.integer_bits} holds updates "
                             f"below {limit:g}, but a {role} round of {steps} Adam steps at rate "
                             f"{training.get('learning_rate')} may move a weight by up to {bound:.2f}: raise "
                             f"federated.paillier.integer_bits to {math.floor(math.log2(bound)) + 1}")
