"""Hardware catalog: what one accelerator can hold and move, and the links between them.

Every number is the vendor's *peak* (dense, no sparsity) with its source; what
real kernels achieve is a separate, calibrated fraction (`Efficiency`, see
calibration.py and docs/planner.md), so a datasheet update never silently
changes the calibration.  Users add hardware with a YAML file (`load_yaml`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from raypp.errors import UserError

GB = 1e9
T = 1e12


@dataclass(frozen=True)
class Link:
    """One hop between devices.  `bandwidth` is bytes/s per direction per device
    (what a ring all-reduce can push); `latency` is the fixed cost of one send or
    of a collective between two ranks (NCCL launch + protocol), in seconds; a ring
    of n ranks pays it n-1 times, an NVSwitch one-shot all-reduce once (perf.py)."""
    name: str
    kind: str  # "nvlink" | "pcie" | "network" | "loopback"
    bandwidth: float
    latency: float
    source: str


@dataclass(frozen=True)
class Efficiency:
    """Fractions of peak that real serving kernels reach, the shape of their rooflines, and the
    fixed costs of the serving loop and runtime around them.

    GPU defaults are `calibration.fit()` over the 23 published measurements of
    `measurements.CALIBRATION` (bw capped at 0.90: STREAM-like kernels reach ~90%
    of HBM peak, and above that the fit only trades bandwidth against the decode
    overhead).  `raypp calibrate` fits them to a live deployment instead."""
    bw: float = 0.90              # weight/KV streaming vs HBM peak (decode GEMV, paged attention)
    flops16: float = 0.64         # large bf16/fp16 GEMMs (prefill) vs dense tensor peak
    flops8: float = 0.52          # large fp8 GEMMs vs dense fp8 peak
    link: float = 0.60            # NCCL bus bandwidth vs link peak
    layer_overhead_prefill: float = 180e-6   # s per layer per forward: launches, norms, rope, sync
    layer_overhead_decode: float = 60e-6     # s per layer per step (CUDA graphs make this smaller)
    step_overhead: float = 1e-3              # s per decode step: scheduling, input preparation, sampling
    # Share of the shorter of (weight/KV streaming, FLOPs) a kernel hides behind the longer: 1 is the
    # roofline's max() (GPU kernels overlap loads with tensor-core math; the fit keeps 1), 0 their sum
    # (a CPU GEMM at decode batch sizes stalls its FMAs on the weight stream: T(b) = weights + b x FLOPs).
    overlap: float = 1.0
    # Extra passes over a linear layer's weights when a forward multiplies more than one row: a CPU
    # sgemm copies weight panels into its packed layout on every call (read + write, then the packed
    # read), while one row goes through a matrix-vector product that streams them once.  0 on GPUs
    # (GEMMs read weights in place).
    pack_passes: float = 0.0
    # s per forward per stage that the serving runtime spends starting the step, outside any kernel:
    # an RPC per stage (Ray actor call: arguments in, result out).  0 for the published engines of the
    # calibration set (one loop per GPU, no call per step); raypp's CPU runs measure it (`idle_s`).
    call_overhead: float = 0.0
    # s per pipeline hop (activations to the next stage, sampled ids back to stage 0) beyond the link's
    # latency and bytes: the receiving process waking up and taking the message off the transport.
    # 0 for the calibration set (no PP rows but the 405B pair, NCCL on NVLink); measured on raypp's CPU.
    hop_overhead: float = 0.0
    # How many devices' worth of memory bandwidth one host supplies to its workers together: CPU
    # workers on one socket share its memory bus, so n streaming at once each get host_streams / n
    # of one's rate (at most 1).  0: every device streams its own memory (GPU HBM).
    host_streams: float = 0.0
    # Cores one host gives its workers: when more workers compute at once than there are cores
    # (TP2 x PP2 on two cores), the OS time-slices them and each forward takes busy / host_cores
    # times as long.  0: every worker has a device of its own (GPUs).
    host_cores: int = 0


@dataclass(frozen=True)
class Device:
    name: str
    memory: float                 # bytes
    bandwidth: float              # bytes/s, HBM (or DRAM) peak
    flops: dict[str, float]       # dtype -> dense FLOP/s; a dtype absent runs at the bf16 rate
    intra_link: str               # Link name between devices of one node
    network: str                  # Link name between nodes (default)
    source: str
    kind: str = "gpu"             # "gpu" | "cpu"
    efficiency: Efficiency = field(default_factory=Efficiency)
    aliases: tuple[str, ...] = ()


# Links.  NVLink/PCIe per-direction bandwidth = vendor's bidirectional figure / 2.
# Latencies are the small-message cost of one NCCL collective between two ranks
# (order of the NCCL-tests all-reduce latency on such links, ~5-30 us); they matter
# only at decode batch sizes and are checked by the ITL calibration points.
LINKS: dict[str, Link] = {l.name: l for l in [
    Link("nvlink3", "nvlink", 300 * GB, 6e-6, "A100 datasheet: NVLink 3, 600 GB/s bidirectional per GPU"),
    Link("nvlink4", "nvlink", 450 * GB, 6e-6, "H100/H200 datasheet: NVLink 4, 900 GB/s bidirectional per GPU"),
    Link("pcie4", "pcie", 32 * GB, 15e-6, "PCIe 4.0 x16: 64 GB/s bidirectional (PCI-SIG)"),
    Link("pcie5", "pcie", 64 * GB, 15e-6, "PCIe 5.0 x16: 128 GB/s bidirectional (PCI-SIG); H100 PCIe datasheet"),
    Link("ib-ndr", "network", 50 * GB, 20e-6, "InfiniBand NDR 400 Gb/s per port, one port per GPU (DGX H100 rail design)"),
    Link("ib-hdr", "network", 25 * GB, 20e-6, "InfiniBand HDR 200 Gb/s per port, one port per GPU (DGX A100 design)"),
    Link("eth-400g", "network", 50 * GB, 30e-6, "400 GbE (RoCE) per GPU: 400 Gb/s = 50 GB/s"),
    Link("eth-100g", "network", 12.5 * GB, 40e-6, "100 GbE per node shared by its GPUs: 100 Gb/s = 12.5 GB/s"),
    Link("gloo-loopback", "loopback", 1.47 * GB, 0.31e-3,
         "measured here: gloo all-reduce between 2 processes, 1 KiB -> 0.31-0.36 ms, 4 MiB -> 3.2-4.5 ms "
         "(median of 30, quiet 2-core VM, 3 runs; see cpu_probe.py)"),
    # raypp's CPU TP ranks on one host all-reduce through shared memory (parallel/shm_allreduce.py).
    Link("shm-loopback", "loopback", 6.2 * GB, 85e-6,
         "measured here: raypp's shared-memory all-reduce between 2 ranks, 1-32 x 1024 fp32 -> 82-104 us, "
         "256 x 1024 (1 MiB) -> 253 us (quiet machine, benchmarks/results/tp_allreduce.json)"),
]}

_A100 = "NVIDIA A100 Tensor Core GPU datasheet (nvidia.com, 2021): BF16/FP16 312 TFLOPS dense"
_H100 = "NVIDIA H100 Tensor Core GPU datasheet (nvidia.com, 2023)"
# raypp's CPU runs before any deployment is measured: what cpu_probe.py and the runtime's
# benchmarks read on this host (docs/planner.md, "The CPU profile").  The peaks of the device
# entry are the measured rates, so the fractions are 1.
CPU_PROBED = Efficiency(bw=1.0, flops16=1.0, flops8=1.0, link=1.0,
                        # cpu_probe: a `tiny` decode layer through raypp's CPU ops, beyond its bytes
                        layer_overhead_prefill=60e-6, layer_overhead_decode=60e-6,
                        step_overhead=0.44e-3,   # ray_call_cost.json: the driver's CPU per step over the step socket
                        # a decode step of `small` is weights + b x FLOPs (48 / 29 / 21 ms at b = 32 / 16 / 8):
                        # the CPU does not hide one behind the other; weights packed once at load time
                        # (kernels/cpu_linear.py), so a multi-row product reads them once (cpu_probe: ~0)
                        overlap=0.0, pack_passes=0.0,
                        call_overhead=0.08e-3,   # ray_call_cost.json: a step's round trip over the step socket
                        hop_overhead=0.6e-3,     # pipeline_fill_onednn: a result reaches the driver 0.6 ms after
                                                 # the last stage ends
                        host_streams=1.283,      # cpu_probe: two one-row streams at once move 1.13-1.34x one's bytes (median)
                        host_cores=2)
# What `live_fit.fit` makes of raypp's own measured runs, starting from CPU_PROBED: the calibration
# phases recorded in benchmarks/results/planner_vs_measured.json (TP2 of `small`, loads 1, 4, 16, three
# rounds; `python -m raypp.planner.cpu_fit`, and tests/test_planner_perf.py refits them).  The runs move
# the FLOP rate of serving's product mix (0.71 of the 2048-row peak), the per-layer costs, the per-step
# cost (0.43 ms: the driver's CPU per step that ray_call_cost measured, 0.44), the call cost (a stage's
# idle time per step) and the all-reduce (0.22 of the quiet 2-rank rate: ranks wait for each other);
# bw stays at the probe's one-row rate (the fit's ceiling).  No PP in the calibration: the hop cost is
# CPU_PROBED's.
_CPU_EFF = replace(CPU_PROBED, flops16=0.7071, link=0.2154, layer_overhead_prefill=54.93e-6,
                   layer_overhead_decode=27.7e-6, step_overhead=0.4332e-3, call_overhead=0.4323e-3)

DEVICES: dict[str, Device] = {d.name: d for d in [
    Device("a100-sxm-40gb", 40 * GB, 1555 * GB, {"bf16": 312 * T, "fp16": 312 * T, "fp32": 19.5 * T},
           "nvlink3", "ib-hdr", _A100 + "; HBM2 1,555 GB/s", aliases=("a100-40gb", "a100-sxm4-40gb")),
    Device("a100-sxm-80gb", 80 * GB, 2039 * GB, {"bf16": 312 * T, "fp16": 312 * T, "fp32": 19.5 * T},
           "nvlink3", "ib-hdr", _A100 + "; HBM2e 2,039 GB/s", aliases=("a100", "a100-80gb", "a100-sxm", "a100-sxm4-80gb")),
    Device("a100-pcie-40gb", 40 * GB, 1555 * GB, {"bf16": 312 * T, "fp16": 312 * T, "fp32": 19.5 * T},
           "pcie4", "eth-100g", _A100 + "; HBM2 1,555 GB/s, PCIe Gen4", aliases=("a100-pcie4-40gb",)),
    Device("a100-pcie-80gb", 80 * GB, 1935 * GB, {"bf16": 312 * T, "fp16": 312 * T, "fp32": 19.5 * T},
           "pcie4", "eth-100g", _A100 + "; HBM2e 1,935 GB/s, PCIe Gen4", aliases=("a100-pcie",)),
    Device("h100-sxm", 80 * GB, 3350 * GB, {"bf16": 989.4 * T, "fp16": 989.4 * T, "fp8": 1978.9 * T, "fp32": 67 * T},
           "nvlink4", "ib-ndr", _H100 + ": SXM5 HBM3 3.35 TB/s, BF16 989 / FP8 1,979 TFLOPS dense",
           aliases=("h100", "h100-sxm5", "h100-80gb", "h100-sxm-80gb")),
    Device("h100-pcie", 80 * GB, 2000 * GB, {"bf16": 756 * T, "fp16": 756 * T, "fp8": 1513 * T, "fp32": 51 * T},
           "pcie5", "eth-400g", _H100 + ": PCIe HBM2e 2.0 TB/s, BF16 756 / FP8 1,513 TFLOPS dense",
           aliases=("h100-pcie-80gb",)),
    Device("h200", 141 * GB, 4800 * GB, {"bf16": 989.4 * T, "fp16": 989.4 * T, "fp8": 1978.9 * T, "fp32": 67 * T},
           "nvlink4", "ib-ndr", "NVIDIA H200 Tensor Core GPU datasheet (2024): 141 GB HBM3e, 4.8 TB/s; "
           "compute as H100 SXM", aliases=("h200-sxm", "h200-141gb")),
    Device("l4", 24 * GB, 300 * GB, {"bf16": 121 * T, "fp16": 121 * T, "fp8": 242.5 * T, "fp32": 30.3 * T},
           "pcie4", "eth-100g", "NVIDIA L4 datasheet (2023): 24 GB GDDR6 300 GB/s; BF16 242 / FP8 485 TFLOPS "
           "with sparsity, halved for dense", aliases=("l4-24gb",)),
    Device("l40s", 48 * GB, 864 * GB, {"bf16": 362.05 * T, "fp16": 362.05 * T, "fp8": 733 * T, "fp32": 91.6 * T},
           "pcie4", "eth-100g", "NVIDIA L40S datasheet (2023): 48 GB GDDR6 864 GB/s; BF16 362 / FP8 733 TFLOPS dense",
           aliases=("l40s-48gb",)),
    # raypp's own CPU runs: one worker = one core of this 2-core AMD EPYC VM.
    # Measured with raypp.planner.cpu_probe (torch 2.13, 1 thread, best of 5; median of 3 runs on a quiet
    # machine), every product through raypp.model.ops.linear on weights packed for oneDNN as the model
    # holds them (the MLP's gate and up through ops.swiglu): one row through the linear layers of `small`
    # (390 MB) 33.3 GB/s, its FLOPs taken out; 2048-row products 243 GFLOP/s fp32, 442 bf16.
    # Memory: 23 GB of RAM on the VM, ~10 GB per worker once the OS and Ray take theirs.
    Device("cpu-epyc-2core", 10 * GB, 33.3 * GB, {"fp32": 243e9, "bf16": 442e9},
           "shm-loopback", "gloo-loopback", "measured on this machine, see cpu_probe.py and docs/planner.md",
           kind="cpu", efficiency=_CPU_EFF, aliases=("cpu",)),
]}


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(" ", "-")


def get_device(name: str, extra: dict[str, Device] | None = None) -> Device:
    catalog = {**DEVICES, **(extra or {})}
    key = _norm(name)
    for dev in catalog.values():
        if key == dev.name or key in dev.aliases:
            return dev
    known = ", ".join(sorted(catalog))
    raise UserError(f"unknown GPU {name!r}; known: {known} (add your own with --hardware FILE.yaml)")


def get_link(name: str, extra: dict[str, Link] | None = None) -> Link:
    catalog = {**LINKS, **(extra or {})}
    if _norm(name) not in catalog:
        raise UserError(f"unknown link/network {name!r}; known: {', '.join(sorted(catalog))}")
    return catalog[_norm(name)]


def _efficiency(path, gpu: str, values) -> Efficiency:
    """A hardware file's `efficiency:` mapping as numbers of each field's type (a hand-written
    `5e-05` is a string to YAML 1.1), every unknown field named."""
    defaults = Efficiency()
    try:
        return replace(defaults, **{k: type(getattr(defaults, k))(v) for k, v in dict(values).items()})
    except (AttributeError, TypeError, ValueError) as e:
        known = ", ".join(f.name for f in fields(Efficiency))
        raise UserError(f"{path}: gpu {gpu!r}: efficiency takes numbers for {known} ({e})") from None


def load_yaml(path: str | Path) -> tuple[dict[str, Device], dict[str, Link]]:
    """Read user hardware.  Units are the datasheet's: GB, GB/s, TFLOPS, microseconds.

        links:
          my-ib: {kind: network, bandwidth_gbs: 50, latency_us: 20, source: "..."}
        gpus:
          my-gpu: {memory_gb: 96, bandwidth_gbs: 4000, tflops: {bf16: 900, fp8: 1800},
                   intra_link: nvlink4, network: my-ib, source: "vendor datasheet"}
    """
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"cannot read hardware file {path}: {e}") from None
    links = {}
    for name, d in (data.get("links") or {}).items():
        try:
            links[_norm(name)] = Link(_norm(name), d.get("kind", "network"), float(d["bandwidth_gbs"]) * GB,
                                      float(d.get("latency_us", 20)) * 1e-6, str(d["source"]))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path}: link {name!r} needs bandwidth_gbs and source ({e})") from None
    devices = {}
    for name, d in (data.get("gpus") or {}).items():
        try:
            dev = Device(_norm(name), float(d["memory_gb"]) * GB, float(d["bandwidth_gbs"]) * GB,
                         {k: float(v) * T for k, v in d["tflops"].items()}, _norm(d.get("intra_link", "pcie4")),
                         _norm(d.get("network", "eth-100g")), str(d["source"]), kind=d.get("kind", "gpu"))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"{path}: gpu {name!r} needs memory_gb, bandwidth_gbs, tflops and source ({e})") from None
        if "efficiency" in d:
            dev = replace(dev, efficiency=_efficiency(path, name, d["efficiency"]))
        for ln in (dev.intra_link, dev.network):
            get_link(ln, links)
        devices[dev.name] = dev
    return devices, links
