"""Time `bnwd verify-invariance`'s two stages on a ResNet-50-sized model.

Issue 3 asks for the time the structural analysis and the numeric verification take for a
ResNet-50-sized model on two CPU cores (and on a GPU when one is lent). torchvision does not
import on the CPU build here, so the model is built in this file: torchvision's ResNet-50
layout (bottleneck blocks [3, 4, 6, 3], widths 64-512, expansion 4, fc 2048x1000: 25.6M
parameters, 161 parameter tensors).

Stages timed separately, each the median of `--repeat` runs, on the same model and input:

  trace         torch.fx symbolic trace (or --trace execution), shapes from one forward pass
  analysis      the abstract interpretation over the traced graph (all parameters)
  verification  the numeric check: float64 on the CPU (float32 with TF32 off on a GPU),
                forward and backward passes counted and printed
  reference     one float64 forward + backward of the model alone (what a pass costs here)

    .venv/bin/python benchmarks/bench_invariance.py                   # 8x3x224x224, ~1-2 min
    .venv/bin/python benchmarks/bench_invariance.py --batch 2 --size 64  # smoke test, seconds

Exit status 1 when the numbers disagree with the graph (they must not on this model), else 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bnwd_cli.graph.analyze import classify_graph
from bnwd_cli.graph.classes import ParamKind
from bnwd_cli.graph.model_file import ExampleInput
from bnwd_cli.graph.trace import TraceMethod, trace_model
from bnwd_cli.graph.verify import Agreement, verify_classification


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * self.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * self.expansion),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet50(nn.Module):
    def __init__(self, layers: tuple[int, ...] = (3, 4, 6, 3), classes: int = 1000) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._stage(64, layers[0], 1)
        self.layer2 = self._stage(128, layers[1], 2)
        self.layer3 = self._stage(256, layers[2], 2)
        self.layer4 = self._stage(512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * Bottleneck.expansion, classes)

    def _stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [Bottleneck(self.inplanes, planes, stride)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def reference_pass(model: nn.Module, x: torch.Tensor, device: torch.device) -> float:
    """One forward + backward of a float64 (GPU: float32) copy, the unit the check is made of."""
    import copy

    dtype = torch.float64 if device.type == "cpu" else torch.float32
    clone = copy.deepcopy(model).to(device=device, dtype=dtype).train()
    inp = x.to(device=device, dtype=dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    clone(inp).sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="Batch size of the input.")
    parser.add_argument("--size", type=int, default=224, help="Input height and width.")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto.")
    parser.add_argument("--trace", default="auto", help="auto, fx or execution.")
    parser.add_argument("--repeat", type=int, default=1, help="Runs per stage (median).")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = ResNet50()
    x = torch.randn(args.batch, 3, args.size, args.size)
    example = ExampleInput((x,))
    params = sum(p.numel() for p in model.parameters())
    tensors = sum(1 for _ in model.parameters())
    threads = torch.get_num_threads()

    # One untimed float32 forward first: the first pass through a model pays one-time costs
    # (allocator growth, kernel selection) that belong to no stage.
    with torch.no_grad():
        model(x)
    trace_s, graph = timed(
        lambda: trace_model(model, example, TraceMethod(args.trace)), args.repeat
    )
    other = TraceMethod.EXECUTION if graph.method.value != "execution trace" else TraceMethod.FX
    other_s, _ = timed(lambda: trace_model(model, example, other), args.repeat)
    analysis_s, classification = timed(lambda: classify_graph(graph), args.repeat)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    reference_s = statistics.median(reference_pass(model, x, device) for _ in range(args.repeat))
    verify_s, report = timed(
        lambda: verify_classification(model, example, classification, device=args.device),
        args.repeat,
    )

    kinds = {k: sum(1 for p in classification.params if p.kind is k) for k in ParamKind}
    print(f"ResNet-50 layout: {params / 1e6:.1f}M parameters in {tensors} tensors")
    print(f"input {tuple(x.shape)}; torch {torch.__version__}, {threads} CPU threads")
    print(f"graph: {len(graph.nodes)} nodes by {graph.method.value}")
    print("classes: " + ", ".join(f"{n} {k.value}" for k, n in kinds.items()))
    print()
    print(f"{'stage':<34}{'seconds':>10}")
    print(f"{'trace: ' + graph.method.value:<34}{trace_s:>10.2f}   (incl. one forward pass)")
    print(f"{'(trace: ' + other.value + ', for comparison)':<34}{other_s:>10.2f}")
    print(f"{'structural analysis':<34}{analysis_s:>10.3f}")
    print(f"{'analysis total':<34}{trace_s + analysis_s:>10.2f}")
    print(
        f"{'numeric verification':<34}{verify_s:>10.2f}   ({report.device}, "
        f"{report.tolerances.dtype}; {report.forward_passes} forward + "
        f"{report.backward_passes} backward passes)"
    )
    print(f"{'one forward+backward (reference)':<34}{reference_s:>10.2f}   (same dtype, device)")
    print()
    print(
        f"agreement: {report.count(Agreement.AGREE)} agree, "
        f"{report.count(Agreement.DISAGREE)} disagree, "
        f"{report.count(Agreement.NO_EVIDENCE)} no evidence, "
        f"{report.count(Agreement.NOT_APPLICABLE)} n/a"
    )
    return 0 if report.agrees else 1


if __name__ == "__main__":
    sys.exit(main())
