"""Graceful stop for TorchServe: answer every request already accepted, then stop.

TorchServe's own SIGTERM hook closes its ports and, at once, its worker connections: requests in
flight then get no answer (a connection reset). So the stop is done in two steps: first wait until
the server is idle, read from its own Prometheus counters (requests arrived, responses sent) that
have not moved for `quiet` seconds; then pass SIGTERM on to the Java frontend.

`wait_idle` is what `TorchServe.shutdown` (make serve, tests, benchmark) calls before `torchserve
--stop`; `main` is the container's PID 1 (docker/entrypoint.sh): it runs the Java frontend as its
child and drains on SIGTERM before forwarding it. Standard library only: the image runs this file
without the bundle's code.

    python drain.py --metrics URL [--quiet S] [--timeout S] -- java ... org.pytorch.serve.ModelServer ...
"""

import argparse
import signal
import subprocess
import sys
import time
import urllib.request

# Counters that move when a prediction request arrives or is answered (the latency counter grows with
# every answer, the error counts with every refusal). Requests2XX is left out: it counts the
# metrics endpoint's own answers, so polling would never look idle.
COUNTERS = ("ts_inference_requests_total", "ts_inference_latency_microseconds", "Requests4XX", "Requests5XX")
QUIET_S = 0.5  # idle = no request arrived and none was answered for this long (p99 is far below it)
TIMEOUT_S = 6.0  # drain at most this long: with the frontend's ~2 s stop, inside Cloud Run's 10 s grace
STOP_S = 30.0  # after the drain, how long the frontend may take to exit before it is killed


def counters(metrics_url: str, names: tuple[str, ...] = COUNTERS) -> dict[str, float] | None:
    """The Prometheus metrics of these names, each summed over its labels (absent: 0); None when the metrics
    endpoint does not answer."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    found = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in found:
            found[name] += float(line.rsplit(" ", 1)[1])
    return found


def activity(metrics_url: str) -> float | None:
    """The sum of the arrival and response counters; None when the metrics endpoint does not answer."""
    found = counters(metrics_url)
    return None if found is None else sum(found.values())


def wait_idle(metrics_url: str, quiet: float = QUIET_S, timeout: float = TIMEOUT_S, poll: float = 0.05) -> bool:
    """Block until the server has been idle for `quiet` seconds (True), or `timeout` passed (False).
    A server whose metrics do not answer has nothing left to drain (True)."""
    start = time.monotonic()
    last, since = activity(metrics_url), start
    while last is not None:
        if time.monotonic() - since >= quiet:
            return True
        if time.monotonic() - start >= timeout:
            return False
        time.sleep(poll)
        now = activity(metrics_url)
        if now != last:
            last, since = now, time.monotonic()
    return True


def log(message: str) -> None:
    print(f"drain: {message}", file=sys.stderr, flush=True)


def supervise(cmd: list[str], metrics_url: str, quiet: float, timeout: float) -> int:
    """Run `cmd`; on SIGTERM or SIGINT drain, then forward SIGTERM. Returns the exit code to exit with."""
    child = subprocess.Popen(cmd)
    signals: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: signals.append(signum))
    while child.poll() is None and not signals:
        time.sleep(0.05)
    if signals:
        begin = time.monotonic()
        drained = wait_idle(metrics_url, quiet, timeout)
        took = time.monotonic() - begin
        log(f"{'drained' if drained else 'still busy'} after {took:.1f} s; stopping the server")
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(STOP_S)
        except subprocess.TimeoutExpired:
            log(f"the server did not stop within {STOP_S:.0f} s: killed")
            child.kill()
            child.wait()
    code = child.returncode
    return 128 - code if code < 0 else code  # killed by signal N -> 128 + N, as a shell reports it


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--metrics", required=True, help="TorchServe's metrics URL (http://HOST:PORT/metrics)")
    parser.add_argument("--quiet", type=float, default=QUIET_S, help="seconds without traffic that count as idle")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="longest drain, seconds")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the server's command line")
    args = parser.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        parser.error("give the server's command after --")
    sys.exit(supervise(cmd, args.metrics, args.quiet, args.timeout))


if __name__ == "__main__":
    main()
