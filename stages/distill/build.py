"""The trained parts of a run: the student (wrapped for DDP when distributed), the method's objective, the loss
balancer, the optimiser, its learning-rate schedule and the fp16 gradient scaler."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel

from pipeline.models.student import Student
from stages.distill.balancer import DynamicBalancer
from stages.distill.context import RunContext
from stages.distill.inputs import TrainingData, student_tokenizer


@dataclass
class Parts:
    student: Student
    model: torch.nn.Module  # the student, or its DDP wrapper: what the forward pass calls
    objective: torch.nn.Module
    balancer: DynamicBalancer
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler

    def parameters(self) -> list[torch.nn.Parameter]:
        """Everything the optimiser updates."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def weights(self) -> dict[str, torch.Tensor]:
        """The learned tensors a checkpoint must hold finite: the student's state and the objective's
        parameters (the baseline's temperature; the distillation objectives have none)."""
        learned = {f"objective.{name}": p.detach() for name, p in self.objective.named_parameters()}
        return {**self.student.state_dict(), **learned}


def build_parts(ctx: RunContext, data: TrainingData) -> Parts:
    dc, device = ctx.cfg.distill, ctx.device
    # The seed fixes the initial weights; the order of construction below fixes which random numbers each gets.
    torch.manual_seed(dc.seed)
    student = Student(ctx.cfg.student, data.dim, tokenizer=student_tokenizer(ctx, data.ds)).to(device)
    model = (
        DistributedDataParallel(student, device_ids=[device] if device.type == "cuda" else None)
        if ctx.ranks.distributed
        else student
    )
    objective = data.method.objective(data.dim).to(device)
    balancer = DynamicBalancer.from_config(objective.names, dc.balancer)
    groups = [{"params": list(student.parameters())}]
    learned = list(objective.parameters())
    if learned:  # the baseline's temperature; CLIP leaves it out of weight decay, which would pull it to 1
        groups.append({"params": learned, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=dc.lr, weight_decay=dc.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, dc.lr_step_epochs, dc.lr_gamma)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and dc.precision == "fp16")
    return Parts(student, model, objective, balancer, optimizer, scheduler, scaler)
