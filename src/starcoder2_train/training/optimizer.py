"""`muon: true`: the decoder layers' weight matrices step with Muon, everything else with AdamW, as one optimizer.

Muon (Jordan et al. 2024; Liu et al. 2025, "Muon is scalable for LLM training") replaces each hidden matrix's
update by its momentum orthogonalised with five Newton–Schulz iterations; `torch.optim.Muon` implements it and
this module only splits the parameters and makes the pair look like one `torch.optim.Optimizer` to the Trainer,
the LR scheduler and checkpoints:

- Muon: every trainable 2-D parameter inside a decoder layer (q/k/v/o and the MLP's two projections; LoRA's A and
  B when only they train), at `muon_learning_rate` (0.02 by default: torch's Muon scales it by
  sqrt(max(1, rows / columns)) per matrix), momentum `muon_momentum` (Nesterov), decoupled weight decay
  `weight_decay`.
- AdamW (torch.optim.AdamW with the recipe's betas and epsilon; fused when `optim` is adamw_torch_fused): the
  embeddings and lm_head (tied or not), biases and norms, at `learning_rate`; weight decay as the Trainer applies
  it (not on biases and norms).
- The LR schedule multiplies each group's own starting rate, so warm-up and decay apply to both alike.
- Checkpoints hold {"muon": ..., "adamw": ...}: each optimizer's own state_dict, so a resume restores the
  momentum buffers and the moments exactly (tests/test_muon.py resumes and compares with an uninterrupted run).

Cost per rank at the mission's size (StarCoder2-3B: 30 layers, hidden 3072, 12,288 MLP): Muon keeps one fp32
momentum per matrix element against AdamW's two, so the hidden matrices' optimizer state falls from 8 to 4 bytes
per parameter (about 11 GB less for the 2.8B hidden parameters); each step runs 5 Newton–Schulz iterations per
matrix, about 30·m·n·min(m, n) FLOPs, some 2·10^14 for the whole model (well under 1% of a 4M-token step's
7·10^16), but every rank computes it for every matrix: the orthogonalisation is not sharded.

Not with DeepSpeed ZeRO or FSDP: they hand the optimizer flattened shards of the parameters, and Muon needs whole
matrices. The Trainer refuses the combination by name (training/trainer.py) rather than train something else.
On the 2-core quickstart the orthogonalisation takes a quarter of each step, and reaches AdamW's held-out loss in
less than half the time (docs/benchmarks.md).
"""

from collections import OrderedDict

import torch

from starcoder2_train.configs import RecipeError


def muon_parameter_names(model) -> set[str]:
    """Names of the trainable 2-D parameters inside the model's decoder layers: the ones Muon steps."""
    from starcoder2_train.training.trainer import decoder_layers

    inside = {id(parameter) for layer in decoder_layers(model) for parameter in layer.parameters()}
    return {
        name
        for name, parameter in model.named_parameters()
        if parameter.requires_grad and parameter.ndim == 2 and id(parameter) in inside
    }


class MuonWithAdamW(torch.optim.Optimizer):
    """torch.optim.Muon for `muon_groups` and torch.optim.AdamW for `adamw_groups`, stepped together.

    `param_groups` and `state` are the two optimizers' own, read through (so that the LR scheduler's changes
    reach them, also after `load_state_dict` has replaced their groups), AdamW's groups first: the Trainer logs
    the first group's rate as `learning_rate`, and that stays the recipe's key. `state_dict` nests the two.
    """

    def __init__(self, muon_groups: list[dict], adamw_groups: list[dict], *, muon_kwargs: dict, adamw_kwargs: dict):
        # Optimizer.__init__ would make groups of its own; the hook tables it sets are all the base needs.
        self.defaults = {}
        for table in (
            "_optimizer_step_pre_hooks",
            "_optimizer_step_post_hooks",
            "_optimizer_state_dict_pre_hooks",
            "_optimizer_state_dict_post_hooks",
            "_optimizer_load_state_dict_pre_hooks",
            "_optimizer_load_state_dict_post_hooks",
        ):
            setattr(self, table, OrderedDict())
        self.muon = torch.optim.Muon(muon_groups, **muon_kwargs)
        self.adamw = torch.optim.AdamW(adamw_groups, **adamw_kwargs)

    @property
    def param_groups(self) -> list[dict]:
        return self.adamw.param_groups + self.muon.param_groups

    @property
    def state(self):
        return {**self.muon.state, **self.adamw.state}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        if set(state_dict) != {"muon", "adamw"}:
            raise RecipeError(
                "muon: the checkpoint's optimizer state is not a Muon + AdamW state (it was saved by a run without "
                "muon: true); resume with the optimizer it was trained with, or start the optimizer afresh."
            )
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])

    def __repr__(self) -> str:
        return f"MuonWithAdamW(\n{self.muon!r},\n{self.adamw!r})"


def muon_with_adamw(model, args, decay_parameter_names) -> MuonWithAdamW:
    """The optimizer of a `muon: true` run (module docstring), from the recipe's PretrainingArguments."""
    optim = getattr(args.optim, "value", args.optim)
    if optim not in ("adamw_torch", "adamw_torch_fused"):
        raise RecipeError(
            f"muon: the parameters Muon does not take step with torch's AdamW; optim: {optim} cannot be "
            "combined with it (use adamw_torch or adamw_torch_fused, or muon: false)."
        )
    hidden = muon_parameter_names(model)
    if not hidden:
        raise RecipeError("muon: the model has no trainable 2-D parameter inside a decoder layer for Muon to step.")
    named = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]
    decay = set(decay_parameter_names)
    muon_groups = [{"params": [p for n, p in named if n in hidden], "weight_decay": args.weight_decay}]
    adamw_groups = [
        {"params": [p for n, p in named if n not in hidden and n in decay], "weight_decay": args.weight_decay},
        {"params": [p for n, p in named if n not in hidden and n not in decay], "weight_decay": 0.0},
    ]
    adamw_groups = [group for group in adamw_groups if group["params"]]
    return MuonWithAdamW(
        muon_groups,
        adamw_groups,
        muon_kwargs={"lr": args.muon_learning_rate, "momentum": args.muon_momentum, "nesterov": True},
        adamw_kwargs={
            "lr": args.learning_rate,
            "betas": (args.adam_beta1, args.adam_beta2),
            "eps": args.adam_epsilon,
            "fused": optim == "adamw_torch_fused" or None,
        },
    )
