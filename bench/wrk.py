"""wrk, a load generator written in C (Debian's `wrk`, installed through common/apt.py): raw PNG POSTs to a
server, closed loop at a connection count or paced at a fixed arrival rate (open loop), with its own CPU share.

Paced runs approximate an open loop with many connections, each waiting an exponential interval before its
next request (Poisson arrivals at `rate` in all); while the server keeps up, the intervals are long compared
with the latency, so a slow answer delays no other arrival. The achieved rate is reported next to the target.
"""

import json
import os
import resource
import subprocess
import tempfile
import time
from pathlib import Path

from common import apt

# Runs inside wrk. Arguments after "--": the mean gap between one connection's requests in ms (0: closed
# loop), then the request bodies, sent in turn. done() runs in wrk's main Lua state, without init's
# arguments: it writes the summary to the JSON file named by $WRK_OUT.
SCRIPT = r"""
local gap, bodies, i = 0, {}, 0
function init(args)
  gap = tonumber(args[1])
  for k = 2, #args do
    local f = assert(io.open(args[k], "rb")); bodies[#bodies + 1] = f:read("*all"); f:close()
  end
  math.randomseed(os.time())
end
function request()
  i = i % #bodies + 1
  return wrk.format("POST", nil, nil, bodies[i])
end
function delay()
  if gap <= 0 then return 0 end
  return -gap * math.log(1 - math.random())
end
function done(summary, latency, requests)
  local e = summary.errors
  local f = assert(io.open(os.getenv("WRK_OUT"), "w"))
  f:write(string.format(
    '{"requests": %d, "duration_s": %f, "connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d, ' ..
    '"p50_ms": %f, "p90_ms": %f, "p99_ms": %f, "max_ms": %f, "mean_ms": %f}',
    summary.requests, summary.duration / 1e6, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50) / 1e3, latency:percentile(90) / 1e3, latency:percentile(99) / 1e3,
    latency.max / 1e3, latency.mean / 1e3))
  f:close()
end
"""


def binary() -> str:
    return apt.ensure({"wrk": "wrk"})["wrk"]


def version() -> str:
    done = subprocess.run([binary(), "-v"], capture_output=True, text=True)
    return (done.stdout + done.stderr).split()[1] if len((done.stdout + done.stderr).split()) > 1 else "?"


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(
    url: str, headers: dict[str, str], bodies: list[bytes], connections: int, seconds: float, rate: float = 0
) -> dict:
    """One wrk run: `connections` connections for `seconds`, closed loop, or paced at `rate` requests/s in all.
    Returns requests/s answered with 2xx/3xx, latency percentiles (ms, every answer), errors (no answer, or a
    status other than 2xx/3xx: a full queue's 503) and
    the CPU share wrk used (1.0 = one core)."""
    wrk = binary()
    with tempfile.TemporaryDirectory(prefix="wrk") as tmp:
        folder = Path(tmp)
        (folder / "post.lua").write_text(SCRIPT)
        files = []
        for k, body in enumerate(bodies):
            files.append(folder / f"{k}.png")
            files[-1].write_bytes(body)
        gap_ms = connections / rate * 1e3 if rate else 0
        cmd = [wrk, "-t", "1", "-c", str(connections), "-d", f"{seconds:g}s", "--timeout", "30s", "-s"]
        cmd += [str(folder / "post.lua")]
        for key, value in {"Content-Type": "image/png", **headers}.items():
            cmd += ["-H", f"{key}: {value}"]
        cmd += [url, "--", str(gap_ms), *map(str, files)]
        cpu, begin = children_cpu(), time.monotonic()
        env = dict(os.environ, WRK_OUT=str(folder / "out.json"))
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, env=env)
        wall, cpu = time.monotonic() - begin, children_cpu() - cpu
        if done.returncode != 0 or not (folder / "out.json").is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"wrk failed with code {done.returncode}: {tail[0]}")
        result = json.loads((folder / "out.json").read_text())
    errors = sum(result[k] for k in ("connect", "read", "write", "status", "timeout"))
    return {
        "connections": connections,
        "rate": rate,
        "requests": result["requests"],
        "rps": (result["requests"] - result["status"]) / result["duration_s"],  # answered with 2xx/3xx
        "errors": errors,
        **{k: result[k] for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms", "mean_ms")},
        "client_cpu": cpu / wall,
    }
