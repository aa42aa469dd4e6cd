"""An empirical epsilon from one training run, beside the accountant's (issue 18 part 2; not a test).

  .venv/bin/python bench/privacy_audit.py [fedavg dp8 dp2] [--full] [--rounds R] [--local-epochs E]
                                          [--canaries M] [--guesses K] [--seed S] [--reuse]

After Steinke, Nasr & Jagielski, "Privacy auditing with one (1) training run" (NeurIPS 2023;
fedbrain/privacy/one_run_audit.py): M canaries, each a training image of one hospital with a
deliberately wrong label, each independently "in" with probability 1/2; the "in" ones are extra
training rows of the hospital that holds the image, in a canaried copy of the partition (the
original is only read). The classifier is then trained through the real federation
(fedbrain.federated.launcher: SuperLink + 3 SuperNodes on loopback, TLS and SuperNode
authentication on), from the same split, canaries and seed, once per run named:
  fedavg  non-private FedAvg (params.yaml variant fedavg)
  dp8     DP-SGD at every hospital, privacy.target_epsilon 8 (variant dp)
  dp2     the same at privacy.target_epsilon 2
After each run every canary is scored by the trained model's log-probability of its wrong label;
"in" is guessed for the K highest scores and "out" for the K lowest, and the right guesses give the
largest epsilon the run refutes at 95% confidence, at the DP runs' delta. Printed per run: the
accountant's epsilon (its delta and accounting, from the model card), the empirical lower bound
with m, k+, k-, right guesses and the most a perfect guesser could show, test accuracy, and whether
lower bound <= accountant epsilon (the issue's target for every DP run; a violation is printed as a
WARNING: it means a bug). For fedavg the target is a bound clearly above 0: the audit sees leakage.
Then evaluate's membership audit of each run's model (issue 18 item 1: loss and calibrated attacks, every
test image a non-member) side by side: each DP run's AUC should be closer to 0.5 than fedavg's.
Each DP run's per-hospital accounting is checked to count the hospital's canaries as training images.

Data: the embedded sample data/sample/brain-tumor-mri (400 images, about 280 for training) by
default, or ../shared/data/brain-tumor-mri/Training with --full; 3 hospitals, Dirichlet alpha 0.5
(params.yaml's partition). Work files: build/bench/privacy-audit-sample/ or -full/ (data stages as
bench/centralized.py's `prepare`, the canaried partition, models, MLflow store, federation state).
--reuse keeps a run's model from an earlier call made with the same canaries, rounds, local epochs
and target epsilon.

Defaults: 100 canaries and K = 20 on the sample, 500 and K = 100 with --full. On the sample 100
canaries add about 50 mislabelled copies to about 280 images (a memorisation task a 2.8M-parameter
cnn is expected to take on in 10 rounds x 5 local epochs, while the rest of its data stays as it
was; 100-200 of the images themselves held out or relabelled would change the model audited); 2 x 20
guesses among the most and least confident leave room for a few "in" canaries the model did not
memorise, and cap the bound at 2.55 (every guess right, delta 1e-5): above what an epsilon-2 run
may show, far below 8. With --full 500 canaries are about 6% extra rows and 2 x 100 guesses cap
the bound at 4.18. K is fixed before training: choosing it after seeing the scores would be a
multiple test the bound does not cover.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "src"))

import centralized  # noqa: E402  (bench/centralized.py: params_for, prepare, WORK, SHARED)
import federated  # noqa: E402  (bench/federated.py: check_partition)
import pandas as pd  # noqa: E402

from fedbrain import train  # noqa: E402
from fedbrain.config import with_variant  # noqa: E402
from fedbrain.dataset import hospital_dir, load_classes  # noqa: E402
from fedbrain.federated import launcher  # noqa: E402
from fedbrain.federated.settings import FederatedSettings  # noqa: E402
from fedbrain.privacy import one_run_audit  # noqa: E402
from fedbrain.privacy.settings import PrivacySettings  # noqa: E402

PROJECT = BENCH.parent
DATASETS = {"sample": ("data/sample/brain-tumor-mri", PROJECT / "data" / "sample" / "brain-tumor-mri"),
            "full": ("../shared/data/brain-tumor-mri/Training", centralized.SHARED / "brain-tumor-mri" / "Training")}
PARTITION = {"scheme": "dirichlet", "hospitals": 3, "alpha": 0.5}
# run name -> (params.yaml variant, privacy.target_epsilon or None for the variant's own privacy)
RUNS = {"fedavg": ("fedavg", None), "dp8": ("dp", 8.0), "dp2": ("dp", 2.0)}
DEFAULTS = {"sample": (100, 20), "full": (500, 100)}  # (canaries, guesses of each kind)
CONFIDENCE = 0.95
ROLE = "classifier"


def audit_params(root: Path, work: Path, overrides: dict) -> dict:
    params = centralized.params_for(root)
    params["partition"].update(PARTITION)
    params["federated"] = {**params["federated"], "roles": ROLE, "state_dir": str(work / "federated-state"),
                           **overrides}
    params["mlflow"] = {**params["mlflow"], "tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
                        "artifact_location": str(work / "mlruns"), "log_models": False}
    return params


def run_params(params: dict, run: str) -> dict:
    """params for one run: the variant's own sections come from params.yaml `variants`; a DP run's
    target epsilon is set under `privacy` (the variant lays mode: example over it)."""
    _, target = RUNS[run]
    out = copy.deepcopy(params)
    if target is not None:
        out["privacy"] = {**out["privacy"], "target_epsilon": target, "noise_multiplier": None}
    return out


def train_counts(partition: Path) -> dict[int, int]:
    """Training rows per hospital, as the hospitals (and the launcher's preflight) count them."""
    return {k: int((pd.read_parquet(hospital_dir(partition, k) / "index.parquet", columns=["split"])["split"]
                    == "train").sum()) for k in launcher.hospitals_in(partition)}


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_run(run: str, params: dict, processed: Path, canaried: Path, models: Path, reuse: bool) -> tuple[dict, float]:
    variant, target = RUNS[run]
    out = models / "federated" / run
    fed = params["federated"]
    stamp = {"canaries": file_digest(canaried / one_run_audit.CANARIES_FILE), "rounds": fed["rounds"],
             "local_epochs": fed["local_epochs"], "variant": variant, "target_epsilon": target}
    stamp_path = out / "privacy-audit.json"
    minutes = 0.0
    if not (reuse and (out / f"{ROLE}.keras").is_file() and stamp_path.is_file()
            and json.loads(stamp_path.read_text()) == stamp):
        start = time.perf_counter()
        launcher.run(run_params(params, run), processed, canaried, out, variant=variant,
                     echo=lambda line: print(f"  [{run}] {line}", flush=True))
        minutes = (time.perf_counter() - start) / 60
        print(f"  [{run}] {minutes:.1f} min", flush=True)
        stamp_path.write_text(json.dumps(stamp, indent=2) + "\n")
    return train.load_card(out / f"{ROLE}.keras"), minutes


def accounting_check(run: str, params: dict, card: dict, counts: dict[int, int],
                     original: dict[int, int]) -> tuple[list[str], bool]:
    """Each hospital's reported DP-SGD figures against the plan for its image count with its canaries:
    the images it trained on, its noise multiplier (what a target epsilon makes depend on the count)
    and its epsilon. Lines to print, and whether every hospital agrees."""
    from fedbrain.privacy.budget import NOISE

    variant, _ = RUNS[run]
    p = with_variant(run_params(params, run), variant)
    privacy, settings = PrivacySettings.from_params(p), FederatedSettings.from_params(p)
    batch = int(settings.hospital_training(p, ROLE).get("batch_size", 32))
    last = (card.get("round_records") or [{}])[-1].get("hospitals", {})

    def close(a, b) -> bool:
        return a is not None and abs(a - b) <= 1e-6 * max(1.0, abs(b))

    lines, ok = [], True
    for k, count in counts.items():
        plan = privacy.example_plan(count, batch, settings.local_epochs, settings.rounds)
        without = privacy.example_plan(original[k], batch, settings.local_epochs, settings.rounds)
        expected = plan.epsilon_after(card["rounds"])
        reported = (card.get("epsilon_by_hospital") or {}).get(str(k))
        hospital = last.get(str(k), {})
        trained_on, noise = hospital.get("examples"), hospital.get(NOISE)
        agrees = trained_on == count and close(noise, plan.noise_multiplier) and close(reported, expected)
        ok &= agrees
        shown = {name: "none" if v is None else f"{v:.4f}" for name, v in (("eps", reported), ("noise", noise))}
        lines.append(f"    hospital {k}: {count} training images = {original[k]} + {count - original[k]} canaries, "
                     f"trained on {trained_on}; noise multiplier {shown['noise']} (planned for {count} images "
                     f"{plan.noise_multiplier:.4f}, for {original[k]} without canaries "
                     f"{without.noise_multiplier:.4f}); epsilon {shown['eps']} (planned {expected:.4f})"
                     + ("" if agrees else "  <-- MISMATCH"))
    return lines, ok


def membership_audit(path: Path, models: Path, processed: Path, parts: Path, params: dict,
                     plots: Path) -> tuple[dict, dict]:
    """The model's test metrics and evaluate's membership audit (issue 18 item 1: loss and calibrated
    attacks) with every test image a non-member and as many of the partition's training images as
    members (class by class): the audit of the same model the canaries scored, so the AUCs of the
    private and non-private runs are printed side by side. Members come from the original partition
    (images trained on with their true label; the canaries are extra rows of some of them)."""
    from fedbrain import evaluate
    from fedbrain.dataset import load_split
    from fedbrain.privacy import audit

    test = load_split(processed, parts, "test")
    sample = audit.membership_sample(processed, parts, len(test), params["evaluate"]["audit"]["seed"], test)
    settings = {"threshold": params["evaluate"]["threshold"], "overlays": params["evaluate"]["overlays"],
                "batch_size": params["evaluate"]["batch_size"], "audit": params["evaluate"]["audit"]}
    result = evaluate.evaluate_model(path, models, test, list(load_classes(processed)["classes"]), settings, plots,
                                     membership=sample)
    return result["metrics"], result["audit"]


def auc_error(members: int, nonmembers: int) -> float:
    """Standard error of a ROC AUC of 0.5 (scores that do not separate; Hanley & McNeil 1982)."""
    return ((members + nonmembers + 1) / (12 * members * nonmembers)) ** 0.5


def membership_lines(results: dict) -> list[str]:
    """The runs' membership-inference AUCs side by side, and whether each DP run's is closer to 0.5
    than the non-private run's (issue 18's target), with the AUC's sampling error to read it by."""
    lines = ["\nmembership inference (evaluate's audit: every test image a non-member, as many training images "
             "members, class by class; AUC 0.5 = no measurable leak):",
             "| run | epsilon | members + non-members | AUC loss attack | AUC calibrated attack | |AUC - 0.5| of the "
             "stronger | member - non-member accuracy |", "|---|---|---|---|---|---|---|"]
    distance = {}
    for run, r in results.items():
        m = r["membership"]
        if m.get("status") != "audited":
            lines.append(f"| {run} | | {m.get('status')} | | | | |")
            continue
        distance[run] = abs(m["auc"] - 0.5)
        epsilon = r["card"].get("epsilon")
        lines.append(f"| {run} | {'none' if epsilon is None else f'{epsilon:.2f}'} | {m['members']} + {m['nonmembers']} "
                     f"| {m['attacks']['loss']['auc']:.3f} | {m['attacks']['calibrated']['auc']:.3f} | "
                     f"{distance[run]:.3f} | {m['accuracy_gap']:+.3f} |")
    if "fedavg" in distance:
        error = auc_error(results["fedavg"]["membership"]["members"], results["fedavg"]["membership"]["nonmembers"])
        # The canaries' "in" / "out" scores are a membership attack too, on worst-case examples (wrong labels).
        canary = {run: abs(r["audit"]["score_auc"] - 0.5) for run, r in results.items()}
        for run in distance:
            if results[run]["card"].get("epsilon") is not None:
                closer = distance[run] < distance["fedavg"]
                lines.append(f"  {run}: AUC closer to 0.5 than fedavg's (target): {'yes' if closer else 'NO'} "
                             f"({distance[run]:.3f} vs {distance['fedavg']:.3f}; an AUC's sampling error at 0.5 "
                             f"is {error:.3f} here); on the canaries (in vs out): "
                             f"{'yes' if canary[run] < canary['fedavg'] else 'NO'} ({canary[run]:.3f} vs "
                             f"{canary['fedavg']:.3f} from 0.5)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", default=list(RUNS), help=f"any of {', '.join(RUNS)} (default: all)")
    parser.add_argument("--full", action="store_true", help="../shared/data/brain-tumor-mri/Training, not the sample")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--local-epochs", type=int)
    parser.add_argument("--canaries", type=int, help="m (default: 100 on the sample, 500 with --full)")
    parser.add_argument("--guesses", type=int, help="k: 'in' guesses for the k highest scores and 'out' for the "
                        "k lowest (default: 20 on the sample, 100 with --full, m // 5 with --canaries)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the canaries and their in/out draw")
    parser.add_argument("--reuse", action="store_true", help="keep models an earlier call trained on the same canaries")
    args = parser.parse_args()
    if unknown := [r for r in args.runs if r not in RUNS]:
        parser.error(f"unknown run(s) {unknown}; use any of {', '.join(RUNS)}")
    dataset = "full" if args.full else "sample"
    m = args.canaries or DEFAULTS[dataset][0]
    k = args.guesses or (DEFAULTS[dataset][1] if args.canaries is None else max(1, m // 5))
    if 2 * k > m:
        parser.error(f"--guesses {k}: 2 x {k} guesses about {m} canaries; use at most {m // 2}")

    label, root = DATASETS[dataset]
    name = f"privacy-audit-{dataset}"
    work = centralized.WORK / name
    overrides = {key: v for key, v in (("rounds", args.rounds), ("local_epochs", args.local_epochs)) if v}
    params = audit_params(root, work, overrides)
    processed, parts = centralized.prepare(name, root, params)
    federated.check_partition(parts, PARTITION)
    classes = load_classes(processed)["classes"]
    canaries = one_run_audit.choose_canaries(parts, m, args.seed, len(classes))
    canaried = one_run_audit.write_canaried_partition(parts, canaries,
                                                      work / f"partition-canaries-m{m}-seed{args.seed}")
    original, counts = train_counts(parts), train_counts(canaried)
    print(f"privacy audit: {m} canaries from {sum(original.values())} training images (seed {args.seed}), "
          f"{int(canaries['included'].sum())} in: hospitals' training images "
          f"{', '.join(f'{h}: {original[h]} + {counts[h] - original[h]}' for h in counts)} -> {canaried}", flush=True)

    # The delta the bound is stated at: the DP runs' (the largest hospital delta, as the card reports it).
    dp = with_variant(run_params(params, "dp8"), "dp")
    planned_delta = max(PrivacySettings.from_params(dp).delta_for(n) for n in counts.values())
    models = work / f"models-canaries-m{m}-seed{args.seed}"
    results = {}
    for run in args.runs:
        card, minutes = train_run(run, params, processed, canaried, models, args.reuse)
        path = models / "federated" / run / f"{ROLE}.keras"
        scores = one_run_audit.score_canaries(path, processed, canaries, params["evaluate"]["batch_size"])
        dp_run = card.get("epsilon") is not None
        delta = card["delta"] if dp_run else planned_delta
        audit = one_run_audit.audit_canaries(scores, canaries["included"].to_numpy(), k, k, delta, CONFIDENCE)
        metrics, membership = membership_audit(path, models, processed, parts, params, work / "reports" / run)
        check = accounting_check(run, params, card, counts, original) if dp_run else ([], True)
        results[run] = {"card": card, "audit": audit, "metrics": metrics, "check": check, "minutes": minutes,
                        "membership": membership}

    fed = params["federated"]
    print(f"\nBENCH privacy audit, one run each (Steinke, Nasr & Jagielski 2023), {ROLE} on {label} "
          f"({PARTITION['hospitals']} hospitals, {PARTITION['scheme']} {PARTITION['alpha']}): {fed['rounds']} rounds x "
          f"{fed['local_epochs']} local epochs, same split, canaries and seed; m = {m} canaries "
          f"({int(canaries['included'].sum())} in), k+ = k- = {k}, {CONFIDENCE:.0%} confidence")
    warnings = []
    for run, r in results.items():
        card, a, metrics = r["card"], r["audit"], r["metrics"]
        epsilon = card.get("epsilon")
        accountant = (f"epsilon {epsilon:.2f} at delta {card['delta']:.0e} ({card.get('epsilon_accounting')})"
                      if epsilon is not None else "no DP (epsilon unbounded)")
        empirical = (f"lower bound {a['epsilon_lower_bound']:.3f} at delta {a['delta']:.0e} (m {a['m']}, "
                     f"k+ {a['k_plus']}, k- {a['k_minus']}, correct {a['correct']}/{a['k_plus'] + a['k_minus']}: "
                     f"{a['correct_in']} in, {a['correct_out']} out; {a['perfect_guessing_bound']:.2f} if every "
                     f"guess were right)")
        if epsilon is not None:
            holds = a["epsilon_lower_bound"] <= epsilon
            verdict = f"lower bound <= accountant epsilon: {'yes' if holds else 'NO'}"
            if not holds:
                warnings.append(f"{run}: the empirical epsilon lower bound {a['epsilon_lower_bound']:.3f} EXCEEDS the "
                                f"accountant's epsilon {epsilon:.3f} at delta {card['delta']:.0e}: the run leaked more "
                                f"than its DP guarantee allows. This is a bug (clipping, noise, sampling or "
                                f"accounting): find it, do not tune it away")
            if not r["check"][1]:
                warnings.append(f"{run}: a hospital's epsilon does not match the plan for its image count with its "
                                f"canaries (lines marked MISMATCH): the accounting did not count what it trained on")
        else:
            detected = "yes" if a["epsilon_lower_bound"] > 0 else "NO"
            verdict = f"lower bound above 0, the audit detects leakage (target: clearly above 0): {detected}"
            if a["epsilon_lower_bound"] <= 0:
                warnings.append(f"{run}: the non-private model's lower bound is 0: the audit detected no leakage, so "
                                f"the DP runs' bounds say nothing either: use more canaries, rounds or local epochs")
        print(f"  {run:7s} accountant: {accountant}\n          empirical: {empirical}\n          {verdict}; "
              f"canary score AUC {a['score_auc']:.3f} (median log p(wrong label) in {a['median_score_in']:.2f}, "
              f"out {a['median_score_out']:.2f}); test accuracy {metrics['accuracy']:.4f}; {card['rounds']} rounds run"
              + (f", trained in {r['minutes']:.1f} min" if r["minutes"] else " (reused)"))
        for line in r["check"][0]:
            print(line)
    print("\n".join(membership_lines(results)))
    for text in warnings:
        print(f"\n{'!' * 100}\nWARNING {text}\n{'!' * 100}", flush=True)


if __name__ == "__main__":
    main()
