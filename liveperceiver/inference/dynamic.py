"""Dynamic evaluation of the output layer: the model's last projection learns the session as it goes.

Why: the session cache (adapt.py) learns what the player repeats, token for token; it cannot learn
how this player differs from the training data in situations it has not seen verbatim (louder
than the renditions, more pedal, denser chords). Dynamic evaluation (Krause, Kahembwe, Murray and
Renals, 2018) takes a gradient step on each token as it is revealed. Here only the output layer
moves: a correction `delta` (vocab x channels) is added to the tied projection, so the logits are

    logits + delta @ h

with `h` the normalised last hidden state the logits were projected from. After the player's token
y, one normalised least-mean-squares step on its log-likelihood:

    delta -= rate / (h . h) * (p - onehot(y)) h^T

where p is the adjusted distribution the step had: at the same hidden state, y's logit rises by
rate (1 - p_y) nats. The hidden states are those the model computed anyway; a step costs a
matrix-vector product, and a player's token an outer product (vocab x channels: about 100,000
multiply-adds for the small model).

Chosen offline on the live engine's hidden states (16:32 window, the learnt cache mixed in, experts
and follows off; model card "Dynamic output"): the piano-like set 3.521 -> 3.371 nats/token (rate
0.5; 0.3 3.386, 1.0 3.386), the rendered validation split 1.629 -> 1.60, the score test split 0.505
-> 0.507. Any decay of `delta` toward 0 cost more than it saved (0.999 per token: 3.465 on the
piano-like set). Only the player's tokens teach it: for a token the model drew from p itself the
step's expectation is zero, so its own tokens would add noise only.

Threads: owned by the engine's thread (Engine keeps it in step with its stream).
"""

from __future__ import annotations

from collections import deque

import torch

from liveperceiver.core.model import output_logits

RATE = 0.5  # the normalised step at play's adapt 1 (adapt x RATE): chosen on the piano-like set
HISTORY = 512  # learning steps a rollback can undo (live rollbacks reach back a few dozen tokens)
STEPS_KEPT = 512  # steps remembered for a player's token to come (more than any look-ahead samples)


class OutputHead:
    """The engine's output: the output norm, then the projection onto the token embeddings by
    `weight`, which is the model's tied embedding (model.output_logits), or while adaptation is on
    the session's learnt copy of it (DynamicOutput.weight): the correction costs a step nothing.
    Keeps the normalised hidden states of its last call (`hidden`, (rows, channels)).

    Threads: owned by the engine's thread."""

    def __init__(self, norm, embedding: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.norm, self.embedding, self.bias = norm, embedding, bias
        self.weight = embedding
        self.hidden: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.hidden = self.norm(x) if self.norm is not None else x
        return self.project(self.hidden, self.weight)

    def project(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """`hidden` (rows, channels) onto `weight`'s rows, in the weight's precision."""
        return output_logits(hidden.to(weight.dtype), None, weight, self.bias)

    def model_logits(self) -> torch.Tensor:
        """The last call's logits as the model alone gives them (eval's `nll` beside the system's)."""
        return self.project(self.hidden, self.embedding)


class DynamicOutput:
    """The session's copy of the output projection (`weight`, float32, the model's tied embedding
    plus the learnt correction, `delta`; see the module's docstring), on the engine's device. On the
    CPU the error and its scale are numpy arithmetic on 389 numbers, then one rank-one update in
    place (torch's calls on small tensors cost more than their work); elsewhere the same as device
    operations, with no read back.

    Like adapt.CacheWeight: a step's logits (with the correction so far) and hidden state are
    remembered (`remember`), and the player's token that comes at that position teaches it
    (`observe`); a token no step predicted is taught from the latent window's rows later (`learn`,
    called by CacheWeight.judge_from_rows). A rollback undoes the steps of the tokens it drops
    (`truncate`)."""

    def __init__(self, head: OutputHead) -> None:
        self.head = head
        # the same layout as the embedding (the engine stores it for a fast projection)
        self.weight = head.embedding.detach().float().clone(memory_format=torch.preserve_format)
        self.on_cpu = self.weight.device.type == "cpu"
        self._steps: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # position -> (logits, hidden)
        self._history: deque[tuple[int, object, torch.Tensor, object]] = deque(maxlen=HISTORY)
        self.learnt = 0  # tokens learnt from

    @property
    def delta(self) -> torch.Tensor:
        """The learnt correction (vocab, channels)."""
        return self.weight - self.head.embedding.detach().float()

    def reset(self) -> None:
        self.weight.copy_(self.head.embedding)
        self._steps.clear()
        self._history.clear()
        self.learnt = 0

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits of `hidden` (channels,) with the correction as it is now."""
        return self.head.project(hidden[None], self.weight)[0].float()

    def remember(self, position: int, logits: torch.Tensor, hidden: torch.Tensor) -> None:
        """The step predicting stream `position`: its `logits` (projected by `weight`) and `hidden`,
        for the player's token that may come there."""
        self._steps[position] = (logits.float().clone(), hidden)  # the caller may mask its logits in place
        if len(self._steps) > STEPS_KEPT:  # a long answer: the oldest step is far behind what plays
            del self._steps[next(iter(self._steps))]

    def observe(self, position: int, token: int, rate: float) -> bool:
        """The player's `token` came at `position`: learn from it if a step predicted it there. Every
        step remembered is dropped (as CacheWeight.observe). False when no step predicted it."""
        step = self._steps.get(position)
        self._steps.clear()
        if not rate:
            return True
        if step is None:
            return False
        logits, hidden = step
        self.learn(position, torch.softmax(logits, -1), hidden, token, rate)
        return True

    def learn(self, position: int, probs: torch.Tensor, hidden: torch.Tensor, token: int, rate: float) -> None:
        """One step on the player's `token` at `position`, from the distribution `probs` the model had
        there (with the correction) and the hidden state it came from."""
        h = hidden.float()
        if self.on_cpu:
            error = probs.float().numpy().copy()
            error[token] -= 1.0
            error = torch.from_numpy(error)
            scale = -rate / float(h.dot(h))
            self.weight.addr_(error, h, alpha=scale)
        else:
            error = probs.float().clone()
            error[token] -= 1.0
            scale = -rate / h.dot(h)  # a device scalar: no read back
            self.weight.addr_(error * scale, h)
        self._history.append((position, error, h, scale))
        self.learnt += 1

    def truncate(self, length: int) -> None:
        """A rollback to `length` tokens: the steps learnt from tokens at `length` or later are undone
        (within float32 rounding), the remembered steps beyond `length` dropped."""
        if length == 0:
            self.reset()
            return
        for stale in [p for p in self._steps if p > length]:
            del self._steps[stale]
        while self._history and self._history[-1][0] >= length:
            _, error, h, scale = self._history.pop()
            if self.on_cpu:
                self.weight.addr_(error, h, alpha=-scale)
            else:
                self.weight.addr_(error * -scale, h)
            self.learnt -= 1
