"""Recurrence benchmarks, each case in a child process with a time limit (a cuDNN call that
stalls must not eat the session): throughput of Elman, LSTM, GRU, minGRU and minLSTM against T as
ratios to the LSTM, the long-input pieces of the cuDNN layers under bf16, and peak memory of
truncated, full and checkpointed BPTT against T.

    python benchmarks/bench_recurrences.py --device cpu          # CPU sizes (make bench)
    python benchmarks/bench_recurrences.py --device cpu --compile  # min* loop, gates compiled or not
    python benchmarks/bench_recurrences.py --device cpu --linear_scan  # the loop's scan, chunked or not
    python benchmarks/bench_recurrences.py --device cuda --quick # GPU sizes (make gpu-bench)
    python benchmarks/bench_recurrences.py --device cuda --scan  # minGRU/minLSTM vs cuDNN LSTM
    python benchmarks/bench_recurrences.py --device cuda --goals  # issue 3's open goals (~2 min)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time


def _case(kind: str, args: dict, q) -> None:
    import torch

    from distrnn.bptt import run_window
    from distrnn.config import NetworkConfig, TaskSpec
    from distrnn.model import RecurrentModel

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    dev = torch.device(args.get("device", "cuda"))
    cuda = dev.type == "cuda"
    if not cuda:
        from distrnn.denormals import flush_denormals
        from distrnn.host_memory import keep_freed_memory

        # as `distrnn fit` runs on a CPU (DISTRNN_MALLOC=system, DISTRNN_DENORMALS=keep: as the CPU is)
        keep_freed_memory()
        flush_denormals()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def reset_peak():
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def peak_gib(base):
        # CUDA: the allocator's peak; CPU: the growth of this process's peak resident set
        if cuda:
            return (torch.cuda.max_memory_allocated() - base) / 2**30
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base) / 2**30
    B, T, H = args["B"], args["T"], args["H"]
    torch.manual_seed(0)
    if kind == "throughput":
        vocab = args.get("vocab")  # token inputs through an embedding, a classifier on top
        task = (TaskSpec(kind="classification", output_dim=vocab, vocab_size=vocab) if vocab
                else TaskSpec(kind="regression", output_dim=1, input_dim=H))
        options = {**args.get("options", {}), **{k: args[k] for k in ("backend", "parallel") if k in args}}
        network = NetworkConfig(recurrence=args["rec"], hidden_size=H, num_layers=args.get("layers", 1), options=options,
                                **({"embedding_dim": args["embedding_dim"]} if "embedding_dim" in args else {}))
        model = RecurrentModel(network, task).to(dev)
        if args.get("max_steps"):
            type(model.recurrence).cuda_max_steps = args["max_steps"]
        if args.get("scan_config"):  # the Triton scan with one configuration instead of the autotuned one
            from distrnn.kernels import min_scan

            min_scan.FIXED_CONFIG = tuple(args["scan_config"])
        # fused, as distrnn's trainer builds it (stop_on_nonfinite, on by default, skips on the device):
        # one kernel for every parameter. PyTorch's default (foreach) Adam was ~0.25 ms of the
        # 1.8 ms of device time of the minGRU step at T=512 on the H200, and a dozen launches more
        opt = torch.optim.Adam(model.parameters(), 1e-4, fused=dev.type in ("cuda", "cpu"))
        if vocab:
            x = torch.randint(0, vocab, (B, T), device=dev)
            y = torch.randint(0, vocab, (B, T), device=dev)
        else:
            x = torch.randn(B, T, H, device=dev)
            y = torch.randn(B, T, 1, device=dev)
        mask = torch.ones(B, T, dtype=torch.bool, device=dev)
        amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.get("bf16", False))
        reset = None
        if args.get("resets") is not None:  # documents in streams: rows reset at random steps (on the host, as the engine has them)
            g = torch.Generator().manual_seed(1)
            reset = torch.zeros(B, T, dtype=torch.bool)
            n = args["resets"]
            reset[torch.randint(0, B, (n,), generator=g), torch.randint(1, T, (n,), generator=g)] = True

        def step():
            with amp:
                r = run_window(model, task, x, y, mask, reset, None)
            opt.zero_grad(set_to_none=True)
            (r.loss_sum / (B * T)).backward()
            opt.step()

        base = reset_peak()
        step()
        step()  # the second call too: torch.compile may recompile once for the state's new strides
        sync()
        n = args.get("iters", 5)
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        sync()
        dt = (time.perf_counter() - t0) / n
        out = {"tokens_per_s": B * T / dt, "s_per_step": dt, "peak_gib": peak_gib(base)}
        if args.get("profile"):
            out["profile_top"] = _profile(step, cuda)
            out["host"] = _host_view(step, cuda)
        if cuda and args["rec"] in ("mingru", "minlstm") and not args.get("scan_config") and args.get("parallel", True):
            from distrnn.kernels.min_scan import tuned_configs

            out["scan_configs"] = tuned_configs()
        if cuda and args["rec"] in ("mingru", "minlstm"):  # the chunks of the time axis the kernel ran in
            z = torch.empty((), device=dev).expand(B, T, model.recurrence.gates * H)  # its shape and device
            out["kernel_split"] = model.recurrence._split(z)
        q.put(out)
    elif kind == "memory":
        task, model, x, y, mask = _loss_at_the_end(B, T, H, dev, args.get("rec", "lstm"))
        mask_host = mask.cpu()  # as the engine has it: the head runs where the loss is
        k = args["k"]
        mode = args["mode"]

        def step():
            if mode == "tbptt":
                state = None
                for a in range(0, T, k):
                    if not mask_host[:, a:a + k].any():  # the engine moves the state on without a backward
                        with torch.no_grad():
                            state = run_window(model, task, x[:, a:a + k], y[:, a:a + k], mask[:, a:a + k], None, state,
                                               mask_host=mask_host[:, a:a + k]).state
                        continue
                    r = run_window(model, task, x[:, a:a + k], y[:, a:a + k], mask[:, a:a + k], None, state,
                                   mask_host=mask_host[:, a:a + k])
                    r.loss_sum.backward()
                    state = tuple(s.detach() for s in r.state)
            else:
                r = run_window(model, task, x, y, mask, None, None, segment=k if mode == "checkpointed" else None,
                               mask_host=mask_host)
                r.loss_sum.backward()

        if cuda:
            step()
            sync()
        base = reset_peak()
        times = []
        for _ in range(args.get("iters", 3 if cuda else 1)):  # the median of 3 on a GPU: a time ratio is the goal
            t0 = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t0)
        q.put({"s_per_step": sorted(times)[len(times) // 2], "peak_gib": peak_gib(base)})
    elif kind == "checkpointing":
        # Side by side in one process, interleaved, medians: full BPTT, distrnn's checkpointed BPTT
        # (first pass without autograd) and the same segments under torch.utils.checkpoint
        # (non-reentrant: the first pass a training forward with its saved tensors dropped).
        from torch.utils.checkpoint import checkpoint

        from distrnn.bptt import _piece, loss_span

        task, model, x, y, mask = _loss_at_the_end(B, T, H, dev, args.get("rec", "lstm"))
        # the engine hands run_window the mask on the host: the head and the loss run only where
        # the loss is (here the last step), so segments before it carry the state alone
        mask_host = mask.cpu() if args.get("mask_host", True) else None
        k = args["k"]

        def torch_checkpoint():
            total, state = 0.0, None
            for a in range(0, T, k):
                span = loss_span(None if mask_host is None else mask_host[:, a:a + k])
                part, state = checkpoint(_piece, model, x[:, a:a + k], y[:, a:a + k], mask[:, a:a + k], None, state, task,
                                         span, use_reentrant=False)
                total = total + part
            total.backward()

        def overlapped():
            # distrnn's checkpointed BPTT with model.tbptt.overlap_recompute: each segment's
            # recomputation issued on a side stream before the backward of the segment after it,
            # so the two run at once (a cuDNN LSTM at B=64 is latency-bound step by step: one
            # recurrence leaves most SMs idle); two segments' activations live at once
            run_window(model, task, x, y, mask, None, None, segment=k, mask_host=mask_host, overlap=True).loss_sum.backward()

        cases = {
            "full": lambda: run_window(model, task, x, y, mask, None, None, mask_host=mask_host).loss_sum.backward(),
            "distrnn_checkpointed": lambda: run_window(model, task, x, y, mask, None, None, segment=k,
                                                       mask_host=mask_host).loss_sum.backward(),
            "torch_checkpoint": torch_checkpoint,
        }
        if args.get("overlap"):
            cases["overlapped"] = overlapped
            # the overlapped gradients against full BPTT's (on a GPU: the side streams' ordering
            # checked), and each scheme's peak memory above what is allocated before its step
            grads, peaks = {}, {}
            for name in ("full", "distrnn_checkpointed", "overlapped"):
                model.zero_grad(set_to_none=True)
                sync()
                base = reset_peak()
                cases[name]()
                sync()
                peaks[name] = peak_gib(base)
                grads[name] = [p.grad.detach().clone() for p in model.parameters()]
            model.zero_grad(set_to_none=True)
        times = {name: [] for name in cases}
        for rnd in range(args.get("rounds", 4) + 1):
            for name, fn in cases.items():
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                if rnd:  # the first round warms up
                    times[name].append(time.perf_counter() - t0)
        med = {name: sorted(v)[len(v) // 2] for name, v in times.items()}
        out = {**{f"{n}_s": round(v, 4) for n, v in med.items()},
               "distrnn_checkpointed_over_full": round(med["distrnn_checkpointed"] / med["full"], 3),
               "torch_checkpoint_over_full": round(med["torch_checkpoint"] / med["full"], 3)}
        if "overlapped" in med:
            out["overlapped_over_full"] = round(med["overlapped"] / med["full"], 3)
            out["overlapped_max_grad_diff"] = max(float((a - b).abs().max() / (1 + b.abs().max()))
                                                  for a, b in zip(grads["overlapped"], grads["full"]))
            out["peak_gib"] = {n: round(v, 3) for n, v in peaks.items()}
            out["overlapped_memory_of_full"] = round(peaks["overlapped"] / max(peaks["full"], 1e-9), 3)
        if args.get("profile"):
            # device time against the step's wall time: whether cutting T into segments leaves the
            # GPU waiting on the host (each segment's calls, twice) or adds device work
            for name in ("full", "distrnn_checkpointed"):
                out[f"profile_{name}"] = _profile(cases[name], cuda, steps=1, top=8)
                out[f"host_{name}"] = _host_view(cases[name], cuda)
        q.put(out)
    elif kind == "micro_batches":
        # the engine's full BPTT over B rows at once or in groups of `micro` rows
        # (model.tbptt.micro_batch_size): peak memory and time per update. The peak counts AdamW's
        # state, and on CUDA the weights too (fit moves them there): the same in every case
        import lightning as L

        from distrnn.config import OptimizerConfig, TBPTTConfig
        from distrnn.data.loaders import TensorLoader
        from distrnn.engine import TBPTTModule

        rec, updates = args.get("rec", "lstm"), args.get("iters", 3)
        task = TaskSpec(kind="regression", output_dim=1, input_dim=64, seq_len=T)
        module = TBPTTModule(NetworkConfig(recurrence=rec, hidden_size=H), TBPTTConfig(mode="full", k1=T, micro_batch_size=args.get("micro")),
                             OptimizerConfig(name="adamw", lr=1e-4), task)
        g = torch.Generator().manual_seed(0)
        loader = TensorLoader({"x": torch.randn(B, T, 64, generator=g), "y": torch.randn(B, T, 1, generator=g)}, B)

        class Data(L.LightningDataModule):
            def train_dataloader(self):
                return loader

        marks = []

        class Marks(L.Callback):
            def on_train_batch_end(self, *a):
                sync()
                marks.append(time.perf_counter())

        trainer = L.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, max_steps=1 + updates, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[Marks()], max_epochs=-1)
        base = reset_peak()
        trainer.fit(module, Data())
        per_update = (marks[-1] - marks[0]) / updates  # the first update warms up
        q.put({"s_per_update": round(per_update, 4), "peak_gib": peak_gib(base)})
    elif kind == "split":
        # Where checkpointed BPTT's extra time goes: the first pass of a checkpointed segment is a
        # forward in grad mode (torch.utils.checkpoint, non-reentrant: cuDNN's training forward,
        # reserve space written), the recomputation another; a no-grad first pass would be cuDNN's
        # inference forward. Times of one segment: forward no-grad, forward with grad, backward.
        _, model, x, _, _ = _loss_at_the_end(B, T, H, dev, args.get("rec", "lstm"))
        n = args.get("iters", 20)

        def timed(fn):
            fn()
            sync()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            sync()
            return (time.perf_counter() - t0) / n

        def fwd_grad():
            return model(x, None)[0].sum()

        with torch.no_grad():
            t_infer = timed(lambda: model(x, None))
            # what a loss-free segment's first pass runs: the final state alone (the min* layers'
            # kernel then writes no states for the last layer)
            t_final = timed(lambda: model.hidden(x, None, outputs=False))
        t_train = timed(fwd_grad)
        t_both = timed(lambda: fwd_grad().backward())
        q.put({"forward_no_grad_s": t_infer, "final_state_only_s": t_final, "forward_grad_s": t_train,
               "backward_s": t_both - t_train,
               "recompute_bound": (2 * t_train + (t_both - t_train)) / t_both,
               "no_grad_first_pass_bound": (t_infer + t_both) / t_both,
               "final_state_first_pass_bound": (t_final + t_both) / t_both})
    elif kind == "linear_scan":
        # the CPU loop's scan (forward order, and backwards in time as its backward runs it) in
        # chunks as distrnn chooses against every step alone, interleaved
        from distrnn.scan import _scan_into

        a, b, h0 = torch.rand(B, T, H), torch.randn(B, T, H), torch.randn(B, H)
        out = torch.empty_like(b)
        times = {(chunk, reverse): [] for chunk in (None, T) for reverse in (False, True)}
        for _ in range(args.get("repeats", 5) + 1):
            for (chunk, reverse), ts in times.items():
                t0 = time.perf_counter()
                _scan_into(a, b, h0, out, reverse, chunk)
                ts.append(time.perf_counter() - t0)
        med = {key: sorted(ts[1:])[(len(ts) - 1) // 2] for key, ts in times.items()}  # the first call warms up
        q.put({f"{'chunked' if chunk is None else 'step_alone'}_{'backward' if reverse else 'forward'}_ms": round(t * 1e3, 3)
               for (chunk, reverse), t in med.items()}
              | {"forward_ratio": med[(T, False)] / med[(None, False)], "backward_ratio": med[(T, True)] / med[(None, True)]})


def _loss_at_the_end(B: int, T: int, H: int, dev, rec: str = "lstm"):
    """The memory cases' task: an LSTM (or ``rec``) over 64 input features, a loss at the last step only."""
    import torch

    from distrnn.config import NetworkConfig, TaskSpec
    from distrnn.model import RecurrentModel

    task = TaskSpec(kind="regression", output_dim=1, input_dim=64)
    model = RecurrentModel(NetworkConfig(recurrence=rec, hidden_size=H), task).to(dev)
    x = torch.randn(B, T, 64, device=dev)
    y = torch.randn(B, T, 1, device=dev)
    mask = torch.zeros(B, T, dtype=torch.bool, device=dev)
    mask[:, -1] = True
    return task, model, x, y, mask


def _profile(step, cuda: bool, steps: int = 2, top: int = 12) -> list:
    """Where one step's time goes: the ``top`` operators by their own device time (CPU time on
    a CPU), in ms per step, with their share of the step's total; the leading entry is the total."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()

    def own(e):  # microseconds of the operator itself, summed over its calls
        return (getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)) if cuda else e.self_cpu_time_total

    events = sorted(prof.key_averages(), key=own, reverse=True)
    # On a GPU a kernel's time is listed twice, under the kernel and under the operator that
    # launched it (the H200 rows of 2026-12-04 summed both: twice the device time): the total is
    # the kernels' alone.
    kernels = [e for e in events if cuda and str(getattr(e, "device_type", "")).endswith("CUDA")]
    total = sum(own(e) for e in (kernels or events)) or 1.0
    rows = [["total", round(total / steps / 1e3, 3), 1.0]]
    rows += [[e.key[:60], round(own(e) / steps / 1e3, 3), round(own(e) / total, 3)] for e in events[:top] if own(e) > 0]
    return rows


def _host_view(step, cuda: bool, steps: int = 3) -> dict:
    """Whether a step waits on the GPU: the host's time to issue it (the call returns) against
    its time to complete (after a synchronize), medians of ``steps``, and the calls that make the
    host wait for the device, as PyTorch's sync debug mode reports them (each with the innermost
    distrnn or benchmark frame that made it). issue ~ total with no syncs: the host is the bound;
    issue << total: the GPU is."""
    if not cuda:
        return {}
    try:
        return _host_view_cuda(step, steps)
    except Exception as e:  # a diagnostic: it must not cost the case its timings
        return {"error": repr(e)[:300]}


def _host_view_cuda(step, steps: int) -> dict:
    import traceback
    import warnings

    import torch

    issue, total = [], []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        issue.append(t1 - t0)
        total.append(time.perf_counter() - t0)
    where: dict[str, int] = {}

    def note(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "distrnn" in f.filename or "bench_" in f.filename]
        key = f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno} {frames[-1].line}" if frames else str(message)[:80]
        where[key] = where.get(key, 0) + 1

    torch.cuda.synchronize()
    shown = warnings.showwarning
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = note
            step()
    finally:
        warnings.showwarning = shown
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    med = lambda v: round(sorted(v)[len(v) // 2], 5)  # noqa: E731
    return {"issue_s": med(issue), "total_s": med(total), "syncs_per_step": sum(where.values()), "sync_sites": where}


def run(kind: str, limit: float, **args) -> dict:
    q = mp.get_context("spawn").Queue()
    p = mp.get_context("spawn").Process(target=_case, args=(kind, args, q))
    t0 = time.perf_counter()
    p.start()
    p.join(limit)
    if p.is_alive():
        p.kill()
        p.join()
        return {"error": f"did not finish in {limit:.0f} s", **args}
    if p.exitcode != 0:
        return {"error": f"exit code {p.exitcode}", **args}
    out = q.get()
    out.update(args, wall_s=round(time.perf_counter() - t0, 1))
    return out


def ratios(results: list[dict]) -> None:
    """Throughput as a ratio to the LSTM at the same T in the same precision, and the autotuned
    Triton scan against the kernel configuration measured before it."""
    for bf16 in (False, True):
        lstm = {r["T"]: r["tokens_per_s"] for r in results  # (not the cases with resets: their own rows say it)
                if r.get("rec") == "lstm" and "tokens_per_s" in r and bool(r.get("bf16")) == bf16 and not r.get("resets")}
        rows = [r for r in results if "tokens_per_s" in r and r.get("T") in lstm and bool(r.get("bf16")) == bf16]
        if rows:
            print(f"\nthroughput / LSTM at the same T ({'bf16 autocast' if bf16 else 'fp32/TF32'}):")
        for r in rows:
            print(f"  {r['label']:<48} {r['tokens_per_s']:>12,.0f} tokens/s  {r['tokens_per_s'] / lstm[r['T']]:.2f}x")
    tuned = {(r["rec"], r["T"], bool(r.get("bf16"))): r["tokens_per_s"] for r in results
             if "tokens_per_s" in r and r.get("rec") in ("mingru", "minlstm") and not r.get("scan_config") and r.get("parallel", True)}
    loops = {(r["rec"], r["T"], bool(r.get("bf16"))): r["tokens_per_s"] for r in results
             if "tokens_per_s" in r and r.get("parallel") is False and r.get("layers", 1) == 1}
    for r in results:
        key = (r.get("rec"), r.get("T"), bool(r.get("bf16")))
        if key in loops and r.get("parallel", True) and not r.get("scan_config") and r.get("layers", 1) == 1 and "tokens_per_s" in r:
            print(f"\nparallel / its own sequential loop, {key}: {r['tokens_per_s'] / loops[key]:.1f}x")
        loop = next((o for o in results if o.get("label") == r.get("label", "").replace("backend compile", "backend loop")
                     and "tokens_per_s" in o), None)
        if r.get("backend") == "compile" and "tokens_per_s" in r and loop and loop is not r:
            print(f"\n{r['label']} / the loop's: {r['tokens_per_s'] / loop['tokens_per_s']:.2f}x")
        if "forward_ratio" in r:
            print(f"\n{r['label']}: chunked / every step alone, forward {r['forward_ratio']:.2f}x, backward {r['backward_ratio']:.2f}x")
        if r.get("scan_config") and "tokens_per_s" in r and key in tuned:
            print(f"\nautotuned Triton scan / configuration {tuple(r['scan_config'])}, {key}: {tuned[key] / r['tokens_per_s']:.2f}x")


def sweep_cpu(show) -> None:
    B, H = 8, 128
    for T in (256, 1024, 4096, 16384):
        # the min* layers by their CPU default (the loop with its hand-written backward), with the
        # loop's gates compiled, and by the log-space scan
        for rec, extra in (("lstm", {}), ("gru", {}), ("elman", {}), ("mingru", {"backend": "loop"}),
                           ("mingru", {"backend": "compile"}), ("mingru", {"backend": "eager"}), ("minlstm", {"backend": "loop"}),
                           ("minlstm", {"backend": "compile"}), ("minlstm", {"backend": "eager"})):
            show(run("throughput", 120, device="cpu", rec=rec, B=B, T=T, H=H, iters=2 if T < 16384 else 1,
                     label=f"{rec}{' ' + extra['backend'] if extra else ''} T={T}", **extra))
    for T in (1024, 4096, 16384):
        for mode in ("tbptt", "full", "checkpointed"):
            show(run("memory", 120, device="cpu", mode=mode, B=8, T=T, H=128, k=256, label=f"memory {mode} T={T}"))
    show(run("checkpointing", 300, device="cpu", B=16, T=4096, H=512, k=256, label="checkpointed vs full, side by side, T=4096"))
    _micro_batches(show, "cpu", B=16, T=2048, H=256)
    _resets(show, "cpu", B=32, T=256, H=256)
    _cpu_compile(show)
    _linear_scan(show)


def _linear_scan(show) -> None:
    """The CPU loop's scan, ``h_t = a_t h_{t-1} + b_t``, in chunks against every step alone, over
    batch and width (the chunks pay where one step's B x H numbers are few) and T."""
    for H in (128, 512):
        for B in (1, 16, 64):
            for T in (256, 1024, 4096):
                show(run("linear_scan", 120, device="cpu", B=B, T=T, H=H, label=f"linear scan B={B} T={T} H={H}"))


def _cpu_compile(show) -> None:
    """The min* layers on a CPU with the loop's gates compiled (``backend: compile``) against the
    loop alone, side by side: the selective-copy model at a quarter of its batch, one wide layer,
    and a 2-layer minLSTM (the compilation happens in the warm-up steps, outside the timing)."""
    sc = dict(layers=3, vocab=18, embedding_dim=64, options={"norm": True, "residual": True, "chrono": 4096})
    for label, kw in (("the selective-copy model B=16 T=4096 H=128", dict(rec="mingru", B=16, T=4096, H=128, **sc)),
                      ("minGRU B=8 T=512 H=1024", dict(rec="mingru", B=8, T=512, H=1024)),
                      ("minLSTM 2 layers B=32 T=1024 H=128", dict(rec="minlstm", B=32, T=1024, H=128, layers=2))):
        for backend in ("loop", "compile"):
            show(run("throughput", 300, device="cpu", iters=3, backend=backend, label=f"{label}, backend {backend}", **kw))


def _micro_batches(show, device: str, B: int, T: int, H: int) -> None:
    """Full BPTT through the engine with the batch at once and in groups of B/4 and B/16 rows
    (model.tbptt.micro_batch_size): the same update at a fraction of the activations' memory."""
    for micro in (None, B // 4, B // 16):
        show(run("micro_batches", 300, device=device, B=B, T=T, H=H, micro=micro,
                 label=f"engine full BPTT B={B} T={T} H={H}, micro_batch_size {micro}"))


def _resets(show, device: str, B: int, T: int, H: int) -> None:
    """Rows that reset at random steps inside a window (a stream of short documents): cuDNN's
    layers run the window in pieces cut at those steps, the min* layers' scan takes the resets."""
    for rec in ("lstm", "mingru"):
        for n in (0, 16, 64):
            show(run("throughput", 300, device=device, rec=rec, B=B, T=T, H=H, layers=2, iters=3, resets=n,
                     label=f"{rec} 2 layers B={B} T={T} H={H}, {n} resets"))


def _mingru_checkpointed(show) -> None:
    # the goal names no layer: minGRU's forward (one GEMM and the scan) was expected to cost one
    # more forward, ~1.4x; the H200 measured 2.0x (2026-12-04), hence the profile and the split.
    # Most telling first (a device call may end early): side by side with the profiles and the
    # host's view (issue time against completion, synchronizing calls), then one segment's split
    # (its bound, with the first pass writing the final state alone), then the memory
    show(run("checkpointing", 100, rec="mingru", B=64, T=16384, H=1024, k=1024, rounds=3, profile=True, overlap=True,
             label="mingru checkpointed vs full, side by side, B=64 H=1024 T=16384 k=1024"))
    show(run("split", 60, rec="mingru", B=64, T=1024, H=1024, label="mingru segment split B=64 H=1024 T=1024"))
    # the LSTM (1.39x at 9.8% with k=1024, session 30) with each recomputation on a side stream,
    # beside the backward of the segment after it: two segments' activations, so k=512 for <= 10%
    for k in (512, 1024):
        show(run("checkpointing", 150, rec="lstm", B=64, T=16384, H=1024, k=k, rounds=3, overlap=True,
                 label=f"lstm checkpointed, recomputation overlapped, B=64 H=1024 T=16384 k={k}"))
    for mode in ("full", "checkpointed"):
        show(run("memory", 60, rec="mingru", mode=mode, B=64, T=16384, H=1024, k=1024,
                 label=f"memory mingru {mode} B=64 H=1024 T=16384 k=1024"))
    # as measured on 2026-12-04: the head and the loss over every step of every segment (session
    # 33 runs them only where the loss is, about half of a loss-free segment's calls)
    show(run("checkpointing", 100, rec="mingru", B=64, T=16384, H=1024, k=1024, rounds=3, mask_host=False,
             label="mingru checkpointed vs full, head everywhere (before session 33)"))


def _splits(show) -> None:
    """The Triton kernel with the time axis in chunks (``kernel_split: auto``) against one program
    per (row, block of units) walking the whole sequence, where B x H gives the GPU few programs:
    the kernel alone, the selective-copy model (~46% of its device time in the scans, 2026-12-05),
    and a few long rows."""
    sc = dict(layers=3, vocab=18, embedding_dim=64, options={"norm": True, "residual": True, "chrono": 4096})
    # the kernel alone profiled: each pass's device time (the chunks' maps, the join, the scans)
    for label, kw in (("one minGRU layer B=64 H=128 T=4096", dict(B=64, T=4096, H=128, profile=True)),
                      ("the selective-copy model (3-layer minGRU H=128, norm+residual) T=4096", dict(B=64, T=4096, H=128, **sc)),
                      ("one minGRU layer B=4 H=256 T=16384", dict(B=4, T=16384, H=256))):
        for split in (1, "auto"):
            options = {**kw.get("options", {}), "kernel_split": split}
            show(run("throughput", 90, rec="mingru", iters=10, **{**kw, "options": options},
                     label=f"{label}, kernel_split {split}"))


def _goals(show, B: int, H: int) -> None:
    """Issue 3's goals still open after the H200 run of 2026-12-04, in about two minutes."""
    # >= 100x its own loop at T=512: in fp32/TF32 (64x on the H200, the loop host-bound), and the
    # same pair in bf16 autocast, the precision the >= 10x LSTM goal was met in
    for bf16 in (False, True):
        p = "bf16" if bf16 else "fp32"
        show(run("throughput", 90, rec="mingru", B=B, T=512, H=H, iters=1, parallel=False, bf16=bf16,
                 label=f"mingru sequential {p} T=512"))
        # profiled after the timing: device time against s_per_step says what the host costs
        show(run("throughput", 90, rec="mingru", B=B, T=512, H=H, iters=10, bf16=bf16, profile=True,
                 label=f"mingru triton {p} T=512"))
    _mingru_checkpointed(show)
    # where the selective-copy run's ~19 ms per update go (52 updates/s for 262k tokens of a
    # 3-layer H=128 stack, against 12.5 ms for the same tokens through one H=1024 layer): its
    # model (18 tokens, embedding 64) without Lightning, the data or validation
    show(run("throughput", 90, rec="mingru", B=B, T=4096, H=128, layers=3, iters=5, profile=True, vocab=18,
             embedding_dim=64, options={"norm": True, "residual": True, "chrono": 4096},
             label="the selective-copy model (3-layer minGRU H=128, norm+residual) T=4096"))
    # twice as wide learns it in about half the updates (T=256 on CPU): what that costs per update here
    show(run("throughput", 90, rec="mingru", B=B, T=4096, H=256, layers=3, iters=5, vocab=18, embedding_dim=64,
             options={"norm": True, "residual": True, "chrono": 4096},
             label="the selective-copy model at H=256 T=4096"))


def sweep_gpu(show, a) -> None:
    B, H = 64, 1024
    if a.scan:
        # the default backend of the min* layers on CUDA is the fused Triton kernel
        show(run("throughput", 90, rec="lstm", B=B, T=4096, H=H, iters=3, label="lstm T=4096"))
        show(run("throughput", 90, rec="lstm", B=B, T=4096, H=H, iters=3, bf16=True, label="lstm bf16 T=4096"))
        show(run("throughput", 90, rec="mingru", B=B, T=4096, H=H, iters=5, label="mingru triton T=4096"))
        # with a breakdown by operator: what stands between it and 10x the LSTM in bf16
        show(run("throughput", 90, rec="mingru", B=B, T=4096, H=H, iters=5, bf16=True, profile=True,
                 label="mingru triton bf16 T=4096"))
        # side by side: the kernel configuration measured before the autotuner (2026-11-26)
        from distrnn.kernels.min_scan import CONFIGS

        show(run("throughput", 90, rec="mingru", B=B, T=4096, H=H, iters=5, bf16=True, scan_config=CONFIGS[0],
                 label="mingru triton bf16 T=4096 previous kernel config"))
        show(run("throughput", 90, rec="minlstm", B=B, T=4096, H=H, iters=5, label="minlstm triton T=4096"))
        show(run("throughput", 90, rec="mingru", B=B, T=16384, H=H, iters=3, label="mingru triton T=16384"))
        show(run("throughput", 90, rec="mingru", B=B, T=512, H=H, iters=1, parallel=False, label="mingru sequential T=512"))
        show(run("throughput", 90, rec="mingru", B=B, T=512, H=H, iters=10, label="mingru triton T=512"))
        return
    if a.memory_only:
        for mode in ("full", "checkpointed"):
            show(run("memory", 120, mode=mode, B=16, T=16384, H=512, k=256, label=f"memory {mode} T=16384"))
        # longer segments: fewer, longer cuDNN calls, more activations held (T/k states + k steps)
        show(run("memory", 120, mode="checkpointed", B=16, T=16384, H=512, k=1024, label="memory checkpointed k=1024 T=16384"))
        show(run("checkpointing", 90, B=16, T=16384, H=512, k=256, rounds=3, label="checkpointed vs full, side by side, T=16384"))
        show(run("split", 60, B=16, T=256, H=512, label="lstm segment split T=256"))
        # the scan benchmark's size, where the backward weighs more against the forward (on an
        # H200: recompute bound 1.38x against 1.52x at B=16, H=512)
        show(run("split", 60, B=64, T=256, H=1024, label="lstm segment split B=64 H=1024 T=256"))
        for k in (256, 1024):
            show(run("checkpointing", 100, B=64, T=16384, H=1024, k=k, rounds=3,
                     label=f"checkpointed vs full, side by side, B=64 H=1024 T=16384 k={k}"))
        _mingru_checkpointed(show)
        return
    if a.goals:
        _goals(show, B, H)
        return
    if a.micro_batches:
        _micro_batches(show, "cuda", B=B, T=4096, H=H)
        return
    if a.split or a.mingru_checkpointed:  # either or both, the open goal first
        if a.mingru_checkpointed:
            _mingru_checkpointed(show)
        if a.split:
            _splits(show)  # ~1-2 min: six cases, each process tuning the kernel for its shapes
        return
    if a.resets:
        _resets(show, "cuda", B=B, T=1024, H=H)
        return
    # cuDNN LSTM bf16 at T=4096: distrnn's layer in pieces of 2048 steps, then in one call
    show(run("throughput", 120, rec="lstm", B=B, T=2048, H=H, bf16=True, iters=3, label="lstm bf16 T=2048 one call"))
    show(run("throughput", 120, rec="lstm", B=B, T=4096, H=H, bf16=True, iters=3, label="lstm bf16 T=4096 in pieces"))
    Ts = [256, 4096] if a.quick else [256, 1024, 4096, 16384]
    for T in Ts:
        recs = ("lstm", "gru", "elman", "mingru", "minlstm")
        for rec in recs:
            show(run("throughput", 150, rec=rec, B=B, T=T, H=H, iters=3 if T < 16384 else 1, label=f"{rec} fp32/tf32 T={T}"))
    for T in ([4096, 16384] if a.quick else [1024, 4096, 16384]):
        for mode in ("tbptt", "full", "checkpointed"):
            show(run("memory", 120, mode=mode, B=16, T=T, H=512, k=256, label=f"memory {mode} T={T}"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--memory_only", action="store_true")
    ap.add_argument("--scan", action="store_true", help="minGRU/minLSTM against cuDNN LSTM")
    ap.add_argument("--goals", action="store_true", help="issue 3's open goals: minGRU vs its loop at T=512 (fp32, bf16),"
                    " minGRU checkpointed vs full BPTT, and a profile of the selective-copy stack")
    ap.add_argument("--mingru_checkpointed", action="store_true",
                    help="of the goals, minGRU checkpointed vs full BPTT alone (~1 min), profiled, with its segment split")
    ap.add_argument("--split", action="store_true",
                    help="minGRU's Triton kernel with the time axis in chunks (kernel_split auto) against one chunk, at small B x H")
    ap.add_argument("--resets", action="store_true",
                    help="2-layer LSTM and minGRU with rows resetting at 0, 16, 64 random steps of a window (cut vs in the scan)")
    ap.add_argument("--compile", action="store_true",
                    help="(--device cpu) the min* layers' loop with its gates compiled against the loop alone, side by side")
    ap.add_argument("--linear_scan", action="store_true",
                    help="(--device cpu) the min* loop's scan in chunks against every step alone, side by side")
    ap.add_argument("--micro_batches", action="store_true",
                    help="the engine's full BPTT with the batch at once and in groups of rows (model.tbptt.micro_batch_size)")
    a = ap.parse_args()
    results = []

    def show(r):
        results.append(r)
        print(json.dumps(r), flush=True)

    if a.device == "cpu" and a.resets:
        _resets(show, "cpu", B=32, T=256, H=256)
    elif a.device == "cpu" and a.linear_scan:
        _linear_scan(show)
    elif a.device == "cpu" and a.compile:
        _cpu_compile(show)
    elif a.device == "cpu":
        sweep_cpu(show)
    else:
        sweep_gpu(show, a)
    ratios(results)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
