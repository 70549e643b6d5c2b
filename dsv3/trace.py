"""The routing trace of a decoding loop: which experts each token chose, and with what gates.

`Routes` observes one MoE gate (it goes in `Gate.observers`, which the gate tells each choice); plain decoding
(generate.py) and speculative decoding (speculative.py) attach one per gate for their loop and stack what they saw.
The MoE itself keeps no trace state.
"""

from __future__ import annotations

import torch


class Routes:
    """The routing trace's observer of one MoE gate, attached for a decoding loop: the top-k expert ids and gates
    of the gate's last forward, each (B, positions, k). It goes in `Gate.observers`, not in a forward hook: in
    torch.compile'd decoding (torch 2.13) a hook registered after the first compile was not called."""

    def __init__(self, batch: int):
        self.batch, self.ids, self.gates = batch, None, None

    def __call__(self, indices: torch.Tensor, gates: torch.Tensor) -> None:
        self.ids = indices.view(self.batch, -1, indices.shape[-1])
        self.gates = gates.view(self.batch, -1, gates.shape[-1])

    @staticmethod
    def attach(moes, batch: int) -> list[Routes]:
        routes = [Routes(batch) for _ in moes]
        for m, r in zip(moes, routes, strict=True):
            m.gate.observers.append(r)
        return routes

    @staticmethod
    def detach(moes, routes: list[Routes]) -> None:
        for m, r in zip(moes, routes, strict=False):
            m.gate.observers.remove(r)

    @staticmethod
    def stack(routes: list[Routes], positions: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(expert ids, gates) of every observed layer at `positions`, each (layers, B, positions, k)."""
        return (torch.stack([r.ids[:, positions] for r in routes]),
                torch.stack([r.gates[:, positions].float() for r in routes]))
