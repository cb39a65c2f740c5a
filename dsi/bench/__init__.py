"""``dsi bench``: measures non-SI, SI and DSI through the running system (emulated latencies with a
controlled-acceptance drafter, and the real models), next to the simulator's prediction and the
in-process HuggingFace baselines; prints a table and writes JSON and PNG figures."""

from dsi.bench.runner import BenchSettings, run_bench

__all__ = ["BenchSettings", "run_bench"]
