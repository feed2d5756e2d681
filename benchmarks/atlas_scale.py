"""The atlas against Pyro's full-dimensional flow, side by side in one process (issue "charts
computed once per chart").

Sections (``--sections``, default all):

- ``speed``: D=784, d=32, m=2, the default atlas ``AtlasFlow(D, d, K, layers=8,
  hidden=(256, 256))`` for K in {4, 64, 256}, and Pyro's 8-block flow on R^784 (affine coupling
  with hidden 256x256, then a random permutation). Per model, at batch N: (a) ``log_prob``
  under ``no_grad`` on points of the model's own samples, (b) ``sample((N,))`` under
  ``no_grad``, (c) ``rsample((N,))`` with grad enabled, (d) ``log_prob`` then
  ``.mean().backward()`` (a training step without the optimizer). Throughput atlas/Pyro, and
  throughput at the largest K over the smallest K. The default centres (standard normal in
  R^784) make the same few charts the candidates of every sample, and with gradients the
  per-chart work runs for the candidate charts only; so (d) is also timed with the centres
  moved onto K of the atlas's own samples ("centres on samples", as a fit's data-based
  initialization places them), where a batch's candidates span many of the K charts.
- ``bare``: the MLP passes an atlas ``log_prob`` has to run at the least: 8 coupling networks
  ``DenseNN(d//2 + 32, [256, 256], [d - d//2] * 2)`` (half the latent plus a 32-feature chart
  code) on N*m rows under ``no_grad``; atlas ``log_prob`` time over this time.
- ``distinct``: the same atlases with distinct chart images, the regime of a trained atlas
  (at initialization every chart has the same image, so every point lies on both candidates'
  images: the worst case for ``log_prob``, which runs the latent flows only on the pairs whose
  point lies on the chart's image). The charts' parameters are perturbed (seeded, standard
  deviation ``--perturb``), and the points are the model's own samples whose chart is among
  their candidates (drawn once; a fresh shuffled copy per repeat): ``log_prob`` and
  ``log_prob`` + ``backward`` against Pyro, and the fraction of pairs that ran the flows.
- ``memory``: one ``log_prob`` (+ ``backward``) at N=2048 for the atlas (K=64) and Pyro: bytes
  of tensors saved for backward (``torch.autograd.graph.saved_tensors_hooks``: the distinct
  storages, keyed by ``data_ptr``, that the graph still holds when ``log_prob`` returns, the
  module's parameters and buffers left out), at N and N/2 to split the part that scales with N
  from the fixed part; and the peak memory increase of ``log_prob`` + ``backward`` in a fresh
  subprocess (CPU: peak RSS, ``VmHWM`` reset just before the call, minus the RSS before it;
  the ``ru_maxrss`` increase where the peak cannot be reset; CUDA:
  ``torch.cuda.max_memory_allocated``).
- ``sphere``: S^2 in R^3 with two stereographic charts (``AtlasFlow.spheres``, 4 blocks, hidden
  64x64) against a Pyro flow on R^3 of the same depth (per block a spline with 8 bins, an
  affine coupling with hidden 64x64 and a permutation): ``log_prob`` throughput at batch N3.
  The Pyro flow is a density on R^3, the atlas one on S^2: a speed comparison only.

Method: every timed call builds its distribution (``atlas.flow()``). Under ``no_grad``
(``log_prob``, ``sample``) an AtlasFlow keeps its per-chart quantities between calls while its
parameters do not change (``atlasdist.transforms.cache``), the regime of evaluating a fixed
model; section 1 also times those two operations with the cache off (``cache_charts =
False``: every per-chart quantity recomputed in each call). With gradients (``rsample``,
``log_prob`` + ``backward``) the per-chart work is paid in every call. Every repeat gets a
fresh input tensor (Pyro's transform caches key on the tensor, and would make repeated calls
on one tensor look ~50x faster); the configurations are interleaved round-robin across
repeats; one warm-up round, then the median of the repeats. A
case whose warm-up call took more than ``--slow-seconds`` gets only ``--slow-repeats`` timed
repeats (the header says which). Distribution argument validation is off for both libraries.

    python benchmarks/atlas_scale.py [--device cpu|cuda] [--points N] [--repeats 5]
        [--threads 1] [--sections speed,bare,memory,sphere] [--out benchmarks/atlas_scale.md]
    python benchmarks/atlas_scale.py --quick      # smoke test, tiny sizes, under a minute
                                                  # (writes benchmarks/atlas_scale_quick.md)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as pyro_t
import torch
from pyro.nn import DenseNN
from torch import nn

import atlasdist
from atlasdist import AtlasFlow, ChartMembership

SECTIONS = ("speed", "bare", "distinct", "memory", "sphere")
OPS = ("log_prob", "sample", "rsample", "log_prob+backward")
DISTINCT_OPS = ("log_prob", "log_prob+backward")
CODE_FEATURES = 32  # the chart code of the bare coupling networks
MIB = 2.0**20


# ----------------------------------------------------------------------------- models


class PyroFlow(nn.Module):
    """Pyro's full-dimensional flow: ``blocks`` x ([spline,] affine coupling, permutation) on
    R^dim with a standard normal base, the transforms held as modules so it trains."""

    def __init__(
        self,
        dim: int,
        blocks: int,
        hidden: Sequence[int],
        device: str,
        spline_bins: int | None = None,
    ) -> None:
        super().__init__()
        parts: list = []
        for _ in range(blocks):
            if spline_bins is not None:
                parts.append(pyro_t.spline(dim, count_bins=spline_bins))
            parts.append(pyro_t.affine_coupling(dim, hidden_dims=list(hidden)))
            parts.append(pyro_t.Permute(torch.randperm(dim).to(device)))
        self.parts = parts
        self.transform_modules = nn.ModuleList([p for p in parts if isinstance(p, nn.Module)])
        self.register_buffer("loc", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))
        self.to(device)

    def flow(self) -> dist.TransformedDistribution:
        base = dist.Normal(self.loc, self.scale).to_event(1)
        return dist.TransformedDistribution(base, self.parts)


class CacheOff:
    """An atlas whose distributions recompute every per-chart quantity on each call."""

    def __init__(self, atlas: AtlasFlow) -> None:
        self.atlas = atlas

    def flow(self):
        self.atlas.cache_charts = False
        try:
            return self.atlas.flow()
        finally:
            self.atlas.cache_charts = True


def default_atlas(D: int, d: int, K: int, layers: int, hidden: Sequence[int]) -> AtlasFlow:
    return AtlasFlow(D, d, K, layers=layers, hidden=tuple(hidden), membership=ChartMembership(m=2))


def sphere_atlas(layers: int, hidden: Sequence[int]) -> AtlasFlow:
    poles = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]])
    return AtlasFlow.spheres(
        2, torch.zeros(2, 3), torch.ones(2), poles, layers=layers, hidden=tuple(hidden)
    )


# ----------------------------------------------------------------------------- timing


@dataclass
class Case:
    """One timed call: ``run(setup())``; ``setup`` (untimed) makes the fresh inputs."""

    op: str
    model: str
    points: int
    setup: Callable[[], Any]
    run: Callable[[Any], Any]
    grad: bool = False
    repeats: int = 0
    warmup_s: float = 0.0
    times: list[float] = field(default_factory=list)
    failed: str | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def throughput(self) -> float:
        return self.points / self.median


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_once(case: Case, device: str) -> float | None:
    """Seconds of one ``case.run`` on fresh inputs; None (and ``case.failed``) on OOM."""
    inputs = case.setup()
    sync(device)
    start = time.perf_counter()
    try:
        with torch.set_grad_enabled(case.grad):
            case.run(inputs)
        sync(device)
    except torch.cuda.OutOfMemoryError:
        case.failed = f"OOM at N={case.points}"
        del inputs
        torch.cuda.empty_cache()
        return None
    return time.perf_counter() - start


def run_round_robin(
    cases: list[Case], repeats: int, slow_s: float, slow_repeats: int, device: str
) -> None:
    """One warm-up round, then ``repeats`` rounds, the cases interleaved within each round."""
    tty = sys.stdout.isatty()
    total = len(cases) * (repeats + 1)
    done = 0

    def progress(case: Case, label: str) -> None:
        if tty:
            sys.stderr.write(f"\r  [{done}/{total}] {label} {case.op} {case.model}" + " " * 20)
            sys.stderr.flush()

    for case in cases:
        progress(case, "warm-up")
        t = time_once(case, device)
        done += 1
        case.warmup_s = t or 0.0
        case.repeats = slow_repeats if t is not None and t > slow_s else repeats
        case.repeats = min(case.repeats, repeats)
    for _ in range(repeats):
        for case in cases:
            if case.failed is None and len(case.times) < case.repeats:
                progress(case, "repeat")
                t = time_once(case, device)
                if t is not None:
                    case.times.append(t)
            done += 1
    if tty:
        sys.stderr.write("\r" + " " * 100 + "\r")


def run_timed(cases: list[Case], args: argparse.Namespace) -> float:
    """Runs the cases round-robin with the run's settings; returns the wall time (s)."""
    start = time.perf_counter()
    run_round_robin(cases, args.repeats, args.slow_seconds, args.slow_repeats, args.device)
    return time.perf_counter() - start


def zero_grads(module: nn.Module) -> None:
    for prm in module.parameters():
        prm.grad = None


def model_cases(label: str, model: nn.Module, n: int, ops: Sequence[str]) -> list[Case]:
    """The cases of ``ops`` for one model with a ``flow()`` method."""

    def fresh_points() -> torch.Tensor:
        with torch.no_grad():
            return model.flow().sample((n,)).detach().clone()

    def train_setup() -> torch.Tensor:
        zero_grads(model)
        return fresh_points()

    def train(x: torch.Tensor) -> None:
        model.flow().log_prob(x).mean().backward()

    table = {
        "log_prob": Case("log_prob", label, n, fresh_points, lambda x: model.flow().log_prob(x)),
        "sample": Case("sample", label, n, lambda: None, lambda _: model.flow().sample((n,))),
        "rsample": Case(
            "rsample", label, n, lambda: None, lambda _: model.flow().rsample((n,)), grad=True
        ),
        "log_prob+backward": Case("log_prob+backward", label, n, train_setup, train, grad=True),
    }
    return [table[op] for op in ops]


def distinct_chart_atlas(atlas: AtlasFlow, scale: float, seed: int) -> AtlasFlow:
    """Perturbs the charts' parameters in place (seeded): distinct chart images."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prm in atlas.charts.parameters():
            prm.add_(scale * torch.randn(prm.shape, generator=gen).to(prm))
    return atlas


def on_own_chart_points(atlas: AtlasFlow, n: int, max_draws: int = 2_000_000) -> torch.Tensor:
    """``n`` samples of the atlas whose chart is among their candidate charts (so their
    density is positive), drawn in batches of ``n``."""
    kept: list[torch.Tensor] = []
    found, drawn = 0, 0
    with torch.no_grad():
        p = atlas.flow()
        while found < n:
            if drawn >= max_draws:
                raise RuntimeError(f"fewer than {n} on-chart points in {drawn} draws")
            x, k = p.rsample_with_charts((n,))
            candidates, _ = p.membership.candidates(x, p.centres)
            ok = (candidates == k.unsqueeze(-1)).any(-1)
            kept.append(x[ok])
            found, drawn = found + int(ok.sum()), drawn + n
    return torch.cat(kept)[:n]


def candidate_charts(atlas: AtlasFlow, x: torch.Tensor) -> int:
    """How many distinct charts are candidates of the points ``x``: with gradients, the
    hypernetworks and frames run for these charts only."""
    with torch.no_grad():
        p = atlas.flow()
        return int(p.membership.candidates(x, p.centres)[0].unique().numel())


def section_distinct(args: argparse.Namespace, report: Report) -> None:
    n = args.points
    pools: dict[int, torch.Tensor] = {}
    by_op: dict[str, list[Case]] = {}
    kept: dict[int, float] = {}
    used: dict[int, int] = {}
    for K in args.charts:
        atlas = default_atlas(args.dim, args.latent, K, args.layers, args.hidden).to(args.device)
        distinct_chart_atlas(atlas, args.perturb, args.seed + K)
        pools[K] = on_own_chart_points(atlas, n)
        with torch.no_grad():
            on = atlas.flow()._pairs(pools[K], torch.Size([n]))["on_image"]
        kept[K] = float(on.float().mean())
        used[K] = candidate_charts(atlas, pools[K])

        def shuffled(pool=pools[K]) -> torch.Tensor:
            return pool[torch.randperm(n, device=pool.device)].clone()

        for case in model_cases(f"atlas K={K}, distinct charts", atlas, n, DISTINCT_OPS):
            case.setup = shuffled
            if case.grad:
                case.setup = lambda a=atlas, f=shuffled: (zero_grads(a), f())[1]
            by_op.setdefault(case.op, []).append(case)
    pyro_flow = PyroFlow(args.dim, args.layers, args.hidden, args.device)
    for case in model_cases("Pyro", pyro_flow, n, DISTINCT_OPS):
        by_op[case.op].append(case)
    # The bare network passes this log_prob must run: on the pairs on a chart image.
    pair_rows = {K: round(kept[K] * 2 * n) for K in args.charts}
    bares = {
        rows: bare_case(args.latent, 1, args.layers, args.hidden, rows, args.device)
        for rows in sorted(set(pair_rows.values()))
        if rows
    }
    cases = [c for op in DISTINCT_OPS for c in by_op[op]] + list(bares.values())
    elapsed = run_timed(cases, args)
    report.add(
        "",
        f"## 2b. Distinct chart images (a trained atlas's regime): the atlases of section 1 "
        f"with chart parameters perturbed (sd {args.perturb:g}), on their own samples",
        "",
        "| K | pairs on a chart image (ran the latent flows) | distinct candidate charts |",
        "|---:|---:|---:|",
        *[f"| {K} | {100 * kept[K]:.1f} % of N*m | {used[K]} |" for K in args.charts],
        "",
        *TIME_HEADER,
    )
    for op in DISTINCT_OPS:
        for case in by_op[op]:
            report.add(case_row(case, by_op[op][-1]))
    lo, hi = min(args.charts), max(args.charts)
    report.add("", f"| operation | throughput K={hi} / K={lo} |", "|---|---:|")
    for op in DISTINCT_OPS:
        a, b = by_op[op][args.charts.index(lo)], by_op[op][args.charts.index(hi)]
        ok = a.times and b.times
        report.add(f"| {op} | {fmt_ratio(b.throughput / a.throughput) if ok else 'n/a'} |")
    report.add(
        "",
        "| model | atlas log_prob (ms) | rows on a chart image | bare MLP passes on them (ms) "
        "| atlas / bare time |",
        "|---|---:|---:|---:|---:|",
    )
    for K, case in zip(args.charts, by_op["log_prob"], strict=False):
        bare_c = bares.get(pair_rows[K])
        if case.times and bare_c is not None and bare_c.times:
            report.add(
                f"| {case.model} | {1e3 * case.median:,.1f} | {pair_rows[K]} | "
                f"{1e3 * bare_c.median:,.1f} | {fmt_ratio(case.median / bare_c.median)} |"
            )
    report.add("", f"section wall time {elapsed:.0f} s", *reduced_note(cases, args.repeats))
    report.save()
    del pools, by_op, cases, pyro_flow
    gc.collect()


def bare_case(d: int, m: int, layers: int, hidden: Sequence[int], n: int, device: str) -> Case:
    nets = nn.ModuleList(
        DenseNN(d // 2 + CODE_FEATURES, list(hidden), [d - d // 2, d - d // 2])
        for _ in range(layers)
    ).to(device)

    def run(x: torch.Tensor) -> None:
        for net in nets:
            net(x)

    return Case(
        "bare MLP passes",
        f"{layers} x DenseNN({d // 2}+{CODE_FEATURES})",
        n,
        lambda: torch.randn(n * m, d // 2 + CODE_FEATURES, device=device),
        run,
    )


# ----------------------------------------------------------------------------- memory


class _Saved:
    """What the graph holds in place of a saved tensor: alive exactly as long as the graph
    keeps the tensor."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def saved_for_backward(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages that the graph of one ``flow().log_prob(x)`` keeps for
    backward (saved by branches dropped during the forward do not count), the model's
    parameters and buffers left out."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    live: weakref.WeakSet[_Saved] = weakref.WeakSet()

    def pack(t: torch.Tensor) -> _Saved:
        saved = _Saved(t)
        live.add(saved)
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved.tensor):
        lp = model.flow().log_prob(x)
    gc.collect()  # graphs of dropped branches held in reference cycles
    storages = {}
    for saved in list(live):
        s = saved.tensor.untyped_storage()
        if s.data_ptr() not in own:
            storages[s.data_ptr()] = s.nbytes()
    del lp
    return sum(storages.values())


def build_memory_model(args: argparse.Namespace, which: str) -> nn.Module:
    if which == "atlas":
        atlas = default_atlas(args.dim, args.latent, args.memory_charts, args.layers, args.hidden)
        return atlas.to(args.device)
    return PyroFlow(args.dim, args.layers, args.hidden, args.device)


def proc_status_kib(*keys: str) -> list[int | None]:
    """``kB`` fields of one read of ``/proc/self/status`` (Linux), None where missing."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return [None] * len(keys)
    fields = {line.split(":")[0]: line.split()[1] for line in lines if line.endswith(" kB")}
    return [int(fields[k]) if k in fields else None for k in keys]


def reset_peak_rss() -> int | None:
    """Resets the process's peak RSS (``VmHWM``; Linux >= 4.0) and returns the RSS in KiB, or
    None if it could not (the RSS counters are approximate, so a few MiB apart is a reset)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    hwm, rss = proc_status_kib("VmHWM", "VmRSS")
    if hwm is None or rss is None or hwm - rss > 8 * 1024:
        return None
    return rss


def child_peak(args: argparse.Namespace) -> None:
    """``--child``: peak memory increase of one ``log_prob`` + ``backward``, as JSON.

    CPU: peak RSS during the call minus the RSS before it (``VmHWM`` reset just before the
    call); where the peak cannot be reset, the increase of ``ru_maxrss`` (which misses a peak
    lower than one reached while building the model)."""
    model = build_memory_model(args, args.child)
    with torch.no_grad():
        x = model.flow().sample((args.memory_points,)).detach().clone()
    gc.collect()
    sync(args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    before = reset_peak_rss()
    before_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model.flow().log_prob(x).mean().backward()
    sync(args.device)
    (peak,) = proc_status_kib("VmHWM")
    if before is not None and peak is not None:
        out = {"rss_bytes": (peak - before) * 1024, "rss_method": "VmHWM"}
    else:  # ru_maxrss is in KiB on Linux
        after_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = {"rss_bytes": (after_max - before_max) * 1024, "rss_method": "ru_maxrss"}
    if args.device == "cuda":
        out["cuda_bytes"] = torch.cuda.max_memory_allocated() - base
    print(json.dumps(out))


def run_child(args: argparse.Namespace, which: str) -> dict[str, float] | str:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        which,
        "--device",
        args.device,
        "--threads",
        str(args.threads),
        "--seed",
        str(args.seed),
        "--dim",
        str(args.dim),
        "--latent",
        str(args.latent),
        "--layers",
        str(args.layers),
        "--hidden",
        *map(str, args.hidden),
        "--memory-charts",
        str(args.memory_charts),
        "--memory-points",
        str(args.memory_points),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
        return f"failed: {tail[0]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- report


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def fmt_ratio(x: float) -> str:
    return f"{x:#.3g}".rstrip(".")


def case_row(case: Case, reference: Case | None) -> str:
    if case.failed or not case.times:
        return f"| {case.op} | {case.model} | {case.points} | 0 | {case.failed} | | |"
    vs = (
        fmt_ratio(case.throughput / reference.throughput)
        if reference is not None and reference is not case and reference.times
        else ""
    )
    return (
        f"| {case.op} | {case.model} | {case.points} | {len(case.times)} | "
        f"{1e3 * case.median:,.1f} | {fmt_rate(case.throughput)} | {vs} |"
    )


TIME_HEADER = [
    "| operation | model | N | repeats | median (ms) | points/s | atlas/Pyro throughput |",
    "|---|---|---:|---:|---:|---:|---:|",
]


class Report:
    """Markdown lines, printed as they come and written to ``path`` after each section."""

    def __init__(self, path: Path) -> None:
        self.path, self.lines = path, []

    def add(self, *lines: str) -> None:
        for line in lines:
            print(line, flush=True)
            self.lines.append(line)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("\n".join(self.lines) + "\n")


def reduced_note(cases: list[Case], repeats: int) -> list[str]:
    slow = [c for c in cases if c.failed is None and c.repeats < repeats]
    return [
        f"- reduced to {c.repeats} repeats (warm-up call {c.warmup_s:.1f} s): {c.op}, {c.model}"
        for c in slow
    ]


# ----------------------------------------------------------------------------- sections


def section_speed(args: argparse.Namespace, report: Report) -> None:
    speed, bare = "speed" in args.sections, "bare" in args.sections
    ops = [op for op in args.operations if op in OPS] if speed else ["log_prob"]
    if bare and "log_prob" not in ops:
        ops.insert(0, "log_prob")
    n = args.points
    atlases = {
        K: default_atlas(args.dim, args.latent, K, args.layers, args.hidden).to(args.device)
        for K in args.charts
    }
    pyro_flow = PyroFlow(args.dim, args.layers, args.hidden, args.device)
    by_op: dict[str, list[Case]] = {}
    for K, atlas in atlases.items():
        for case in model_cases(f"atlas K={K}", atlas, n, ops):
            by_op.setdefault(case.op, []).append(case)
    spread = {}
    if "log_prob+backward" in ops:
        for K in args.charts:
            spread[K] = default_atlas(args.dim, args.latent, K, args.layers, args.hidden)
            spread[K].to(args.device)
            with torch.no_grad():
                spread[K].centres.copy_(spread[K].flow().sample((K,)))
            for case in model_cases(
                f"atlas K={K}, centres on samples", spread[K], n, ["log_prob+backward"]
            ):
                by_op[case.op].append(case)
    cached_ops = [op for op in ops if op in ("log_prob", "sample")] if speed else []
    for K, atlas in atlases.items():
        for case in model_cases(f"atlas K={K}, cache off", CacheOff(atlas), n, cached_ops):
            by_op[case.op].append(case)
    if speed:
        for case in model_cases("Pyro", pyro_flow, n, ops):
            by_op[case.op].append(case)
    bare_c = bare_case(args.latent, 2, args.layers, args.hidden, n, args.device) if bare else None
    cases = [c for op in ops for c in by_op[op]] + ([bare_c] if bare_c else [])
    elapsed = run_timed(cases, args)

    if speed:
        report.add(
            "",
            f"## 1. D={args.dim}, d={args.latent}, m=2: atlas (layers={args.layers}, hidden="
            f"{args.hidden}) vs Pyro ({args.layers} x affine coupling + permutation, "
            f"hidden {args.hidden})",
            "",
            *TIME_HEADER,
        )
        for op in ops:
            pyro_case = by_op[op][-1]
            for case in by_op[op]:
                report.add(case_row(case, pyro_case))
        with torch.no_grad():
            used = {K: candidate_charts(a, a.flow().sample((n,))) for K, a in atlases.items()}
            used_spread = {
                K: candidate_charts(a, a.flow().sample((n,))) for K, a in spread.items()
            }
        report.add(
            "",
            "Distinct candidate charts in one batch of N samples (with gradients the per-chart "
            "work, hypernetworks, frames, knots and coupling chart terms, runs for these only): "
            + ", ".join(f"K={K}: {u}" for K, u in used.items())
            + (
                "; centres on samples: " + ", ".join(f"K={K}: {u}" for K, u in used_spread.items())
                if spread
                else ""
            ),
        )
        lo, hi = min(args.charts), max(args.charts)
        report.add(
            "",
            f"| operation | throughput K={hi} / K={lo} |",
            "|---|---:|",
        )
        k = len(args.charts)
        for op in ops:
            variants = [(op, 0)]
            if op in cached_ops:
                variants.append((f"{op}, cache off", k))
            if op == "log_prob+backward" and spread:
                variants.append((f"{op}, centres on samples", k))
            for label, first in variants:
                row = by_op[op][first : first + k]
                a, b = row[args.charts.index(lo)], row[args.charts.index(hi)]
                ok = a.times and b.times
                ratio = fmt_ratio(b.throughput / a.throughput) if ok else "n/a"
                report.add(f"| {label} | {ratio} |")
    if bare_c is not None:
        report.add(
            "",
            f"## 2. Bare network passes: {args.layers} x DenseNN({args.latent // 2} + "
            f"{CODE_FEATURES}, {args.hidden}, [{args.latent - args.latent // 2}] * 2) on "
            f"N*m = {2 * n} rows, no_grad",
            "",
            f"bare MLP passes: median {1e3 * bare_c.median:,.1f} ms ({len(bare_c.times)} repeats)"
            if bare_c.times
            else f"bare MLP passes: {bare_c.failed}",
            "",
            "| model | atlas log_prob (ms) | bare MLP passes (ms) | atlas / bare time |",
            "|---|---:|---:|---:|",
        )
        for case in by_op["log_prob"][: len(args.charts)]:
            if case.times and bare_c.times:
                report.add(
                    f"| {case.model} | {1e3 * case.median:,.1f} | {1e3 * bare_c.median:,.1f}"
                    f" | {fmt_ratio(case.median / bare_c.median)} |"
                )
    notes = reduced_note(cases, args.repeats)
    report.add("", f"section wall time {elapsed:.0f} s", *notes)
    report.save()
    del atlases, pyro_flow, by_op, cases
    gc.collect()


def section_memory(args: argparse.Namespace, report: Report) -> None:
    n = args.memory_points
    report.add(
        "",
        f"## 3. Memory of one log_prob + backward, N={n} (atlas K={args.memory_charts}, "
        f"D={args.dim}, d={args.latent}; Pyro on R^{args.dim})",
        "",
        "Saved for backward: distinct storages that saved_tensors_hooks saw saved and the "
        f"graph still holds after log_prob at N={n} and N={n // 2}, parameters and buffers "
        "excluded; per point = "
        "the difference / (N/2) (the part that scales with N), fixed = the rest. Peak "
        "increase: fresh subprocess, one log_prob + backward after the model is built and "
        "the points drawn ("
        + (
            "torch.cuda.max_memory_allocated"
            if args.device == "cuda"
            else "peak RSS (VmHWM, reset just before the call) minus the RSS before it"
        )
        + ").",
        "",
        "| model | saved at N (MiB) | saved per point (KiB) | fixed (MiB) | peak increase (MiB) |",
        "|---|---:|---:|---:|---:|",
    )
    rows: dict[str, tuple[float, float, float | None]] = {}
    for which in ("atlas", "pyro"):
        model = build_memory_model(args, which)
        with torch.no_grad():
            x = model.flow().sample((n,)).detach().clone()
        full = saved_for_backward(model, x)
        half = saved_for_backward(model, x[: n // 2].clone())
        per_point = (full - half) / (n - n // 2)
        fixed = full - per_point * n
        child = run_child(args, which)
        if isinstance(child, str):
            peak, peak_text = None, child
        else:
            peak = child["cuda_bytes" if args.device == "cuda" else "rss_bytes"]
            peak_text = f"{peak / MIB:,.1f}"
            if args.device != "cuda" and child["rss_method"] != "VmHWM":
                peak_text += " (ru_maxrss increase)"
        label = f"atlas K={args.memory_charts}" if which == "atlas" else "Pyro"
        rows[which] = (full, per_point, peak)
        report.add(
            f"| {label} | {full / MIB:,.1f} | {per_point / 1024:,.1f} | {fixed / MIB:,.1f} | "
            f"{peak_text} |"
        )
        del model, x
        gc.collect()
    (fa, pa, ka), (fp, pp, kp) = rows["atlas"], rows["pyro"]
    report.add(
        f"| atlas / Pyro | {fmt_ratio(fa / fp)} | {fmt_ratio(pa / pp) if pp else 'n/a'} | | "
        f"{fmt_ratio(ka / kp) if ka is not None and kp else 'n/a'} |"
    )
    report.save()


def section_sphere(args: argparse.Namespace, report: Report) -> None:
    n = args.sphere_points
    atlas = sphere_atlas(args.sphere_layers, args.sphere_hidden).to(args.device)
    pyro_flow = PyroFlow(3, args.sphere_layers, args.sphere_hidden, args.device, spline_bins=8)
    cases = model_cases("atlas S^2 (2 charts)", atlas, n, ("log_prob",))
    cases += model_cases("Pyro R^3", pyro_flow, n, ("log_prob",))
    elapsed = run_timed(cases, args)
    report.add(
        "",
        f"## 4. S^2 (AtlasFlow.spheres, 2 charts, layers={args.sphere_layers}, hidden="
        f"{args.sphere_hidden}) vs Pyro on R^3 ({args.sphere_layers} x spline(8 bins) + "
        f"affine coupling + permutation): log_prob, no_grad. Speed only: different densities.",
        "",
        *TIME_HEADER,
    )
    for case in cases:
        report.add(case_row(case, cases[-1]))
    report.add("", f"section wall time {elapsed:.0f} s", *reduced_note(cases, args.repeats))
    report.save()


# ----------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--points", type=int, help="batch N (default 2048; 65536 on cuda)")
    parser.add_argument("--sphere-points", type=int, help="N3 (default 16384; 65536 on cuda)")
    parser.add_argument("--memory-points", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--slow-seconds", type=float, default=20.0)
    parser.add_argument("--slow-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument(
        "--operations",
        default=",".join(OPS),
        help="speed section operations, comma-separated (e.g. leave out log_prob+backward for "
        "a model whose training step does not fit in memory at N)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="benchmarks/atlas_scale.md (benchmarks/atlas_scale_quick.md with --quick)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke test")
    parser.add_argument("--dim", type=int, default=784, help="D")
    parser.add_argument("--latent", type=int, default=32, help="d")
    parser.add_argument("--charts", type=int, nargs="+", default=[4, 64, 256], help="K values")
    parser.add_argument("--memory-charts", type=int, default=64)
    parser.add_argument(
        "--perturb", type=float, default=0.01, help="sd of the chart perturbation (distinct)"
    )
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 256])
    parser.add_argument("--sphere-layers", type=int, default=4)
    parser.add_argument("--sphere-hidden", type=int, nargs="+", default=[64, 64])
    parser.add_argument("--child", choices=("atlas", "pyro"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.out is None:  # a smoke run leaves the committed results alone
        args.out = Path(
            "benchmarks/atlas_scale_quick.md" if args.quick else "benchmarks/atlas_scale.md"
        )
    if args.quick:
        args.dim, args.latent, args.charts, args.memory_charts = 32, 4, [4, 16], 16
        args.layers, args.hidden, args.sphere_layers, args.sphere_hidden = 2, [32, 32], 2, [16]
        args.points, args.sphere_points, args.memory_points, args.repeats = 64, 256, 64, 2
    cuda = args.device == "cuda"
    args.points = args.points or (65536 if cuda else 2048)
    args.sphere_points = args.sphere_points or (65536 if cuda else 16384)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    args.operations = [s.strip() for s in args.operations.split(",") if s.strip()]
    if set(args.operations) - set(OPS):
        parser.error(f"unknown operations {sorted(set(args.operations) - set(OPS))}; know {OPS}")
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    return args


def load_average() -> str:
    """The 1/5/15-minute load averages, or "n/a"."""
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def cpu_name() -> str:
    """The CPU model and the vector instructions torch's kernels use: the atlas/Pyro ratios
    depend on them (faster matrix products favour the MLP-heavy Pyro flow)."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{name}, torch CPU capability {torch.backends.cpu.get_cpu_capability()}"


def command_line() -> str:
    """This run's command line, with ``PYTHONPATH`` when set (it picks the atlasdist tree)."""
    words = [shlex.quote(w) for w in [sys.executable, *sys.argv]]
    env = os.environ.get("PYTHONPATH")
    return " ".join(([f"PYTHONPATH={shlex.quote(env)}"] if env else []) + words)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.distributions.Distribution.set_default_validate_args(False)
    torch.manual_seed(args.seed)
    if args.child:
        child_peak(args)
        return
    wall = time.perf_counter()
    report = Report(args.out)
    report.add(
        "# atlas vs Pyro at scale",
        "",
        f"command: `{command_line()}`",
        "",
        f"- torch {torch.__version__}, pyro {pyro.__version__}, python "
        f"{platform.python_version()}, atlasdist from {Path(atlasdist.__file__).parent}",
        f"- device {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else "")
        + f", CPU {cpu_name()}"
        + f", threads {torch.get_num_threads()} (of {os.cpu_count()} CPUs), seed {args.seed}, "
        f"load average at start {load_average()}",
        f"- D={args.dim}, d={args.latent}, m=2, K in {args.charts}, layers={args.layers}, "
        f"hidden={args.hidden}; N={args.points}; memory at N={args.memory_points} with "
        f"K={args.memory_charts}; sphere: layers={args.sphere_layers}, hidden="
        f"{args.sphere_hidden}, N3={args.sphere_points}",
        f"- repeats {args.repeats} after 1 warm-up round, median; cases whose warm-up call "
        f"took more than {args.slow_seconds:g} s get {args.slow_repeats} repeats; sections "
        f"{','.join(args.sections)}",
        "- every timed call builds its distribution (flow()); fresh input tensor every "
        "repeat; configurations interleaved round-robin; argument validation off",
        "- under no_grad (log_prob, sample) the atlas keeps its per-chart quantities between "
        "calls while its parameters are unchanged (atlasdist.transforms.cache); rows marked "
        "'cache off' recompute them in every call, as every call with gradients does",
    )
    if "speed" in args.sections or "bare" in args.sections:
        section_speed(args, report)
    if "distinct" in args.sections:
        section_distinct(args, report)
    if "memory" in args.sections:
        section_memory(args, report)
    if "sphere" in args.sections:
        section_sphere(args, report)
    report.add(
        "",
        f"total wall time {time.perf_counter() - wall:.0f} s, load average at the end "
        f"{load_average()} (other processes on the machine skew the times)",
    )
    report.save()


if __name__ == "__main__":
    main()
