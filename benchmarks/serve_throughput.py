"""Teacher serving throughput over HTTP: requests/s and latency with and without request batching.

    python benchmarks/serve_throughput.py                                   # SmolLM2-135M-Instruct, ~8 min
    python benchmarks/serve_throughput.py --quick --model tiny-random-llama # smoke run, ~1 min
    python benchmarks/serve_throughput.py --requests 96 --max-tokens 32 --clients 1,4,16 --max-batch-size 16

One process starts a local Ray (in-process) and Ray Serve on a free loopback port (never 8000), and
deploys the teacher twice, side by side, as `compeffdist serve teacher` deploys it
(`compeffdist_ray.serving.launch.start_app`: the transformers engine, one replica with the config's
CPUs, the bearer token):

- batched: app `bench-batched` at /batched, `serve.max_batch_size` = --max-batch-size (default: the
  config's, 8), `serve.batch_wait_timeout_s` = the config's (0.05 s);
- unbatched: app `bench-unbatched` at /unbatched, `serve.max_batch_size=1` (every request its own
  model call; `@serve.batch` still sits in the path but never waits).

Clients are an asyncio pool of --clients concurrent loops on one `httpx.AsyncClient`, each sending
its next request as soon as the last one is answered (closed loop), with
`Authorization: Bearer <token>` to POST <prefix>/v1/chat/completions. Every request is greedy
(temperature 0) with the same max_tokens; the prompts ask for a long answer and the warm-up keeps
only those whose greedy answer reaches max_tokens, so that every request generates the same number
of tokens in either mode. Only 200 answers count; anything else is reported as an error by status
or exception type (and the script exits 1).

Per client count, the two modes take turns for --rounds rounds (AB, BA, AB, ...), each round sending
a whole number of waves of `clients` requests, so that slow drift of the shared machine falls on
both alike. A cell's req/s and tokens/s (completion tokens) are its 200 answers over the summed wall
time of its rounds. p50/p99 are client-side latencies (send to full answer), pooled over the rounds,
leaving out each client's first request of a round: all clients start at once, so those first
requests queue behind each other in a ramp that the later, steady-state requests do not see. With
a few dozen latencies per cell, p99 is close to the slowest one. "mean batch" is the requests per
`@serve.batch` call the replica ran in that cell (from the deployment's `stats()`).

The replicas' torch threads get OMP_WAIT_POLICY=PASSIVE unless --omp-wait-policy says otherwise:
on a 2-core machine shared with other jobs, libgomp's default spin-waiting made a 2-thread decode
step of a batch of 8 take 3-9 s instead of ~0.3 s (measured while writing this), which would bury
the effect of batching under the scheduler's. The machine's load average and CPU pressure are
printed at the start, after each client count, and at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import pathlib
import secrets
import socket
import sys
import time
from dataclasses import dataclass, field

TOKEN_ENV = "COMPEFFDIST_SERVE_TOKEN"

# Prompts that invite an answer longer than max_tokens (the warm-up checks that each does).
TOPICS = ("a hotel stay", "a new phone", "a restaurant dinner", "a delayed train", "a concert", "a laptop",
          "an online course", "a pair of running shoes", "a coffee machine", "a city bus service",
          "a hair salon", "a streaming service", "a camping tent", "a dentist visit", "a bookshop", "a gym")
PROMPT = ("Write a detailed review of {topic}, about 150 words long, describing what you liked, what "
          "disappointed you and whether you would recommend it.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_pressure() -> str:
    """Linux PSI: the share of the last 60 s in which some runnable task waited for a CPU."""
    try:
        first = pathlib.Path("/proc/pressure/cpu").read_text().splitlines()[0]
        fields = dict(f.split("=") for f in first.split()[1:])
        return f"{float(fields['avg60']):.0f}%"
    except (OSError, IndexError, KeyError, ValueError):
        return "n/a"


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min, {os.cpu_count()} CPUs), " \
           f"CPU pressure {cpu_pressure()}"


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class Cell:
    """One (mode, clients) configuration, summed over its rounds."""

    mode: str
    clients: int
    wall: float = 0.0
    ok: int = 0  # 200 answers
    latencies: list[float] = field(default_factory=list)  # of 200 answers, each client's first of a round left out
    tokens: int = 0  # completion tokens of the 200 answers
    errors: dict[str, int] = field(default_factory=dict)
    batches: list[int] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.ok / self.wall if self.wall else float("nan")

    @property
    def tps(self) -> float:
        return self.tokens / self.wall if self.wall else float("nan")


def body_for(prompt: str, max_tokens: int) -> dict:
    return {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0}


async def one_round(client, url: str, clients: int, n: int, prompts: list[str], max_tokens: int, cell: Cell,
                    start_at: int) -> None:
    """n requests from `clients` closed-loop clients; results added to `cell`.

    All clients start at once, so their first requests queue behind each other (the n-th waits for
    n-1 others, unbatched): that ramp is not the steady state the later requests see, and their
    latencies are left out (they still count for requests/s and tokens/s).
    """
    next_i = iter(range(n))

    async def loop() -> None:
        first = True
        for i in next_i:  # one shared iterator: each request is taken by exactly one client
            body = body_for(prompts[(start_at + i) % len(prompts)], max_tokens)
            t0 = time.perf_counter()
            try:
                resp = await client.post(url, json=body)
            except Exception as exc:  # noqa: BLE001 - counted and reported, the run goes on
                key = type(exc).__name__
                cell.errors[key] = cell.errors.get(key, 0) + 1
                continue
            took = time.perf_counter() - t0
            if resp.status_code == 200:
                cell.ok += 1
                cell.tokens += resp.json()["usage"]["completion_tokens"]
                if not first:
                    cell.latencies.append(took)
                first = False
            else:
                key = f"HTTP {resp.status_code}"
                cell.errors[key] = cell.errors.get(key, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(clients)))
    cell.wall += time.perf_counter() - t0


async def batch_sizes(app: str) -> list[int]:
    """Requests per `@serve.batch` call so far, from the replica's own log (TeacherServer.stats)."""
    from ray import serve

    return (await serve.get_app_handle(app).stats.remote())["requests_per_batch"]


async def bench(args, apps: dict[str, str], token: str) -> tuple[list[Cell], list[str]]:
    import httpx

    limits = httpx.Limits(max_connections=max(args.clients) + 4, max_keepalive_connections=max(args.clients) + 4)
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits,
                                 headers={"Authorization": f"Bearer {token}"}) as client:
        # Warm-up: every prompt once, alone (keeps the prompts that reach max_tokens), then one full
        # batch's worth of concurrent requests per app, so that the batched shapes have run once too.
        candidates = [PROMPT.format(topic=t) for t in TOPICS]
        kept, prompt_tokens = [], []
        for p in candidates:
            resp = await client.post(apps["unbatched"], json=body_for(p, args.max_tokens))
            if resp.status_code != 200:
                sys.exit(f"warm-up request answered {resp.status_code}: {resp.text[:300]}")
            usage = resp.json()["usage"]
            if usage["completion_tokens"] >= args.max_tokens:
                kept.append(p)
                prompt_tokens.append(usage["prompt_tokens"])
        if not kept:
            print(f"WARNING: no prompt's greedy answer reaches {args.max_tokens} tokens; using all "
                  f"{len(candidates)} (tokens/s then differs per request)")
            kept = candidates
        print(f"warm-up: {len(kept)} of {len(candidates)} prompts answer with the full {args.max_tokens} tokens "
              f"greedily; those are sent (prompts of {min(prompt_tokens, default=0)}-{max(prompt_tokens, default=0)} "
              "tokens with the chat template)", flush=True)
        for name, url in apps.items():
            warm = Cell(name, args.max_batch_size)
            await one_round(client, url, args.max_batch_size, args.max_batch_size, kept, args.max_tokens, warm, 0)
            if warm.errors:
                sys.exit(f"warm-up batch to {name} failed: {warm.errors}")

        cells: list[Cell] = []
        loads = []
        flip = False
        for clients in args.clients:
            by_mode = {name: Cell(name, clients) for name in apps}
            n = args.requests or max(24, 4 * clients)
            # whole waves of `clients` requests, at least 2 (the first wave's latencies are left out)
            per_round = -(-max(n // args.rounds, 2 * clients) // clients) * clients
            for rnd in range(args.rounds):
                order = list(apps) if not flip else list(reversed(apps))
                flip = not flip
                sizes = {}
                for name in order:
                    before = len(await batch_sizes(f"bench-{name}"))
                    await one_round(client, apps[name], clients, per_round, kept, args.max_tokens, by_mode[name],
                                    rnd * per_round)
                    after = await batch_sizes(f"bench-{name}")
                    sizes[name] = after[before:] if len(after) > before else []
                    by_mode[name].batches.extend(sizes[name])
                print(f"  {clients:>2} clients, round {rnd + 1}/{args.rounds}: " + ", ".join(
                    f"{c.mode} {c.ok} ok, {c.rps:.2f} req/s so far" for c in by_mode.values())
                    + f"; batched app's batches this round: {sizes['batched']}", flush=True)
            cells.extend(by_mode.values())
            loads.append(f"after {clients} clients: {load_line()}")
            print(f"  {loads[-1]}", flush=True)
    return cells, loads


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="teacher alias, local dir or HF id")
    ap.add_argument("--requests", type=int, default=None,
                    help="requests per (mode, clients) cell, over all rounds; each round sends whole waves of "
                         "`clients` requests, at least 2 (default: max(24, 4 x clients); --quick: 16)")
    ap.add_argument("--max-tokens", type=int, default=None, help="max_tokens of every request (default 16; --quick: 8)")
    ap.add_argument("--clients", default="1,4,16", help="concurrent clients, comma-separated")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per cell; the modes alternate AB, BA, ...")
    ap.add_argument("--max-batch-size", type=int, default=None,
                    help="serve.max_batch_size of the batched app (default: the config's)")
    ap.add_argument("--config", default=None, help="pipeline config YAML (default: the embedded defaults)")
    ap.add_argument("--timeout", type=float, default=600.0, help="per-request client timeout, s")
    ap.add_argument("--omp-wait-policy", choices=("passive", "active", "inherit"), default="passive",
                    help="OMP_WAIT_POLICY for the Ray workers this run starts (the replicas' torch threads); "
                         "inherit = leave the environment as it is")
    ap.add_argument("--quick", action="store_true", help="fewer requests and tokens: a smoke run")
    args = ap.parse_args(argv)
    args.requests = args.requests or (16 if args.quick else None)
    args.max_tokens = args.max_tokens or (8 if args.quick else 16)
    args.clients = [int(c) for c in args.clients.split(",")]

    import ray
    from ray import serve

    from compeffdist_ray.config import load_config
    from compeffdist_ray.serving.auth import resolve_token
    from compeffdist_ray.serving.launch import check_port_free, start_app

    if not os.environ.get(TOKEN_ENV):
        os.environ[TOKEN_ENV] = "bench-" + secrets.token_urlsafe(24)  # this process and its Ray workers only
    port = free_port()
    base = [f"teacher.model={args.model}", "teacher.backend=transformers", "serve.host=127.0.0.1",
            f"serve.port={port}", f"serve.limits.max_tokens={max(args.max_tokens, 4096)}"]
    default_batch = load_config(args.config, base).serve.max_batch_size
    args.max_batch_size = args.max_batch_size or default_batch
    cfgs = {
        "batched": load_config(args.config, [*base, "serve.teacher_app_name=bench-batched",
                                             "serve.teacher_route_prefix=/batched",
                                             f"serve.max_batch_size={args.max_batch_size}"]),
        "unbatched": load_config(args.config, [*base, "serve.teacher_app_name=bench-unbatched",
                                               "serve.teacher_route_prefix=/unbatched", "serve.max_batch_size=1"]),
    }
    token = resolve_token(cfgs["batched"].serve.token_env, cfgs["batched"].serve.token_file)
    s = cfgs["batched"].serve
    start_load = load_line()
    print(f"model {args.model}; {args.max_tokens} new tokens per request, greedy; clients {args.clients}; "
          f"{args.requests or 'max(24, 4 x clients)'} requests per cell in {args.rounds} rounds; "
          f"batched: max_batch_size {args.max_batch_size}, batch_wait_timeout_s {s.batch_wait_timeout_s}; "
          f"unbatched: max_batch_size 1; one replica each, {s.num_cpus:g} CPU reserved; "
          f"Ray Serve on 127.0.0.1:{port}")
    print(f"start: {start_load}", flush=True)

    check_port_free("127.0.0.1", port)
    if args.omp_wait_policy != "inherit":  # before ray.init: the workers it starts inherit this environment
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
    policy = os.environ.get("OMP_WAIT_POLICY", "(unset: libgomp spins, then sleeps)")
    print(f"OMP_WAIT_POLICY for the replicas: {policy}")
    # Our own ray.init (so start_app finds Ray running): replica logs (one access line per request) stay
    # in Ray's log files instead of this output.
    ray.init(num_cpus=cfgs["batched"].ray.num_cpus, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False)
    t_start = time.perf_counter()
    try:
        apps = {}
        for name, cfg in cfgs.items():
            t0 = time.perf_counter()
            where = start_app("teacher", cfg, token)
            apps[name] = f"{where['url']}/v1/chat/completions"
            print(f"deployed {name} at {where['url']} in {time.perf_counter() - t0:.1f} s", flush=True)
        cells, loads = asyncio.run(bench(args, apps, token.value))
    finally:
        serve.shutdown()
        ray.shutdown()
    end_load = load_line()

    by = {(c.mode, c.clients): c for c in cells}
    print(f"\nmodel {args.model}, {args.max_tokens} tokens per request (greedy), batched max_batch_size "
          f"{args.max_batch_size} (wait {s.batch_wait_timeout_s} s) vs unbatched max_batch_size 1; "
          f"run {time.perf_counter() - t_start:.0f} s\n")
    print("| mode | clients | requests | errors | req/s | p50 s | p99 s | tokens/s | mean batch |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for clients in args.clients:
        for mode in ("batched", "unbatched"):
            c = by[(mode, clients)]
            errs = sum(c.errors.values())
            mean_batch = sum(c.batches) / len(c.batches) if c.batches else float("nan")
            print(f"| {mode} | {clients} | {c.ok} | {errs} | {c.rps:.2f} | {percentile(c.latencies, 50):.2f} | "
                  f"{percentile(c.latencies, 99):.2f} | {c.tps:.1f} | {mean_batch:.1f} |")
    print("\nbatched / unbatched:\n")
    print("| clients | req/s | p50 latency | p99 latency |")
    print("|---:|---:|---:|---:|")
    for clients in args.clients:
        b, u = by[("batched", clients)], by[("unbatched", clients)]
        p50 = percentile(b.latencies, 50) / percentile(u.latencies, 50)
        p99 = percentile(b.latencies, 99) / percentile(u.latencies, 99)
        print(f"| {clients} | {b.rps / u.rps:.2f}x | {p50:.2f}x | {p99:.2f}x |")
    errors = {f"{c.mode}/{c.clients}": c.errors for c in cells if c.errors}
    print(f"\nerrors: {errors or 'none'}")
    print(f"start: {start_load}")
    for line in loads:
        print(line)
    print(f"end: {end_load}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
