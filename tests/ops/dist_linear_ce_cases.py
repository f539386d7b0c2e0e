"""linear_cross_entropy with the vocabulary split over the ranks of the world (gloo), against the full
materialised-logits reference computed on every rank. Usage: dist_linear_ce_cases.py OUT.json SETUP(unused)."""
import os
import sys

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/testing_utils.py
from megaswift.ops import linear_cross_entropy  # noqa: E402
from testing_utils import write_case_results  # noqa: E402

N, H, VOCAB, PADDED = 41, 12, 50, 52


def reference(h, w, labels, scale, smoothing):
    z = h @ w[:VOCAB].t()
    per_token = F.cross_entropy(z, labels, reduction='none', label_smoothing=smoothing) * scale
    loss = per_token.sum() / (labels != -100).sum()
    logp = torch.log_softmax(z, -1)
    lp = torch.where(labels >= 0, logp.gather(1, labels.clamp(min=0)[:, None]).squeeze(1), 0.0)
    ent = -(logp.exp() * logp).sum(-1)
    return loss, lp, ent, z.argmax(-1)


def case(rank, world, smoothing, chunk, vchunk, group):
    g = torch.Generator().manual_seed(7)
    h = torch.randn(N, H, generator=g, dtype=torch.float64)
    w = torch.randn(PADDED, H, generator=g, dtype=torch.float64)
    labels = torch.randint(0, VOCAB, (N,), generator=g)
    labels[::6] = -100
    scale = torch.rand(N, generator=g, dtype=torch.float64) * 2
    up_lp, up_ent = torch.randn(N, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)
    shard = PADDED // world
    h_ref, w_ref = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, lp, ent, am = reference(h_ref, w_ref, labels, scale, smoothing)
    (loss + (lp * up_lp).sum() + (ent * up_ent).sum()).backward()
    out = {}
    for mode in ('eager', 'recompute'):
        h_op = h.clone().requires_grad_()
        w_op = w[rank * shard:(rank + 1) * shard].clone().requires_grad_()
        res = linear_cross_entropy(h_op, w_op, labels, loss_scale=scale, tp_group=group, vocab_size=VOCAB,
                                   label_smoothing=smoothing, chunk_size=chunk, vocab_chunk_size=vchunk,
                                   return_logprobs=mode == 'recompute', return_entropy=mode == 'recompute',
                                   return_argmax=True)
        total = res.loss
        if mode == 'recompute':
            total = total + (res.logprobs * up_lp).sum() + (res.entropy * up_ent).sum()
        total.backward()
        if mode == 'eager':  # the reference's gradient includes the log-prob and entropy terms: redo without
            h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
            reference(h2, w2, labels, scale, smoothing)[0].backward()
            gh, gw = h2.grad, w2.grad
        else:
            gh, gw = h_ref.grad, w_ref.grad
        out[mode] = {
            'loss': abs(float(res.loss) - float(loss)),
            'logprobs': float((res.logprobs - lp).abs().max()) if res.logprobs is not None else 0.0,
            'entropy': float((res.entropy - ent).abs().max()) if res.entropy is not None else 0.0,
            'argmax_equal': bool((res.argmax == am).all()),
            'grad_hidden': float((h_op.grad - gh).abs().max() / gh.abs().max()),
            'grad_weight': float((w_op.grad - gw[rank * shard:(rank + 1) * shard]).abs().max() / gw.abs().max()),
        }
    return out


def main():
    out_path = sys.argv[1]
    if 'RANK' not in os.environ:
        os.environ.update(RANK='0', WORLD_SIZE='1', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(29500 + os.getpid() % 1000))
    dist.init_process_group('gloo')
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for smoothing in (0.0, 0.1):
        for chunk, vchunk in ((None, None), (8, None), (8, 10)):
            results[f'tp{world}_ls{smoothing}_c{chunk}_v{vchunk}'] = case(rank, world, smoothing, chunk, vchunk,
                                                                          dist.group.WORLD)
    if world > 1:  # negative control: no TP group, so each rank sees only its shard's softmax
        results[f'tp{world}_no_group'] = case(rank, world, 0.0, None, None, None)
    write_case_results(results, out_path)
    dist.destroy_process_group()


if __name__ == '__main__':
    main()
