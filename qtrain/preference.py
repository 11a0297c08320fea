"""Preference tuning on the NF4 base: DPO (with its IPO, hinge and robust variants), ORPO, SimPO, KTO.

Every objective compares sequence log-probabilities of responses y given a prompt x,

    log pi(y | x) = sum_t log softmax(h_t W^T)[y_t+1]        over the response tokens only

computed by `sequence_logps` without the [B, S, V] logits: the lm_head runs over chunks of tokens
(`TokenLogps`, the same chunking as `qtrain.kernels.linear_cross_entropy`), and the backward
recomputes each chunk's logits from the saved hidden states and per-token log-sum-exp. A pair's
chosen and rejected sequences run in ONE forward: a batch of B pairs is 2B rows, chosen first.

The reference policy pi_ref of DPO and KTO is the same model with its adapter switched off
(`adapter_switched_off`: the NF4 base with no second copy), run under no-grad once per batch;
methods that cannot be switched off are refused by name. ORPO and SimPO need no reference.

    DPO      -log sigmoid(beta * ((c - c_ref) - (r - r_ref)))            Rafailov et al. 2023
    cDPO     with label smoothing e: (1-e) * that + e * (-log sigmoid(-beta * delta))
    robust   ((1-e) * -log s(beta d) - e * -log s(-beta d)) / (1 - 2e)   Chowdhury et al. 2024
    hinge    relu(1 - beta * delta)                                     SLiC, Zhao et al. 2023
    IPO      (delta / |y| - 1 / (2 beta))^2, delta per token            Azar et al. 2023 (TRL's form)
    ORPO     NLL(chosen) - beta * log sigmoid(log odds(c_avg) - log odds(r_avg))   Hong et al. 2024
    SimPO    -log sigmoid(beta * (c_avg - r_avg) - gamma)               Meng et al. 2024
    KTO      w_d (1 - s(beta (c - c_ref - z0))), w_u (1 - s(beta (z0 - (r - r_ref))))  Ethayarajh et al. 2024

(c, r: summed log-probs of chosen/rejected; _avg: per token; z0: KTO's KL estimate from mismatched
prompt/completion pairs of the batch, detached, clamped at 0.) Each matches TRL 1.16's definition
(tests/qtrain/test_preference_parity.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from qtrain.config import OBJECTIVES, PreferenceConfig
from qtrain.kernels.linear_cross_entropy import default_chunk_size

IGNORE_INDEX = -100


# ---- per-token log-probs through a chunked lm_head ----


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """fp32 logits [C, V] of one chunk, soft-capped as the model's forward does."""
    z = (h @ weight.T).float()
    return z if softcap is None else torch.tanh(z / softcap) * softcap


class TokenLogps(torch.autograd.Function):
    """log softmax(h_i W^T)[y_i] for the labelled rows i of `hidden` [N, D], chunk by chunk.

    Forward keeps per row only the log-sum-exp (fp32 [M]); backward recomputes a chunk's logits z
    and, with g_i the incoming gradient of row i, d z = g_i (onehot(y_i) - softmax(z_i)) (times the
    cap's slope 1 - tanh^2), dH = dz W and dW += dz^T h. Holds one chunk of logits at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, rows, targets, chunk: int, softcap):
        logps = torch.empty(rows.numel(), dtype=torch.float32, device=hidden.device)  # [M]
        lse = torch.empty_like(logps)
        for start in range(0, rows.numel(), chunk):
            take = slice(start, start + chunk)
            z = _chunk_logits(hidden[rows[take]], weight, softcap)  # [C, V]
            lse[take] = torch.logsumexp(z, dim=1)
            logps[take] = z.gather(1, targets[take, None]).squeeze(1) - lse[take]
            del z
        ctx.save_for_backward(hidden, weight, rows, targets, lse)
        ctx.chunk, ctx.softcap = chunk, softcap
        return logps

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        hidden, weight, rows, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        g_hidden = torch.zeros_like(hidden) if need_h else None  # [N, D]; unlabelled rows stay 0
        g_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for start in range(0, rows.numel(), ctx.chunk):
            take = slice(start, start + ctx.chunk)
            h = hidden[rows[take]]  # [C, D]
            z = (h @ weight.T).float()  # [C, V]
            slope = None
            if ctx.softcap is not None:
                t = torch.tanh(z / ctx.softcap)
                z, slope = t * ctx.softcap, 1 - t * t
            dz = (z - lse[take, None]).exp_().mul_(-grad[take, None])  # -g softmax
            dz.scatter_add_(1, targets[take, None], grad[take, None])  # + g onehot
            if slope is not None:
                dz.mul_(slope)
            if g_hidden is not None:
                g_hidden.index_copy_(0, rows[take], (dz.to(weight.dtype) @ weight).to(hidden.dtype))
            if g_weight is not None:
                g_weight.addmm_(dz.T, h.float())
            del z, dz
        return g_hidden, None if g_weight is None else g_weight.to(weight.dtype), None, None, None, None


def token_logps(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int | None = None, softcap: float | None = None
) -> torch.Tensor:
    """Per-token log-probs [B, S] (0 where labels == IGNORE_INDEX): hidden [B, S, D] at the positions
    that predict `labels` [B, S] (already shifted), lm_head `weight` [V, D]. Under autocast the
    matmuls run in the autocast dtype, the softmax in fp32 (as `linear_cross_entropy`)."""
    shape = labels.shape
    hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    device = hidden.device.type
    autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    if autocast:
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)  # [M]
    chunk = chunk or default_chunk_size(max(rows.numel(), 1), weight.shape[0], weight.shape[1])
    with torch.autocast(device, enabled=False) if autocast else contextlib.nullcontext():
        logps = TokenLogps.apply(hidden, weight, rows, labels[rows], chunk, softcap)  # [M]
    out = torch.zeros(labels.numel(), dtype=torch.float32, device=hidden.device)
    return out.index_put((rows,), logps).view(shape)


def sequence_logps(model, batch: dict, chunk: int | None = None, offload=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs of each row's labelled tokens [R] fp32, their counts [R]): one decoder
    forward over the batch's R rows, then `token_logps`; never the [R, S, V] logits."""
    from qtrain.train import logit_softcap  # the recipe's own rule for a soft-capped head

    with offload or contextlib.nullcontext():
        hidden = model.get_decoder()(
            input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False
        ).last_hidden_state  # [R, S, D]
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:
        what = type(head).__name__
        raise ValueError(f"preference objectives need a plain linear lm_head without bias; this model's is {what}")
    next_labels = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)  # [R, S]: token t predicts t+1
    per_token = token_logps(hidden, head.weight, next_labels, chunk, logit_softcap(model))  # [R, S]
    return per_token.sum(1), (next_labels != IGNORE_INDEX).sum(1)


# ---- the reference policy: the same model, adapter off ----


@contextlib.contextmanager
def adapter_switched_off(model, methods):
    """The model as pi_ref: every method switched off (`PeftMethod.switched_off`); a method that
    cannot be is refused by name."""
    with contextlib.ExitStack() as stack:
        for method in methods:
            off = method.switched_off(model)
            if off is None:
                raise ValueError(
                    f"method {method.name} cannot be switched off to give the reference model; use objective=orpo or "
                    "simpo (no reference), preference.reference_free=true (dpo), or method=lora"
                )
            stack.enter_context(off)
        yield model


@torch.no_grad()
def reference_logps(model, methods, batch: dict, chunk: int | None = None) -> torch.Tensor:
    """Summed log-probs [R] of the batch's rows under pi_ref (no graph, no dropout in the adapter)."""
    with adapter_switched_off(model, methods):
        return sequence_logps(model, batch, chunk)[0]


def data_fingerprint(examples) -> str:
    """sha256 of the pairs' token ids: a cached reference pass belongs to exactly this data."""
    digest = hashlib.sha256()
    for e in examples:
        digest.update(json.dumps([e.prompt_ids, e.chosen_ids, e.rejected_ids]).encode())
    return digest.hexdigest()


def precompute_reference(model, methods, examples, pad_id: int, batch_size: int, device, autocast, chunk, path: Path, model_id: str) -> torch.Tensor:
    """pi_ref's log-probs [N, 2] (chosen, rejected) of every pair, in one no-grad pass before training,
    cached at `path` as safetensors (never pickled) with the data's fingerprint and the model: a run
    that resumes reads it back; a cache of other data or another model is computed again."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from qtrain.preference_data import collate_pairs

    meta = {"fingerprint": data_fingerprint(examples), "model": model_id}
    if path.exists():
        with safe_open(str(path), framework="pt") as f:
            if f.metadata() == meta:
                return f.get_tensor("ref_logps")
    out = []
    was_training = model.training
    model.eval()  # no dropout anywhere in the base
    try:
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate_pairs(examples[start : start + batch_size], pad_id).items()}
            with autocast or contextlib.nullcontext():
                out.append(reference_logps(model, methods, batch, chunk).view(2, -1).T.cpu())  # [b, 2]
    finally:
        model.train(was_training)
    ref = torch.cat(out)  # [N, 2]
    tmp = path.with_name(path.name + ".tmp")
    save_file({"ref_logps": ref.contiguous()}, str(tmp), metadata=meta)
    os.replace(tmp, path)  # atomic: a crash leaves the old file or none
    return ref


# ---- the objectives: per-pair (per-example) losses [B] ----


def dpo_losses(chosen, rejected, ref_chosen, ref_rejected, beta: float, loss_type: str = "sigmoid",
               label_smoothing: float = 0.0, n_chosen=None, n_rejected=None) -> torch.Tensor:  # fmt: skip
    """DPO and variants on delta = (c - c_ref) - (r - r_ref) (see the module docstring)."""
    delta = (chosen - ref_chosen) - (rejected - ref_rejected)  # [B]
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    if loss_type == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta)
        return (clean - flipped) / (1 - 2 * label_smoothing)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type == "ipo":  # per-token log-ratios (TRL's normalisation)
        per_token = (chosen - ref_chosen) / n_chosen.clamp(min=1) - (rejected - ref_rejected) / n_rejected.clamp(min=1)
        return (per_token - 1 / (2 * beta)) ** 2
    raise ValueError(f"preference.loss_type: {loss_type!r}; choose sigmoid, hinge, ipo or robust")


def log_odds(avg_logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) of a per-token mean log-prob, computed as logp - log(1 - exp(logp))."""
    return avg_logp - torch.log(-torch.expm1(avg_logp))


def orpo_odds_ratio(chosen_avg, rejected_avg) -> torch.Tensor:
    """log sigmoid(log odds(chosen) - log odds(rejected)) [B] (ORPO's L_OR is minus beta times it)."""
    return F.logsigmoid(log_odds(chosen_avg) - log_odds(rejected_avg))


def simpo_losses(chosen_avg, rejected_avg, beta: float, gamma: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """-log sigmoid(beta (c_avg - r_avg) - gamma) [B] (label smoothing as TRL's CPO trainer)."""
    margin = beta * (chosen_avg - rejected_avg) - gamma
    return -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)


def kto_losses(logps, ref_logps, desirable, kl, beta: float, w_desirable: float, w_undesirable: float) -> torch.Tensor:
    """KTO's per-example losses [B]: desirable rows w_d (1 - s(beta (ratio - z0))), the others
    w_u (1 - s(beta (z0 - ratio))), ratio = logp - logp_ref, z0 = `kl` (detached, >= 0)."""
    ratio = logps - ref_logps
    desired = w_desirable * (1 - torch.sigmoid(beta * (ratio - kl)))
    undesired = w_undesirable * (1 - torch.sigmoid(beta * (kl - ratio)))
    return torch.where(desirable, desired, undesired)


# ---- one micro-batch: the objective's loss and its implicit-reward sums ----

METRICS = ("rewards_chosen", "rewards_rejected", "rewards_margins", "rewards_accuracy")


def step_totals(micro_batches: list[dict], objective: str) -> dict[str, int]:
    """What a step's loss is a mean over: pairs (KTO: examples), and ORPO's chosen tokens."""
    if objective == "kto":
        return {"units": sum(int(b["desirable"].numel()) for b in micro_batches)}
    units = sum(int(b["pairs"]) for b in micro_batches)
    chosen_tokens = sum(int((b["labels"][: int(b["pairs"]), 1:] != IGNORE_INDEX).sum()) for b in micro_batches)
    return {"units": units, "chosen_tokens": chosen_tokens}


def preference_loss(model, methods, batch: dict, objective: str, p: PreferenceConfig, totals: dict,
                    chunk: int | None = None, offload=None) -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
    """This micro-batch's share of the step's loss (its per-pair losses summed over the step's
    `totals`, so accumulation equals one larger batch), and its reward sums (`METRICS`, summed over
    its pairs: divide by totals["units"])."""
    if objective == "kto":
        return _kto_loss(model, methods, batch, p, totals, chunk, offload)
    b = int(batch["pairs"])
    if "ref_logps" in batch:  # precomputed (`precompute_reference`): [B, 2] chosen, rejected
        ref_c, ref_r = batch["ref_logps"].unbind(1)
    elif objective == "dpo" and not p.reference_free:
        ref_c, ref_r = reference_logps(model, methods, batch, chunk).split(b)
    logps, counts = sequence_logps(model, batch, chunk, offload)
    (c, r), (n_c, n_r) = logps.split(b), counts.split(b)
    if objective == "dpo":
        if p.reference_free:
            ref_c = ref_r = torch.zeros_like(c)
        losses = dpo_losses(c, r, ref_c, ref_r, p.beta, p.loss_type, p.label_smoothing, n_c, n_r)
        reward_c, reward_r = p.beta * (c - ref_c).detach(), p.beta * (r - ref_r).detach()
        loss = losses.sum() / totals["units"]
    else:
        c_avg, r_avg = c / n_c.clamp(min=1), r / n_r.clamp(min=1)
        if objective == "orpo":
            nll = -c.sum() / max(totals["chosen_tokens"], 1)
            loss = nll - p.beta * orpo_odds_ratio(c_avg, r_avg).sum() / totals["units"]
        elif objective == "simpo":
            loss = simpo_losses(c_avg, r_avg, p.beta, p.simpo_gamma, p.label_smoothing).sum() / totals["units"]
        else:
            raise ValueError(f"objective: {objective!r}; choose one of {', '.join(OBJECTIVES)}")
        reward_c, reward_r = p.beta * c_avg.detach(), p.beta * r_avg.detach()  # TRL's rewards for ORPO/SimPO
    return loss, _reward_sums(reward_c, reward_r)


def _reward_sums(reward_c: torch.Tensor, reward_r: torch.Tensor) -> dict[str, float]:
    return {
        "rewards_chosen": float(reward_c.sum()),
        "rewards_rejected": float(reward_r.sum()),
        "rewards_margins": float((reward_c - reward_r).sum()),
        "rewards_accuracy": float((reward_c > reward_r).float().sum()),
    }


def _kl_batch(batch: dict) -> dict:
    return {k[3:]: v for k, v in batch.items() if k.startswith("kl_")}


def _kto_loss(model, methods, batch, p: PreferenceConfig, totals, chunk, offload):
    """KTO: z0 = mean over the batch of log pi(y_j | x_i) - log pi_ref(y_j | x_i) on mismatched
    pairs, detached and clamped at 0 (TRL: the policy's under no-grad)."""
    ref = reference_logps(model, methods, batch, chunk)
    with torch.no_grad():
        kl_ref = reference_logps(model, methods, _kl_batch(batch), chunk)
        kl = (sequence_logps(model, _kl_batch(batch), chunk)[0] - kl_ref).mean().clamp(min=0)
    logps, _ = sequence_logps(model, batch, chunk, offload)
    desirable = batch["desirable"]
    losses = kto_losses(logps, ref, desirable, kl, p.beta, p.desirable_weight, p.undesirable_weight)
    reward = p.beta * (logps - ref).detach()
    sums = {
        "rewards_chosen": float(reward[desirable].sum()),  # over the desirable examples
        "rewards_rejected": float(reward[~desirable].sum()),
        "rewards_margins": float(reward[desirable].sum() - reward[~desirable].sum()),
        "rewards_accuracy": float(((reward > 0) == desirable).float().sum()),  # the reward's sign agrees with the label
        "kl": float(kl) * int(desirable.numel()),
        "desirable": float(desirable.sum()),
    }
    return losses.sum() / totals["units"], sums


def reward_means(sums: dict[str, float], units: int) -> dict[str, float]:
    """The step's implicit-reward metrics from the summed ones: means over pairs (KTO: chosen and
    rejected rewards over the desirable / undesirable examples, margin their difference)."""
    if "desirable" in sums:
        d, u = max(sums["desirable"], 1), max(units - sums["desirable"], 1)
        c, r = sums["rewards_chosen"] / d, sums["rewards_rejected"] / u
        accuracy, kl = sums["rewards_accuracy"] / units, sums["kl"] / units
        return {"rewards_chosen": c, "rewards_rejected": r, "rewards_margins": c - r, "rewards_accuracy": accuracy, "kl": kl}
    return {k: sums[k] / units for k in METRICS}


# ---- memory (qtrain.estimate) ----

PAIR_OBJECTIVES = ("dpo", "orpo", "simpo")  # a batch of B examples is 2B rows


def token_logps_bytes(
    n_tokens: int, vocab: int, hidden_size: int, chunk: int | None, dtype: torch.dtype
) -> tuple[int, int, int]:
    """(saved, forward workspace, backward workspace) bytes of `token_logps` over N labelled tokens,
    from the code above (e = dtype's itemsize, f = e for 16-bit dtypes and 0 for fp32: the fp32 copy
    of fp32 logits is the same tensor; C = the chunk):

        saved     e*N*D + 4*N + 8*N    the hidden states (kept for the backward), log-sum-exp, rows
        forward   C*V*(e + f + 4)      a chunk's logits, their fp32 copy, logsumexp's exp
        backward  e*N*D + C*V*(e + f + 4 + f)   dH, then per chunk the logits, their fp32 copy,
                                                 dz (fp32) and dz cast to W's dtype
    """
    n, v, d, e = n_tokens, vocab, hidden_size, dtype.itemsize
    f = 0 if dtype == torch.float32 else e
    c = min(n, chunk or default_chunk_size(max(n, 1), v, d))
    return e * n * d + 12 * n, c * v * (e + f + 4), e * n * d + c * v * (e + 2 * f + 4)
