"""AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning"):
LoRA in the form of a singular value decomposition whose ranks are allocated during training.

    y = W x + b + (α / (r_num + 1e-5)) · P Λ Q dropout(x)         ΔW = P Λ Q
    P [out, r] (left vectors), Λ = diag(λ) [r] (singular values), Q [r, in] (right vectors)

W frozen (NF4), r = init_r. Λ is zero at init (the model is unchanged at step 0); P and Q are
N(0, 0.02). r_num is the initial rank (constant: pruning zeroes λ_i, it does not rescale). The
orthogonality of P and Q is encouraged by a regulariser added to the loss,

    R(P, Q) = orth_reg_weight · mean over all P, Q of  ||Q Q^T - I||_F,  ||P^T P - I||_F,

and the rank budget falls during training. Every triplet G_i = {P_:i, λ_i, Q_i:} gets an importance
score from the sensitivities I(w) = |w · ∂L/∂w| of its entries, smoothed (EMA, β1) and with an
uncertainty term (EMA, β2) of their deviation:

    Ī_t = β1 Ī_{t-1} + (1 - β1) I_t        Ū_t = β2 Ū_{t-1} + (1 - β2) |I_t - Ī_t|        s(w) = Ī_t · Ū_t
    S_i = s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji)

and after each step the λ_i of the lowest scores are set to zero so that b(t) triplets remain,
b(t) falling cubically from the initial budget b0 = init_r · n to b_T = target_r · n (n: the number
of adapted matrices):

    b(t) = b0                                                    t <= t_i               (warm-up)
    b(t) = int(b_T + (b0 - b_T) (1 - (t - t_i) / (T - t_f - t_i))^3)   masked every Δ_T steps
    b(t) = b_T, the pattern fixed at t = T - t_f                 t > T - t_f            (final)

As Hugging Face PEFT implements it (peft/tuners/adalora, the definition this module follows
operation for operation): lora_A = Q [r, in], lora_E = λ [r, 1], lora_B = P [out, r], ranknum = r,
scaling = lora_alpha, forward `(dropout(x) @ (A * E)^T @ B^T) * scaling / (ranknum + 1e-5)`; the
RankAllocator's update_ipt / mask_to_budget / budget_schedule (the threshold is the k-th smallest
score, k = b0 - b(t), and every triplet scoring <= it is masked); `AdaLoraModel.update_and_allocate`
(importance updated while t < T - t_f, the final pattern allocated with a forced mask at
t = T - t_f, the EMAs then dropped, the pattern re-applied after every later step). Defaults are
PEFT's: target q_proj and v_proj (its mapping for llama, mistral, qwen2, gemma), init_r 12,
target_r 8, lora_alpha 8, β1 = β2 = 0.85, orth_reg_weight 0.5, tinit = tfinal = 0, deltaT 1.

Step convention: `after_step(model, step, total_steps)` is called after optimizer update `step`
(1-based) and passes `step` as PEFT's `global_step`, the convention of PEFT's AdaLoraConfig
docstring: warm-up is updates 1..tinit, the final pattern is allocated at update T - tfinal and
the last tfinal updates train it. With tfinal = 0 the last update (T) allocates the final budget.
T is `total_step`, or the run's train.max_steps when it is None.

Differences: PEFT fails (torch.kthvalue with k = 0) when target_r == init_r; here nothing is masked
then. PEFT fails when T - tfinal = 1 (no score before the final allocation); here that is a config
error. A step whose gradients are not all finite (the fp16 GradScaler skipped the update) leaves the
EMAs as they are (PEFT would make them inf/NaN for good); its budget and mask still apply. lora_alpha must be > 0 (PEFT's fallback for <= 0 scales by the current rank, which changes
when PEFT resizes a pruned adapter on load).

Model changes (instance only): each target LoRALinear gets fp32 parameters `adalora_a` [r, in],
`adalora_e` [r, 1], `adalora_b` [out, r], a non-persistent fp32 buffer `adalora_ranknum` [1] and a
forward hook adding the term to the layer's output (bias included, as PEFT's layer adds it to its
base layer's output). The hook runs inside the decoder layer, so gradient checkpointing recomputes
it (its dropout with the RNG state that torch.utils.checkpoint restores). A target that already
has LoRA (rank > 0) is an error: AdaLoRA replaces LoRA on its targets; LoRA on other linears composes.

Precision: without autocast the input is cast to the adapter's dtype (fp32) and the term is computed
in fp32, then cast to the output's dtype and added (as PEFT's 4-bit layer: cast x, compute, cast to
the result's dtype). Under autocast the input is left as it is and the two matmuls run in the
autocast dtype (A ⊙ E is formed in fp32 first), the scaling in fp32, the sum in the output's dtype.
With Λ = 0 the term is exactly zero: identity at init in any dtype. The regulariser and all of the
allocator's arithmetic run in fp32 with autocast disabled.

Trainable parameters: init_r · (in + out + 1) per target (P, Q, λ), summed over layers; with the
defaults, per decoder layer 12 · (2d + h_q + 2 + h_kv), h_q = num_heads · head_dim (q_proj's
output), h_kv = num_kv_heads · head_dim (v_proj's output).

Training loop: `regularization(model)` is added to the loss; `after_step` updates the EMAs and masks;
`trainer_state` / `load_trainer_state` checkpoint the EMAs, the rank pattern and the budget (tensors
copied to the CPU bit for bit), so a resumed run continues exactly.

Saving (PEFT's format): adapter_config.json with peft_type "ADALORA", init_r, target_r, the schedule,
total_step (the resolved T) and rank_pattern ({"<module>.lora_E": [bool] * init_r}, null before the
first allocation), and `base_model.model.<module>.lora_A` [k, in], `.lora_E` [k, 1], `.lora_B`
[out, k], k the number of kept triplets (PEFT's `resize_state_dict_by_rank_pattern`; no ranknum,
PEFT restores it as init_r). `PeftModel.from_pretrained(base, dir)` loads it. `from_peft` takes what
PEFT saves back to init_r by zero padding: with the file's rank_pattern the kept triplets return to
their positions, without it they fill the first k positions (the same function: masked triplets are
zero). Because the pruned PEFT tensors are not the training state, `folds` is set: checkpoints also
keep the init_r tensors (method.safetensors), which a resumed run reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from qtrain.methods.base import PeftMethod, base_linears, matches, projection_shapes

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from qtrain.lora import LoRALinear

PEFT_PREFIX = "base_model.model."
A, E, B, RANKNUM = "adalora_a", "adalora_e", "adalora_b", "adalora_ranknum"
PEFT_NAMES = {A: "lora_A", E: "lora_E", B: "lora_B"}
EPS = 1e-5  # PEFT's ranknum + 1e-5


def _autocast_on(device: str) -> bool:
    return torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)


def add_svd_delta(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
    """Forward hook (with_kwargs) of a target: y + (dropout(x) @ (A ⊙ E)^T @ B^T) · α / (r_num + 1e-5).
    A module-level function, so that deepcopy/pickle keep the hook (it reads the module's own tensors)."""
    x = args[0] if args else kwargs["x"]  # [..., in]
    p = module.adalora_dropout
    h = F.dropout(x, p=p, training=True) if p > 0 and module.training else x
    a, e, b = module.adalora_a, module.adalora_e, module.adalora_b
    if not _autocast_on(x.device.type):
        h = h.to(a.dtype)
    scale = module.adalora_scaling / (module.adalora_ranknum.float() + EPS)
    delta = h @ (a * (e * scale)).T @ b.T  # [..., out]; the scale on the small [r, in] side: no [..., out] temporaries
    return output + delta.to(output.dtype)


def _device(module: nn.Module) -> torch.device:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


@dataclass
class RankAllocation:
    """What AdaLoRA learns while it trains, beside its parameters (the state of PEFT's RankAllocator):
    the importance EMAs by parameter name, the rank pattern by module name ({name: [kept] * init_r},
    None before the first allocation), the last budget and the T that after_step last saw.

    A runtime object that the `AdaLoRA` method owns (`method.allocation`), made new by `apply` and
    `remove`: not a field, so the `adalora:` config section (the dataclass's fields, `config_dict`)
    never carries it, and `trainer_state` / `load_trainer_state` are its only way in and out."""

    exp_avg_ipt: dict[str, torch.Tensor] = field(default_factory=dict)
    exp_avg_unc: dict[str, torch.Tensor] = field(default_factory=dict)
    rank_pattern: dict[str, list[bool]] | None = None
    budget: int | None = None
    total_seen: int | None = None


def orthogonality(p: torch.Tensor, rows: bool) -> torch.Tensor:
    """||P P^T - I||_F (rows: A's right singular vectors) or ||P^T P - I||_F (B's columns), fp32."""
    p = p.float()
    cov = p @ p.T if rows else p.T @ p  # [r, r]
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    return torch.linalg.matrix_norm(cov - eye, ord="fro")


@dataclass
class AdaLoRA(PeftMethod):
    name: ClassVar[str] = "adalora"
    peft_type: ClassVar[str | None] = "ADALORA"
    folds: ClassVar[bool] = True  # the pruned PEFT tensors are not the (init_r) training state
    # 'all-linear' or module names (suffix match), as LoRA's target_modules
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    init_r: int = 12  # the rank of every target at the start
    target_r: int = 8  # the average rank at the end (budget target_r x number of targets)
    tinit: int = 0  # warm-up updates before any pruning
    tfinal: int = 0  # final updates with the rank pattern fixed
    deltaT: int = 1  # updates between two allocations (PEFT's name)
    beta1: float = 0.85  # EMA of the sensitivity
    beta2: float = 0.85  # EMA of the uncertainty
    orth_reg_weight: float = 0.5
    total_step: int | None = None  # T; None: the run's train.max_steps
    lora_alpha: float = 8.0  # scaling α: ΔW · α / init_r
    lora_dropout: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            self.target_modules = [self.target_modules]
        if not self.target_modules:
            raise ValueError("adalora.target_modules: empty; give module names or 'all-linear'")
        if not self.all_linear:
            if not all(isinstance(n, str) and n for n in self.target_modules):
                raise ValueError(
                    f"adalora.target_modules: names must be non-empty strings, got {self.target_modules!r}"
                )
            self.target_modules = list(self.target_modules)
        self._check_ranks()
        self._check_schedule()
        self._check_weights()
        self._reset_state()

    def _check_ranks(self) -> None:
        if self.init_r < 1:
            raise ValueError(f"adalora.init_r must be >= 1, got {self.init_r}")
        if not 0 <= self.target_r <= self.init_r:
            raise ValueError(f"adalora.target_r must be in [0, init_r={self.init_r}], got {self.target_r}")

    def _check_schedule(self) -> None:
        for key in ("tinit", "tfinal"):
            if getattr(self, key) < 0:
                raise ValueError(f"adalora.{key} must be >= 0, got {getattr(self, key)}")
        if self.deltaT < 1:
            raise ValueError(f"adalora.deltaT must be >= 1, got {self.deltaT}")
        if self.total_step is not None:
            if self.total_step < 1:
                raise ValueError(
                    f"adalora.total_step must be >= 1 or null (the run's train.max_steps), got {self.total_step}"
                )
            self.check_phases(self.total_step, "adalora.total_step")

    def check_run(self, train_steps: int) -> None:
        """Without total_step, the phases are those of train.max_steps."""
        if self.total_step is None:
            self.check_phases(train_steps, "train.max_steps")

    def check_phases(self, total: int, what: str) -> None:
        if self.tinit >= total - self.tfinal:
            raise ValueError(
                f"adalora: no budgeting phase: tinit={self.tinit} must be < {what} ({total}) - tfinal ({self.tfinal}); "
                "lower adalora.tinit / adalora.tfinal or train longer"
            )
        if total - self.tfinal < 2:  # PEFT fails there (no importance score before the final allocation)
            raise ValueError(
                f"adalora: the final allocation at step {what} ({total}) - tfinal ({self.tfinal}) must come after at "
                "least one step that measures importance (>= 2); lower adalora.tfinal or train longer"
            )

    def _check_weights(self) -> None:
        for key in ("beta1", "beta2"):
            if not 0 < getattr(self, key) < 1:
                raise ValueError(f"adalora.{key} must be in (0, 1), got {getattr(self, key)}")
        if not (math.isfinite(self.orth_reg_weight) and self.orth_reg_weight >= 0):
            raise ValueError(f"adalora.orth_reg_weight must be finite and >= 0, got {self.orth_reg_weight}")
        if not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise ValueError(f"adalora.lora_alpha must be finite and > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"adalora.lora_dropout must be in [0, 1), got {self.lora_dropout}")

    def _reset_state(self) -> None:
        """A new, empty `RankAllocation` (the method's runtime state; not a config field)."""
        self.allocation = RankAllocation()

    @property
    def all_linear(self) -> bool:
        return self.target_modules == "all-linear"

    @property
    def rank_pattern(self) -> dict[str, list[bool]] | None:
        """{module name: [kept] * init_r} of the last allocation (None before the first), a copy."""
        pattern = self.allocation.rank_pattern
        return None if pattern is None else {k: list(v) for k, v in pattern.items()}

    @property
    def budget(self) -> int | None:
        """The number of triplets kept by the last step's schedule (None before after_step)."""
        return self.allocation.budget

    # ---- the model ----

    def _targets(self, model: nn.Module) -> dict[str, LoRALinear]:
        return {
            n: m
            for n, m in base_linears(model).items()
            if self.all_linear or matches(n, self.target_modules)
        }

    def adapted(self, model: nn.Module) -> dict[str, LoRALinear]:
        """The adapted linears of `model`, in model order."""
        return {n: m for n, m in base_linears(model).items() if A in m._parameters}

    def _check_targets(self, targets: dict[str, LoRALinear]) -> None:
        if not targets:
            raise ValueError(f"adalora.target_modules={self.target_modules!r} matched no linear layer of the model")
        for name, m in targets.items():
            if A in m._parameters:
                raise ValueError(f"adalora: {name} already has an {A} (AdaLoRA applied twice?)")
            if m.rank:
                raise ValueError(
                    f"adalora: {name} already has a LoRA adapter (rank {m.rank}); AdaLoRA replaces LoRA on its "
                    "targets: remove it from lora.target_modules or from adalora.target_modules"
                )

    def apply(self, model: nn.Module) -> None:
        targets = self._targets(model)
        self._check_targets(targets)
        for m in targets.values():
            self._add(m)
        self._reset_state()

    def _add(self, m: LoRALinear) -> None:
        """P, λ, Q and r_num on one linear, PEFT's init: λ = 0, P and Q ~ N(0, 0.02)."""
        device, r = _device(m), self.init_r
        a = torch.empty(r, m.in_features, device=device, dtype=torch.float32)  # [r, in]
        b = torch.empty(m.out_features, r, device=device, dtype=torch.float32)  # [out, r]
        nn.init.normal_(a, mean=0.0, std=0.02)
        nn.init.normal_(b, mean=0.0, std=0.02)
        m.register_parameter(A, nn.Parameter(a))
        m.register_parameter(E, nn.Parameter(torch.zeros(r, 1, device=device, dtype=torch.float32)))  # [r, 1]
        m.register_parameter(B, nn.Parameter(b))
        m.register_buffer(RANKNUM, torch.full((1,), float(r), device=device, dtype=torch.float32), persistent=False)
        m.adalora_scaling, m.adalora_dropout = float(self.lora_alpha), float(self.lora_dropout)
        self.hooks.forward(m, add_svd_delta, with_kwargs=True)

    def remove(self, model: nn.Module) -> None:
        """Undo `apply`: drop the parameters and the hook (the model is the base again)."""
        self.hooks.remove(model)
        for m in self.adapted(model).values():
            for name in (A, E, B):
                del m._parameters[name]
            del m._buffers[RANKNUM]
            del m.adalora_scaling, m.adalora_dropout
        self._reset_state()

    def low_rank_width(self, linear: nn.Module) -> int:
        """init_r where this method put its P·Λ·Q (it saves what a LoRA of that rank saves)."""
        a = getattr(linear, A, None)
        return a.shape[0] if a is not None else 0

    def owns(self, param_name: str) -> bool:
        module, _, attr = param_name.rpartition(".")
        if attr not in PEFT_NAMES or module.endswith("lm_head"):
            return False
        return self.all_linear or matches(module, self.target_modules)

    def expected_trainable(self, config: PretrainedConfig) -> int:
        c = config.get_text_config()
        chosen = projection_shapes(config, self.target_modules)  # (in, out)
        return c.num_hidden_layers * sum(self.init_r * (i + o + 1) for i, o in chosen.values())

    # ---- training-loop hooks ----

    def regularization(self, model: nn.Module) -> torch.Tensor | None:
        """orth_reg_weight · mean over the A and B of every target of ||AA^T - I||_F and ||B^TB - I||_F
        (PEFT's AdaLoraModel.forward), fp32 with autocast off; None when orth_reg_weight is 0."""
        if self.orth_reg_weight == 0:
            return None
        modules = self.adapted(model)
        if not modules:
            raise RuntimeError("adalora.regularization: the model has no AdaLoRA parameters (apply the method first)")
        device = next(iter(modules.values())).adalora_a.device
        with torch.autocast(device.type, enabled=False):
            terms = [orthogonality(getattr(m, p), rows=p == A) for m in modules.values() for p in (A, B)]
            return self.orth_reg_weight * (torch.stack(terms).sum() / len(terms))

    def _resolve_total(self, total_steps: int) -> int:
        total = self.total_step if self.total_step is not None else total_steps
        if self.total_step is None:
            self.check_phases(total, "the run's total steps (train.max_steps)")
        self.allocation.total_seen = total
        return total

    def budget_schedule(self, step: int, total: int, n_matrices: int) -> tuple[int, bool]:
        """(budget b(step), whether to mask at this step): PEFT's RankAllocator.budget_schedule."""
        init_bgt, target_bgt = self.init_r * n_matrices, self.target_r * n_matrices
        if step <= self.tinit:
            return init_bgt, False
        if step > total - self.tfinal:
            return target_bgt, True
        mul_coeff = 1 - (step - self.tinit) / (total - self.tfinal - self.tinit)
        return int((init_bgt - target_bgt) * (mul_coeff**3) + target_bgt), step % self.deltaT == 0

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """PEFT's update_and_allocate(global_step=step), after optimizer update `step` (gradients still set)."""
        total = self._resolve_total(total_steps)
        final, modules = total - self.tfinal, self.adapted(model)
        if not modules:
            raise RuntimeError("adalora.after_step: the model has no AdaLoRA parameters (apply the method first)")
        if step < final:
            if self._gradients_finite(modules):  # else the optimizer skipped the step too (fp16 GradScaler)
                self._update_ipt(modules)
            self.allocation.budget, mask = self.budget_schedule(step, total, len(modules))
            if mask and self.allocation.exp_avg_ipt:
                self._mask_to_budget(modules, self.allocation.budget)
        elif step == final:  # the final allocation (forced mask), then the EMAs are dropped
            self.allocation.budget = self.budget_schedule(step, total, len(modules))[0]
            self._mask_to_budget(modules, self.allocation.budget)
            self.allocation.exp_avg_ipt, self.allocation.exp_avg_unc = {}, {}
        elif self.allocation.rank_pattern is None:
            raise RuntimeError(
                f"adalora.after_step: step {step} is past the final allocation (step {final}) but no rank pattern "
                "was allocated; resume from a checkpoint with its trainer state"
            )
        else:
            self.allocation.budget = self.target_r * len(modules)
            self._apply_pattern(modules)

    def _gradients_finite(self, modules: dict[str, LoRALinear]) -> bool:
        """Whether every gradient is finite (one device sync); a missing gradient is an error."""
        flags = []
        for mname, m in modules.items():
            for pname in (A, E, B):
                grad = getattr(m, pname).grad
                if grad is None:
                    raise RuntimeError(
                        f"adalora.after_step: {mname}.{pname} has no gradient; call it after backward() and "
                        "optimizer.step(), before zero_grad()"
                    )
                flags.append(grad.isfinite().all().to(flags[0].device if flags else grad.device))
        return bool(torch.stack(flags).all())

    def _update_ipt(self, modules: dict[str, LoRALinear]) -> None:
        """Ī ← β1 Ī + (1-β1) I,  Ū ← β2 Ū + (1-β2) |I - Ī|,  I = |p · ∂L/∂p| (PEFT's update_ipt)."""
        with torch.no_grad():
            for mname, m in modules.items():
                for pname in (A, E, B):
                    self._update_one(f"{mname}.{pname}", getattr(m, pname))

    def _update_one(self, name: str, p: torch.Tensor) -> None:
        ipt = (p * p.grad).abs().detach()
        avg = self.allocation.exp_avg_ipt.get(name, torch.zeros_like(p))
        unc = self.allocation.exp_avg_unc.get(name, torch.zeros_like(p))
        avg = self.beta1 * avg + (1 - self.beta1) * ipt
        self.allocation.exp_avg_ipt[name] = avg
        self.allocation.exp_avg_unc[name] = self.beta2 * unc + (1 - self.beta2) * (ipt - avg).abs()

    def _score(self, name: str) -> torch.Tensor:
        return self.allocation.exp_avg_ipt[name] * self.allocation.exp_avg_unc[name]

    def triplet_scores(self, modules: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
        """S_i = s(λ_i) + (mean_j s(A_ij) + mean_j s(B_ji)) [r] per module (PEFT's mask_to_budget)."""
        out = {}
        for mname in modules:
            s_a = self._score(f"{mname}.{A}").mean(dim=1, keepdim=True)  # [r, 1]
            s_b = self._score(f"{mname}.{B}").mean(dim=0).view(-1, 1)  # [r, 1]
            s_e = self._score(f"{mname}.{E}")  # [r, 1]
            out[mname] = s_e.view(-1) + torch.cat([s_a, s_b], dim=1).sum(dim=1)
        return out

    def _mask_to_budget(self, modules: dict[str, LoRALinear], budget: int) -> None:
        """Zero λ_i of every triplet scoring <= the k-th smallest score, k = b0 - budget."""
        if not self.allocation.exp_avg_ipt:
            raise RuntimeError("adalora.after_step: no importance scores yet to allocate the budget from")
        scores = self.triplet_scores(modules)
        k = self.init_r * len(modules) - budget
        if k <= 0:  # nothing to prune (target_r == init_r); PEFT's kthvalue fails here
            self.allocation.rank_pattern = {n: [True] * self.init_r for n in modules}
        else:
            device = next(iter(scores.values())).device
            threshold = torch.kthvalue(torch.cat([s.to(device) for s in scores.values()]), k=k)[0].item()
            self.allocation.rank_pattern = {n: (~(s <= threshold)).tolist() for n, s in scores.items()}
        self._apply_pattern(modules)

    def _apply_pattern(self, modules: dict[str, LoRALinear]) -> None:
        with torch.no_grad():
            for mname, m in modules.items():
                keep = torch.tensor(self.allocation.rank_pattern[mname], device=m.adalora_e.device)  # [r]
                m.adalora_e.masked_fill_(~keep[:, None], 0.0)

    def mask(self, model: nn.Module, rank_pattern: dict[str, list[bool]]) -> None:
        """Set the rank pattern ({module name: [kept] * init_r}) and zero the pruned λ_i (PEFT's
        mask_using_rank_pattern)."""
        modules = self.adapted(model)
        self.allocation.rank_pattern = self._checked_pattern(rank_pattern, modules, "adalora.mask")
        self._apply_pattern(modules)

    def _checked_pattern(self, pattern: dict, modules: dict, source: str) -> dict[str, list[bool]]:
        if set(pattern) != set(modules):
            extra, missing = sorted(set(pattern) - set(modules)), sorted(set(modules) - set(pattern))
            raise ValueError(
                f"{source}: the rank pattern's modules differ from the model's (extra {extra}, missing {missing})"
            )
        for name, kept in pattern.items():
            if len(kept) != self.init_r or not all(isinstance(v, bool) for v in kept):
                raise ValueError(
                    f"{source}: the rank pattern of {name} must be {self.init_r} booleans (init_r), got {kept!r}"
                )
        return {n: list(pattern[n]) for n in modules}

    # ---- the allocator's checkpoint ----

    def trainer_state(self) -> dict:
        return {
            "exp_avg_ipt": {n: t.detach().cpu().clone() for n, t in self.allocation.exp_avg_ipt.items()},
            "exp_avg_unc": {n: t.detach().cpu().clone() for n, t in self.allocation.exp_avg_unc.items()},
            "rank_pattern": self.rank_pattern,
            "budget": self.allocation.budget,
            "total_step": self.allocation.total_seen,
        }

    def load_trainer_state(self, model: nn.Module, state: dict) -> None:
        if not state:
            return
        modules = self.adapted(model)
        params = {f"{mn}.{pn}": getattr(m, pn) for mn, m in modules.items() for pn in (A, E, B)}
        emas = []
        for key in ("exp_avg_ipt", "exp_avg_unc"):
            emas.append(self._checked_emas(state[key], params, key))
        pattern = state["rank_pattern"]
        self.allocation.rank_pattern = (
            None if pattern is None else self._checked_pattern(pattern, modules, "adalora trainer state")
        )
        self.allocation.exp_avg_ipt, self.allocation.exp_avg_unc = emas
        self.allocation.budget, self.allocation.total_seen = state["budget"], state["total_step"]

    def _checked_emas(self, emas: dict, params: dict[str, torch.Tensor], key: str) -> dict[str, torch.Tensor]:
        out = {}
        for name, t in emas.items():
            if name not in params:
                raise ValueError(f"adalora trainer state: {key} has {name!r}, not an AdaLoRA parameter of this model")
            if t.shape != params[name].shape:
                raise ValueError(
                    f"adalora trainer state: {key}[{name!r}] has shape {list(t.shape)}, expected {list(params[name].shape)}"
                )
            out[name] = t.to(device=params[name].device, dtype=params[name].dtype)
        return out

    # ---- PEFT's format ----

    def peft_config(self, base_model: str) -> dict:
        """PEFT's adapter_config.json. total_step: the configured T, else the run's (the last T that
        after_step saw), else the smallest valid one (tinit + tfinal + 1: PEFT needs a value; it is
        only read when training)."""
        total = self.total_step or self.allocation.total_seen or self.tinit + self.tfinal + 1
        pattern = self.rank_pattern
        return {
            "peft_type": "ADALORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "target_modules": "all-linear" if self.all_linear else sorted(self.target_modules),
            "init_r": self.init_r,
            "target_r": self.target_r,
            "tinit": self.tinit,
            "tfinal": self.tfinal,
            "deltaT": self.deltaT,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "orth_reg_weight": self.orth_reg_weight,
            "total_step": total,
            "rank_pattern": None if pattern is None else {f"{n}.lora_E": v for n, v in pattern.items()},
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "use_rslora": False,
            "use_dora": False,
            "modules_to_save": None,
            "inference_mode": True,
        }

    def _split(self, name: str, known: dict, source: str) -> tuple[str, str]:
        """`<module>.<attr>` of a key; `known` maps the accepted attrs."""
        module, _, attr = name.rpartition(".")
        if attr not in known or not (self.all_linear or matches(module, self.target_modules)):
            raise ValueError(f"{source}: {name!r} is not an AdaLoRA tensor of target_modules={self.target_modules!r}")
        return module, known[attr]

    def to_peft(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{`<module>.adalora_a|e|b`: init_r tensors} -> {`base_model.model.<module>.lora_A|E|B`}, the
        pruned triplets removed (PEFT's resize_state_dict_by_rank_pattern) once a pattern exists."""
        out = {}
        for name, t in tensors.items():
            module, peft_name = self._split(name, PEFT_NAMES, "adalora.to_peft")
            t = t.detach()
            if self.allocation.rank_pattern is not None:
                keep = torch.tensor(self.allocation.rank_pattern[module], device=t.device)  # [init_r]
                t = t[:, keep] if peft_name == "lora_B" else t[keep]
            out[PEFT_PREFIX + f"{module}.{peft_name}"] = t.contiguous()
        return out

    def from_peft(
        self,
        tensors: dict[str, torch.Tensor],
        rank_pattern: dict[str, list[bool]] | None = None,
        source: str = "adapter",
    ) -> dict[str, torch.Tensor]:
        """PEFT's keys and (pruned) shapes -> ours at init_r, zero padded. `rank_pattern`: the file's
        adapter_config.json "rank_pattern" (keys `<module>.lora_E`); with it the kept triplets return to
        their positions, without it they take the first k. The pattern is recorded (a re-save prunes
        the same way)."""
        groups: dict[str, dict[str, torch.Tensor]] = {}
        ours = {v: k for k, v in PEFT_NAMES.items()}
        for key, t in tensors.items():
            name = key.removeprefix(PEFT_PREFIX)
            if name == key:
                raise ValueError(f"{source}: {key!r} is not an AdaLoRA tensor (no {PEFT_PREFIX!r} prefix)")
            module, attr = self._split(name, ours, source)
            groups.setdefault(module, {})[attr] = t
        given = {k.removesuffix(".default").removesuffix(".lora_E"): v for k, v in (rank_pattern or {}).items()}
        out, pattern = {}, {}
        for module, group in groups.items():
            pattern[module] = self._positions(module, group, given.get(module), source)
            out.update(self._padded(module, group, pattern[module]))
        pruned = rank_pattern is not None or any(not all(v) for v in pattern.values())
        self.allocation.rank_pattern = pattern if pruned else None
        return out

    def _positions(self, module: str, group: dict, given: list[bool] | None, source: str) -> list[bool]:
        if set(group) != {A, E, B}:
            raise ValueError(
                f"{source}: {module} needs lora_A, lora_E and lora_B, found {sorted(PEFT_NAMES[k] for k in group)}"
            )
        a, e, b = group[A], group[E], group[B]
        k = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or tuple(e.shape) != (k, 1) or b.shape[1] != k:
            raise ValueError(
                f"{source}: {module}: shapes lora_A {list(a.shape)}, lora_E {list(e.shape)}, lora_B {list(b.shape)} "
                "are not [k, in], [k, 1], [out, k]"
            )
        if k > self.init_r:
            raise ValueError(
                f"{source}: {module} has rank {k} > adalora.init_r={self.init_r}; set init_r to the adapter's"
            )
        if given is None:
            return [True] * k + [False] * (self.init_r - k)
        if len(given) != self.init_r or sum(bool(v) for v in given) != k:
            raise ValueError(
                f"{source}: the rank pattern of {module} ({sum(map(bool, given))} of {len(given)} kept) does not fit its "
                f"tensors (rank {k}, init_r {self.init_r})"
            )
        return [bool(v) for v in given]

    def _padded(self, module: str, group: dict, kept: list[bool]) -> dict[str, torch.Tensor]:
        keep = torch.tensor(kept)  # [init_r]
        a, e, b = group[A], group[E], group[B]
        out = {
            A: a.new_zeros(self.init_r, a.shape[1]),
            E: e.new_zeros(self.init_r, 1),
            B: b.new_zeros(b.shape[0], self.init_r),
        }
        out[A][keep], out[E][keep], out[B][:, keep] = a, e, b
        return {f"{module}.{k}": v for k, v in out.items()}
