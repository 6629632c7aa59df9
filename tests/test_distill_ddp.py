"""Two CPU processes (gloo, torchrun) train exactly like one process on the same global batches.

Each rank encodes its half of a global batch; the losses run on the gathered batch (in-batch negatives from
both ranks). all_gather's backward sums every rank's gradient for a rank's rows (W times the single-process
gradient, since every rank computes the same loss) and DDP averages over the W ranks: the parameter gradients
equal the single-process ones. The text encoder is a local BERT without dropout: with dropout, each rank
would draw masks for its half of the batch and no run could equal another.

AdamW is blind to the scale of a gradient, so equal weights after training do not show that the gradients
have the right size; a second test compares the gradients themselves on a small model.
"""

from __future__ import annotations

import subprocess
import sys

import distill_helpers
import pytest
import torch
import torch.nn.functional as F
import transformers
from distill_helpers import final_weights, load, read_csv, subprocess_env, write_params

from pipeline.config import LossesConfig
from pipeline.data.canonical import CanonicalDataset
from pipeline.models.student import build_vocab, load_vocab_tokenizer
from stages.distill.ddp import Ranks, gather_with_grad
from stages.distill.losses import DistillationLosses
from stages.distill.train import Trainer

world = distill_helpers.world
pytestmark = pytest.mark.usefixtures("one_thread")


def _bert_without_dropout(world, directory):
    ds = CanonicalDataset.load(world.canonical)
    tokenizer = load_vocab_tokenizer(build_vocab(ds.texts(ds.caption_ids("train")), directory / "vocab.txt"))
    tokenizer.save_pretrained(str(directory))
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=24, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, pad_token_id=0,
    )
    transformers.BertModel(config).save_pretrained(str(directory))
    return directory


def test_two_gloo_ranks_match_one_process(world, tmp_path):
    text_dir = _bert_without_dropout(world, tmp_path / "bert")
    changes = {"student": {"text_model_dir": str(text_dir)}, "distill": {"epochs": 1, "batch_size": 20}}
    single = tmp_path / "single"
    Trainer(load(write_params(world, single, changes))).train()

    ddp = tmp_path / "ddp"
    params = write_params(world, ddp, changes)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
        "-m", "pipeline.cli", "--params", str(params), "distill",
    ]
    result = subprocess.run(command, cwd=ddp, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]

    mine, theirs = read_csv(ddp / "out" / "train_log.csv"), read_csv(single / "out" / "train_log.csv")
    assert [r["step"] for r in mine] == [r["step"] for r in theirs] == list(range(1, 16))
    for a, b in zip(mine, theirs, strict=True):
        for key in b:
            if key != "samples_per_s":
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (int(b["step"]), key)

    # Equal gradients give equal weights after 15 AdamW steps, up to float summation order, except for the
    # attention key biases: their true gradient is exactly 0 (softmax ignores a shift shared by all keys), so
    # theirs is float noise, which Adam's normalisation turns into lr-sized steps of either sign. Elsewhere
    # 1e-4 is a tenth of one step's size (lr 1e-3).
    weights, expected = final_weights(ddp / "out"), final_weights(single / "out")
    for name, tensor in expected.items():
        if name.endswith("attn.qkv.bias"):
            dim = tensor.numel() // 3
            tensor, other = torch.cat([tensor[:dim], tensor[2 * dim :]]), torch.cat([weights[name][:dim],
                                                                                     weights[name][2 * dim :]])
        elif name.endswith("attention.self.key.bias"):
            continue
        else:
            other = weights[name]
        torch.testing.assert_close(other, tensor, rtol=1e-4, atol=1e-4, msg=name)
    # The weights moved: the comparison is not between two untouched models.
    start = Trainer(load(write_params(world, tmp_path / "untrained", changes)), resume="no").student.state_dict()
    moved = max((expected[k] - start[k]).abs().max().item() for k in expected)
    assert moved > 1e-3


def _gradients_on_rank(rank: int, world_size: int, store_file: str, out_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world_size)
    try:
        model, inputs, teacher, ids, losses = _toy_problem()
        ddp_model = torch.nn.parallel.DistributedDataParallel(model)
        ranks = Ranks(rank, world_size, rank)
        per_rank = inputs.shape[0] // world_size
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        s_v, s_t = ddp_model(inputs[mine])
        values = losses(gather_with_grad(s_v, ranks), gather_with_grad(s_t, ranks), *teacher, ids)
        sum(values[name] for name in losses.names).backward()
        torch.save({k: p.grad for k, p in model.named_parameters()}, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


class _ToyDualEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.image = torch.nn.Linear(6, 8)
        self.text = torch.nn.Linear(6, 8)

    def forward(self, x):
        return F.normalize(self.image(x), dim=-1), F.normalize(self.text(x.flip(-1)), dim=-1)


def _toy_problem():
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = _ToyDualEncoder()
    inputs = torch.randn(12, 6, generator=generator)
    teacher = (F.normalize(torch.randn(12, 8, generator=generator), dim=-1),
               F.normalize(torch.randn(12, 8, generator=generator), dim=-1))
    ids = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5, 6, 7, 8, 8])
    losses = DistillationLosses(LossesConfig(queue_size=16), 8)
    # A queue that holds something, so CD has negatives (some of the same images, which it masks).
    losses.enqueue(F.normalize(torch.randn(10, 8, generator=generator), dim=-1),
                   F.normalize(torch.randn(10, 8, generator=generator), dim=-1), torch.arange(10))
    return model, inputs, teacher, ids, losses


def test_gathered_losses_give_single_process_gradients(tmp_path):
    model, inputs, teacher, ids, losses = _toy_problem()
    values = losses(*model(inputs), *teacher, ids)
    sum(values[name] for name in losses.names).backward()
    expected = {k: p.grad for k, p in model.named_parameters()}

    torch.multiprocessing.start_processes(
        _gradients_on_rank, args=(2, str(tmp_path / "store"), str(tmp_path / "grads")), nprocs=2,
        start_method="fork",
    )
    for rank in range(2):
        grads = torch.load(tmp_path / f"grads.{rank}", weights_only=True)
        for name, grad in expected.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=f"rank {rank}: {name}")
