#!/usr/bin/env python3
"""Independent numpy reference for the learner's GRPO numerics.

Computes every quantity from the published formulas (TRL GRPOTrainer
`_generate_and_score_completions` / `_compute_loss`, verl `core_algos`
`kl_penalty` / `AdaptiveKLController` / RLOO, Schulman's KL estimators), NOT from
the Rust code, and writes `grpo_fixture.json` next to this file. The Rust tests
(`learner/tests/grpo_*.rs`) read the fixture and compare.

Deterministic (fixed seed). Regenerate with:

    python3 -m venv /tmp/npvenv && /tmp/npvenv/bin/pip install numpy
    /tmp/npvenv/bin/python learner/tests/reference/grpo_reference.py

Gradients are central finite differences in float64 (h = 1e-6) of the loss
written here, so they do not depend on any autodiff.
"""

import json
import os

import numpy as np

RNG = np.random.default_rng(20250917)
MAX_LOG_RATIO = 20.0  # verl clamps the log-ratio to [-20, 20] before exp
K3_CLAMP = 10.0  # verl clamps the k3 estimate to [-10, 10]
IGNORE_INDEX = -100


def r(x):
    """numpy -> plain JSON lists of float."""
    return np.asarray(x, dtype=np.float64).tolist()


# --------------------------------------------------------------------------
# 1. Advantages (TRL: A = (r - mean_group) / (std + 1e-4), std unbiased)
# --------------------------------------------------------------------------
def advantages_ref(rewards, g, scale_rewards, estimator, eps=1e-4):
    rewards = np.asarray(rewards, dtype=np.float64)
    groups = rewards.reshape(-1, g)
    n_groups = groups.shape[0]
    batch_std = rewards.std(ddof=1) if rewards.size > 1 else 0.0
    adv = np.zeros_like(groups)
    std_used = np.zeros_like(groups)
    tied = np.zeros(n_groups, dtype=bool)
    for i, grp in enumerate(groups):
        group_std = grp.std(ddof=1) if g > 1 else 0.0
        std = batch_std if scale_rewards == "batch" else group_std
        std_used[i, :] = std
        tied[i] = np.all(grp == grp[0])
        if tied[i]:
            adv[i, :] = 0.0  # all rewards tie: no signal, exactly 0
            continue
        if estimator == "grpo":
            centred = grp - grp.mean()
        else:  # rloo: baseline = mean of the other G-1 rewards
            centred = np.array([grp[j] - (grp.sum() - grp[j]) / (g - 1) for j in range(g)])
        if scale_rewards == "none":
            adv[i, :] = centred
        elif scale_rewards == "mean":  # MaxRL: the group mean, not the std
            adv[i, :] = centred / (grp.mean() + eps)
        else:
            adv[i, :] = centred / (std + eps)
    a = adv.reshape(-1)
    stats = {
        "reward_mean": float(rewards.mean()),
        "reward_std": float(std_used.mean()),
        "reward_min": float(rewards.min()),
        "reward_max": float(rewards.max()),
        "frac_reward_zero_std": float(tied.mean()),
        "advantage_mean": float(a.mean()),
        "advantage_std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
        "advantage_min": float(a.min()),
        "advantage_max": float(a.max()),
        "num_groups": int(n_groups),
        "group_size": int(g),
    }
    return a, stats


def advantage_cases():
    cases = []
    rewards = np.concatenate(
        [
            RNG.normal(size=4),
            [1.0, 1.0, 1.0, 1.0],  # tied group -> zero std, zero advantage
            RNG.integers(0, 2, size=4).astype(float) + [0.0, 0.0, 0.0, 0.5],
        ]
    )
    for scale in ["group", "batch", "none", "mean"]:
        for est in ["grpo", "rloo"]:
            a, stats = advantages_ref(rewards, 4, scale, est)
            cases.append(
                {
                    "name": f"{est}_{scale}",
                    "rewards": r(rewards),
                    "group_size": 4,
                    "scale_rewards": scale,
                    "adv_estimator": est,
                    "advantages": r(a),
                    "stats": stats,
                }
            )
    # Every group tied (0.1 has no exact binary form; the mean must not leak).
    tied = [0.1] * 3 + [0.7] * 3
    for scale in ["group", "batch"]:
        a, stats = advantages_ref(tied, 3, scale, "grpo")
        cases.append(
            {
                "name": f"all_tied_{scale}",
                "rewards": tied,
                "group_size": 3,
                "scale_rewards": scale,
                "adv_estimator": "grpo",
                "advantages": r(a),
                "stats": stats,
            }
        )
    return cases


# --------------------------------------------------------------------------
# 2. KL estimators (Schulman 2020; verl kl_penalty)
# --------------------------------------------------------------------------
def kl_ref(logp, ref, est):
    d = ref - logp
    if est == "k1":
        return logp - ref
    if est == "k2":
        return 0.5 * (logp - ref) ** 2
    dc = np.clip(d, -MAX_LOG_RATIO, MAX_LOG_RATIO)
    return np.clip(np.exp(dc) - dc - 1.0, -K3_CLAMP, K3_CLAMP)


def kl_cases():
    logp = -RNG.uniform(0.05, 4.0, size=12)
    ref = logp + RNG.normal(scale=0.7, size=12)
    # An extreme pair: the reference is 40 nats more likely -> clamped, finite.
    logp = np.append(logp, -45.0)
    ref = np.append(ref, -5.0)
    return {
        "logprobs": r(logp),
        "ref_logprobs": r(ref),
        "k1": r(kl_ref(logp, ref, "k1")),
        "k2": r(kl_ref(logp, ref, "k2")),
        "k3": r(kl_ref(logp, ref, "k3")),
    }


# --------------------------------------------------------------------------
# 3. Adaptive KL controller (Ziegler et al. 2019; verl AdaptiveKLController)
# --------------------------------------------------------------------------
def kl_controller_case():
    init, target, horizon = 0.05, 0.02, 1000.0
    kls = [0.0, 0.01, 0.02, 0.03, 0.5, 0.021, 1e-4]
    ns = [64, 64, 32, 128, 64, 64, 256]
    value, values = init, []
    for kl, n in zip(kls, ns):
        err = np.clip(kl / target - 1.0, -0.2, 0.2)
        value = value * (1.0 + err * n / horizon)
        values.append(value)
    return {
        "beta": init,
        "target_kl": target,
        "kl_horizon": horizon,
        "kls": kls,
        "n_steps": ns,
        "values": values,
    }


# --------------------------------------------------------------------------
# 4. masked_mean / masked_normalize (CS336)
# --------------------------------------------------------------------------
def masked_cases():
    x = RNG.normal(size=(3, 4))
    mask = np.array([[1, 1, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=np.float64)
    tot = mask.sum()
    row = mask.sum(1)
    return {
        "x": r(x),
        "mask": r(mask),
        "mean_all": float((x * mask).sum() / max(tot, 1.0)),
        "mean_dim1": r((x * mask).sum(1) / np.maximum(row, 1.0)),
        "mean_dim0": r((x * mask).sum(0) / np.maximum(mask.sum(0), 1.0)),
        "normalize_constant": 7.0,
        "normalize_all": float((x * mask).sum() / 7.0),
        "normalize_dim1": r((x * mask).sum(1) / 7.0),
    }


# --------------------------------------------------------------------------
# 5. GRPO loss (TRL _compute_loss) + aggregation + metrics
# --------------------------------------------------------------------------
def eps_high(cfg):
    return cfg["epsilon_high"] if cfg.get("epsilon_high") is not None else cfg["epsilon"]


def importance_weights_np(logp, old, mask, level):
    lr = logp - old
    if level == "token":
        w = lr
    else:  # GSPO: length-normalised sequence log-ratio
        w = (lr * mask).sum(1, keepdims=True) / np.maximum(mask.sum(1, keepdims=True), 1.0)
    return np.exp(np.clip(w, -MAX_LOG_RATIO, MAX_LOG_RATIO))


def is_ratio_np(old, rollout, mask, mode, cap):
    diff = (old - rollout) * mask
    if mode.startswith("sequence"):
        diff = diff.sum(1, keepdims=True)
    ratio = np.exp(diff)
    if mode.endswith("truncate"):
        return np.minimum(ratio, cap)
    return np.where(ratio > cap, 0.0, ratio)


def aggregate_np(x, mask, loss_type, n_seq, n_tok, max_len):
    if loss_type == "grpo":
        return ((x * mask).sum(1) / np.maximum(mask.sum(1), 1.0)).sum() / max(n_seq, 1)
    if loss_type in ("bnpo", "dapo", "vespo"):  # one rank: rank tokens == global tokens
        return (x * mask).sum() / max(n_tok, 1.0)
    if loss_type == "dr_grpo":
        return (x * mask).sum() / (max(n_seq, 1) * max_len)
    if loss_type == "luspo":  # TRL: (per_token_loss * mask).sum(-1).mean()
        return (x * mask).sum() / max(n_seq, 1)
    raise ValueError(loss_type)


VESPO_LOWER = np.log(1e-8)


def off_policy_mask_np(sampling, logp, mask, adv, threshold):
    """TRL GRPOTrainer.get_off_policy_mask (DeepSeek-V3.2 OPSM): keep a
    sequence when its advantage is >= 0 or its mean per-token
    (sampling - current) log-prob gap is at most the threshold."""
    kl = ((sampling - logp) * mask).sum(1) / np.maximum(mask.sum(1), 1.0)
    return ((adv >= 0) | (kl <= threshold)).astype(np.float64)


def vespo_phi_np(cfg, logp, old, mask, adv, is_ratio):
    """TRL GRPOTrainer.get_gamma_weights: phi(w) = e^lam w^k e^(-lam w), w the
    sequence's importance weight (product of token ratios, times the rollout
    correction's token ratios when it is on), computed in log space."""
    lr = np.clip(logp - old, -MAX_LOG_RATIO, MAX_LOG_RATIO)
    seq = (lr * mask).sum(1)
    if is_ratio is not None:
        seq = seq + (np.clip(np.log(np.maximum(is_ratio, 1e-300)), VESPO_LOWER, 20.0) * mask).sum(1)
    log_w = np.clip(seq, VESPO_LOWER, 20.0)
    w = np.exp(log_w)
    pos = adv >= 0
    k = np.where(pos, cfg["vespo_k_pos"], cfg["vespo_k_neg"])
    lam = np.maximum(np.where(pos, cfg["vespo_lambda_pos"], cfg["vespo_lambda_neg"]), 1e-4)
    phi = np.exp(lam + k * log_w - lam * w)
    return np.where(np.isfinite(phi), phi, 0.0)


def loss_parts_np(cfg, beta, logp, d, max_len):
    """Returns (loss, pg, kl_part, ent_part). `d` holds the constant tensors."""
    mask, adv = d["mask"], d["advantages"][:, None]
    old = d["old"]
    n_seq, n_tok = mask.shape[0], mask.sum()
    c1 = importance_weights_np(logp, old, mask, cfg["importance_sampling_level"])
    pl = cfg["policy_loss"]
    isr = None
    if cfg["vllm_importance_sampling_correction"]:
        isr = is_ratio_np(
            old, d["rollout"], mask, cfg["vllm_importance_sampling_mode"], cfg["vllm_importance_sampling_cap"]
        )
    if cfg["loss_type"] == "vespo":
        # phi is detached in TRL: computed at the base point d["logprobs"],
        # a constant here, so the finite differences see none of its slope.
        phi = vespo_phi_np(cfg, d["logprobs"], old, mask, d["advantages"], isr)
        pt = -phi[:, None] * adv * logp
        isr = None  # folded into phi, not multiplied into the loss
    elif pl == "grpo_clip":
        c2 = np.clip(c1, 1 - cfg["epsilon"], 1 + eps_high(cfg))
        c1d = np.minimum(c1, cfg["delta"]) if cfg.get("delta") is not None else c1
        pt = -np.minimum(c1d * adv, c2 * adv)
        pt = np.broadcast_to(pt, mask.shape)
    elif pl == "reinforce_with_baseline":
        pt = -adv * logp
    else:  # no_baseline: raw reward
        pt = -d["rewards"][:, None] * logp
    if cfg.get("off_policy_mask_threshold") is not None:
        # TRL get_off_policy_mask, held constant: at the base point.
        opm = off_policy_mask_np(d["rollout"], d["logprobs"], mask, d["advantages"], cfg["off_policy_mask_threshold"])
        pt = pt * opm[:, None]
    if isr is not None:
        pt = pt * isr
    agg = lambda x: aggregate_np(x, mask, cfg["loss_type"], n_seq, n_tok, max_len)  # noqa: E731
    pg = agg(pt)
    kl_part = beta * agg(kl_ref(logp, d["ref"], cfg["kl_estimator"])) if beta != 0 else 0.0
    ent_part = -cfg["entropy_coef"] * agg(d["entropy"]) if cfg["entropy_coef"] != 0 else 0.0
    return pg + kl_part + ent_part, pg, kl_part, ent_part


def metrics_np(cfg, logp, d):
    mask, adv = d["mask"], d["advantages"]
    old = d["old"]
    ntok = max(mask.sum(), 1.0)
    out = {}
    c1 = importance_weights_np(logp, old, mask, cfg["importance_sampling_level"])
    el, eh = cfg["epsilon"], eps_high(cfg)
    low = (c1 < 1 - el) & (adv[:, None] < 0)
    high = (c1 > 1 + eh) & (adv[:, None] > 0)
    if cfg["loss_type"] == "vespo":  # no clip: TRL logs vespo/phi_seq_mean instead
        low, high = low & False, high & False
    if cfg["importance_sampling_level"] == "token":
        sel = mask > 0
        vals = c1[sel]
        out["clip_ratio_low"] = float(low[sel].mean())
        out["clip_ratio_high"] = float(high[sel].mean())
    else:  # one ratio per sequence; TRL averages over all sequences
        vals = c1[:, 0]
        out["clip_ratio_low"] = float(low.mean())
        out["clip_ratio_high"] = float(high.mean())
    out["clip_ratio_region"] = out["clip_ratio_low"] + out["clip_ratio_high"]
    out["ratio_mean"] = float(vals.mean())
    out["ratio_min"] = float(vals.min())
    out["ratio_max"] = float(vals.max())
    out["kl"] = float((kl_ref(logp, d["ref"], cfg["kl_estimator"]) * mask).sum() / ntok)
    out["entropy"] = float((d["entropy"] * mask).sum() / ntok)
    out["approx_kl"] = float(((old - logp) * mask).sum() / ntok)
    if cfg["vllm_importance_sampling_correction"]:
        isr = is_ratio_np(
            old, d["rollout"], mask, cfg["vllm_importance_sampling_mode"], cfg["vllm_importance_sampling_cap"]
        )
        flat = isr[:, 0] if cfg["vllm_importance_sampling_mode"].startswith("sequence") else isr[mask > 0]
        out["importance_sampling_ratio_mean"] = float(flat.mean())
        out["importance_sampling_ratio_min"] = float(flat.min())
        out["importance_sampling_ratio_max"] = float(flat.max())
        diff = np.abs(old - d["rollout"])[mask > 0]
        out["sampling_logp_difference_mean"] = float(diff.mean())
        out["sampling_logp_difference_max"] = float(diff.max())
    if cfg["loss_type"] == "vespo":
        isr = None
        if cfg["vllm_importance_sampling_correction"]:
            isr = is_ratio_np(
                old, d["rollout"], mask, cfg["vllm_importance_sampling_mode"], cfg["vllm_importance_sampling_cap"]
            )
        out["vespo_phi_seq_mean"] = float(vespo_phi_np(cfg, logp, old, mask, adv, isr).mean())
    out["num_tokens"] = float(mask.sum())
    return out


def fd_grad(f, x, h=1e-6):
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        g[idx] = (f(xp) - f(xm)) / (2 * h)
    return g


BASE_CFG = {
    "loss_type": "dapo",
    "policy_loss": "grpo_clip",
    "importance_sampling_level": "token",
    "epsilon": 0.2,
    "epsilon_high": 0.28,
    "delta": None,
    "beta": 0.04,
    "kl_estimator": "k3",
    "entropy_coef": 0.01,
    "vllm_importance_sampling_correction": True,
    "vllm_importance_sampling_mode": "token_truncate",
    "vllm_importance_sampling_cap": 1.6,
    "vespo_k_pos": 2.0,
    "vespo_lambda_pos": 3.0,
    "vespo_k_neg": 3.0,
    "vespo_lambda_neg": 2.0,
    "off_policy_mask_threshold": None,
}


def loss_data():
    b, k = 6, 5
    lengths = [5, 3, 0, 4, 1, 5]  # row 2: empty response
    mask = np.array([[1.0 if j < n else 0.0 for j in range(k)] for n in lengths])
    logp = -RNG.uniform(0.05, 3.0, size=(b, k))
    old = logp + RNG.normal(scale=0.35, size=(b, k))
    ref = logp + RNG.normal(scale=0.3, size=(b, k))
    rollout = old + RNG.normal(scale=0.4, size=(b, k))
    entropy = RNG.uniform(0.1, 2.5, size=(b, k))
    pad = mask == 0
    # Padding holds garbage (finite here so the numpy formulas stay finite);
    # it must not reach the loss.
    for t in (logp, old, ref, rollout, entropy):
        t[pad] = 30.0
    adv = RNG.normal(size=b)
    adv[4] = 0.0
    rewards = RNG.uniform(-1, 1, size=b)
    return {
        "mask": mask,
        "logprobs": logp,
        "old": old,
        "ref": ref,
        "rollout": rollout,
        "entropy": entropy,
        "advantages": adv,
        "rewards": rewards,
    }


def loss_cases():
    d = loss_data()
    max_len = 8
    specs = []
    for lt in ["grpo", "bnpo", "dr_grpo", "dapo"]:
        for lvl in ["token", "sequence"]:
            specs.append((f"{lt}_{lvl}", {"loss_type": lt, "importance_sampling_level": lvl}, True))
    specs += [
        ("reinforce_with_baseline", {"policy_loss": "reinforce_with_baseline", "loss_type": "grpo"}, True),
        ("no_baseline", {"policy_loss": "no_baseline", "vllm_importance_sampling_correction": False}, True),
        ("kl_k1", {"kl_estimator": "k1", "loss_type": "grpo", "beta": 0.1}, True),
        ("kl_k2", {"kl_estimator": "k2", "loss_type": "bnpo", "beta": 0.1}, True),
        ("is_token_mask", {"vllm_importance_sampling_mode": "token_mask", "vllm_importance_sampling_cap": 1.3, "loss_type": "bnpo"}, True),
        ("is_sequence_truncate", {"vllm_importance_sampling_mode": "sequence_truncate", "vllm_importance_sampling_cap": 1.5}, True),
        ("is_sequence_mask", {"vllm_importance_sampling_mode": "sequence_mask", "vllm_importance_sampling_cap": 1.5, "loss_type": "dr_grpo"}, True),
        ("two_sided_delta", {"delta": 1.4, "loss_type": "grpo"}, True),
        ("clip_symmetric_no_extras", {"epsilon_high": None, "beta": 0.0, "entropy_coef": 0.0, "vllm_importance_sampling_correction": False}, True),
        ("on_policy", {"beta": 0.0, "entropy_coef": 0.0, "vllm_importance_sampling_correction": False, "loss_type": "grpo"}, False),
        ("on_policy_with_correction", {"vllm_importance_sampling_mode": "sequence_truncate", "loss_type": "dr_grpo"}, False),
        ("luspo_sequence", {"loss_type": "luspo", "importance_sampling_level": "sequence"}, True),
        ("luspo_token", {"loss_type": "luspo"}, True),
        ("vespo", {"loss_type": "vespo"}, True),
        ("vespo_token_mask", {"loss_type": "vespo", "vllm_importance_sampling_mode": "token_mask", "vllm_importance_sampling_cap": 1.3}, True),
        ("vespo_no_correction_other_gamma", {"loss_type": "vespo", "vllm_importance_sampling_correction": False, "vespo_k_pos": 1.0, "vespo_lambda_pos": 0.5, "vespo_k_neg": 4.0, "vespo_lambda_neg": 5.0}, True),
        ("vespo_on_policy", {"loss_type": "vespo", "vllm_importance_sampling_correction": False}, False),
        ("off_policy_mask", {"off_policy_mask_threshold": 0.0}, True),
        ("off_policy_mask_grpo_sequence", {"off_policy_mask_threshold": -0.3, "loss_type": "grpo", "importance_sampling_level": "sequence", "vllm_importance_sampling_correction": False}, True),
    ]
    cases = []
    for name, over, off_policy in specs:
        cfg = dict(BASE_CFG)
        cfg.update(over)
        beta = cfg["beta"]
        dd = dict(d)
        if not off_policy:
            # old = logp.detach(): a constant equal to logp at the base point.
            dd["old"] = d["logprobs"].copy()
        loss, pg, klp, entp = loss_parts_np(cfg, beta, d["logprobs"], dd, max_len)
        grad = fd_grad(lambda lp: loss_parts_np(cfg, beta, lp, dd, max_len)[0], d["logprobs"])
        cases.append(
            {
                "name": name,
                "config": {k: v for k, v in cfg.items()},
                "off_policy": off_policy,
                "loss": float(loss),
                "pg_loss": float(pg),
                "kl_loss": float(klp),
                "entropy_loss": float(entp),
                "grad_logprobs": r(grad),
                "metrics": metrics_np(cfg, d["logprobs"], dd),
            }
        )
    data = {k: r(v) for k, v in d.items()}
    data["max_completion_length"] = max_len
    return {"data": data, "cases": cases}


# --------------------------------------------------------------------------
# 6. Log-probs and entropy of given tokens with temperature (TRL
#    selective_log_softmax(logits / temperature, ids); entropy of the same)
# --------------------------------------------------------------------------
def logprob_cases():
    out = []
    for temp in [1.0, 0.7]:
        logits = RNG.normal(scale=3.0, size=(2, 3, 11))
        logits[0, 0, 4] = 80.0  # a dominant logit: must stay stable
        targets = RNG.integers(0, 11, size=(2, 3))
        z = logits / temp
        z = z - z.max(-1, keepdims=True)
        logsm = z - np.log(np.exp(z).sum(-1, keepdims=True))
        lp = np.take_along_axis(logsm, targets[..., None], axis=-1)[..., 0]
        ent = -(np.exp(logsm) * logsm).sum(-1)
        out.append(
            {
                "temperature": temp,
                "logits": r(logits),
                "targets": targets.tolist(),
                "logprobs": r(lp),
                "entropy": r(ent),
            }
        )
    return out


# --------------------------------------------------------------------------
# 7. Batch padding (TRL layout: prompts left-padded, completions right-padded)
# --------------------------------------------------------------------------
def batch_case():
    pad = 0
    seqs = [([5, 6, 7], [8, 9]), ([11], [12, 13, 14]), ([21, 22], [])]
    width = 4
    p = max(len(a) for a, _ in seqs)
    t = p + width
    ids, att, pos, lab, comp, rm = [], [], [], [], [], []
    for prompt, completion in seqs:
        row = [pad] * (p - len(prompt)) + prompt + completion + [pad] * (width - len(completion))
        a = [0] * (p - len(prompt)) + [1] * (len(prompt) + len(completion)) + [0] * (width - len(completion))
        ps = [0] * (p - len(prompt)) + list(range(len(prompt) + len(completion))) + [0] * (width - len(completion))
        # labels[t] = ids[t+1] when t+1 is a completion position
        lb = [IGNORE_INDEX] * t
        for j in range(len(completion)):
            lb[p + j - 1] = completion[j]
        ids.append(row)
        att.append(a)
        pos.append(ps)
        lab.append(lb)
        comp.append(completion + [pad] * (width - len(completion)))
        rm.append([1.0] * len(completion) + [0.0] * (width - len(completion)))
    return {
        "pad_token_id": pad,
        "completion_width": width,
        "prompts": [s[0] for s in seqs],
        "completions": [s[1] for s in seqs],
        "input_ids": ids,
        "attention_mask": att,
        "position_ids": pos,
        "labels": lab,
        "completion_ids": comp,
        "response_mask": rm,
        "logits_to_keep": width,
    }


def gdpo_cases():
    """TRL's multi_objective_aggregation="normalize_then_sum" (GDPO): each
    function normalized within its group (unbiased std + 1e-4), the weighted
    sum, then normalized over the batch. A function tied within a group
    contributes exactly 0 there."""
    out = []
    g = 4
    for name, num_groups, tie in [("gdpo_random", 3, False), ("gdpo_with_a_tied_function", 2, True)]:
        f1 = RNG.uniform(0, 1, size=num_groups * g)
        f2 = (RNG.uniform(0, 1, size=num_groups * g) > 0.5).astype(np.float64)
        if tie:
            f2[:g] = 1.0  # function 2 ties in group 0
        weights = [1.0, 0.5]
        summed = np.zeros(num_groups * g)
        for v, w in zip([f1, f2], weights):
            grp = v.reshape(num_groups, g)
            for i in range(num_groups):
                if np.all(grp[i] == grp[i][0]):
                    continue
                m, sd = grp[i].mean(), grp[i].std(ddof=1)
                summed[i * g:(i + 1) * g] += w * (grp[i] - m) / (sd + 1e-4)
        adv = (summed - summed.mean()) / (summed.std(ddof=1) + 1e-4)
        totals = weights[0] * f1 + weights[1] * f2
        out.append(
            {
                "name": name,
                "group_size": g,
                "values": [r(f1), r(f2)],
                "weights": weights,
                "totals": r(totals),
                "advantages": r(adv),
            }
        )
    return out


def main():
    fixture = {
        "generator": "learner/tests/reference/grpo_reference.py (numpy %s)" % np.__version__,
        "advantages": advantage_cases(),
        "kl": kl_cases(),
        "kl_controller": kl_controller_case(),
        "masked": masked_cases(),
        "loss": loss_cases(),
        "logprobs": logprob_cases(),
        "batch": batch_case(),
        "advantages_gdpo": gdpo_cases(),
    }
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "grpo_fixture.json")
    with open(path, "w") as f:
        json.dump(fixture, f, indent=1)
        f.write("\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
