"""Dynamic evaluation of the output layer: the model's last projection learns the session as it goes.

Why: the session cache (adapt.py) learns what the player repeats, token for token; it cannot learn
how this player differs from the training data in situations it has not seen verbatim (louder
than the renditions, more pedal, denser chords). Dynamic evaluation (Krause, Kahembwe, Murray and
Renals, 2018) takes a gradient step on each token as it is revealed. Here only the output layer
moves: a correction `delta` (vocab x channels) is added to the tied projection E, so the logits are

    h (E + delta)^T + bias

with `h` the normalised last hidden state. After the player's token y, one normalised
least-mean-squares step on its log-likelihood:

    delta -= rate / (h . h) * (p - onehot(y)) h^T

where p is the distribution the step had (with the correction so far): at the same hidden state,
y's logit rises by rate (1 - p_y) nats. The engine projects by the session's copy E + delta, so a
step costs nothing more. The update touches the whole copy (400 KB for the small model, out of
the caches after a step has streamed the model's weights): on the CPU up to PENDING updates wait
as rank-one terms added to the logits of the steps after them (a few dot products), and are folded
into the copy together, in one matrix product, or when the engine is idle (`Engine.prepare`).

Chosen offline on the live engine's hidden states (16:32 window, the learnt cache mixed in, experts
and follows off; piano model card, "The output layer learns the session"): the piano-like set
3.521 -> 3.371 nats/token (rate 0.5; 0.3: 3.385, 1.0: 3.386), the rendered validation split 1.629
-> 1.594, the score test split 0.505 -> 0.507. Any decay of the correction toward 0 cost more than
it saved (0.999 per token: 3.465 on the piano-like set). Only the player's tokens teach it: for a token the model drew
from p itself the step's expectation is zero, so its own tokens would add noise only.

Threads: owned by the engine's thread (Engine keeps it in step with its stream).
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

from liveperceiver.core.model import output_logits

RATE = 0.5  # the normalised step at play's adapt 1 (adapt x RATE): chosen on the piano-like set
HISTORY = 512  # learning steps a rollback can undo (live rollbacks reach back a few dozen tokens)
PENDING = 16  # CPU: updates kept as rank-one terms before they are folded into the copy at once


class OutputHead:
    """The engine's output: the output norm, then the projection onto the token embeddings: the
    model's tied embedding (model.output_logits), or while adaptation is on the session's learnt
    copy of it (`learnt`, DynamicOutput.project). Keeps the normalised hidden states of its last call
    (`hidden`, (rows, channels)).

    Threads: owned by the engine's thread."""

    def __init__(self, norm, embedding: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.norm = norm
        self.embedding = embedding.detach()  # the model's own, not a copy (no autograd: inference only)
        self.bias = None if bias is None else bias.detach()
        self.learnt: DynamicOutput | None = None
        self.hidden: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        """The projection in use (the CUDA graph is keyed on it)."""
        return self.embedding if self.learnt is None else self.learnt.weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.hidden = self.norm(x) if self.norm is not None else x
        if self.learnt is not None:
            return self.learnt.project(self.hidden)
        return output_logits(self.hidden, None, self.embedding, self.bias)

    def model_logits(self) -> torch.Tensor:
        """The last call's logits as the model alone gives them (eval's model-alone figure)."""
        return output_logits(self.hidden, None, self.embedding, self.bias)


class DynamicOutput:
    """The session's copy of the output projection (`weight`, float32: the model's tied embedding
    plus the learnt correction; see the module's docstring), on the engine's device.

    It learns at the steps adapt.CacheWeight judges at: the player's token that comes where a step
    predicted it teaches it from that step's probabilities and hidden state, which CacheWeight keeps
    (`observe`); a token no step predicted is taught from the latent window's rows later (`learn`,
    called by CacheWeight.judge_from_rows). A rollback undoes the steps of the tokens it drops
    (`truncate`). On the CPU the last updates wait as rank-one terms (`_errors`, `_hiddens`: the
    scaled error and the hidden state, `pending` of them) until `flush` folds them in; elsewhere each
    is a few device operations at once, with no read back.

    Threads: owned by the engine's thread."""

    def __init__(self, head: OutputHead) -> None:
        self.head = head
        embedding = head.embedding
        vocab_size, channels = embedding.shape
        # normal tensors even when the engine is built in inference mode: append and truncate,
        # which may run outside it, update them in place
        with torch.inference_mode(False):
            # the same layout as the embedding (the engine stores it for a fast projection)
            self.weight = embedding.float().clone(memory_format=torch.preserve_format)
            self._errors = torch.zeros(PENDING, vocab_size)
            self._hiddens = torch.zeros(PENDING, channels)
        self.on_cpu = self.weight.device.type == "cpu"
        self._errors_np, self._hiddens_np = self._errors.numpy(), self._hiddens.numpy()  # the same memory
        self.pending = 0
        # (position, scaled error, hidden state) of each step: numpy arrays on the CPU, tensors elsewhere
        self._history: deque[tuple[int, np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]] = deque(maxlen=HISTORY)
        self.learnt = 0  # tokens learnt from

    @property
    def delta(self) -> torch.Tensor:
        """The learnt correction (vocab, channels), waiting updates included."""
        count = self.pending
        return self.weight - self.head.embedding.float() + self._errors[:count].T @ self._hiddens[:count]

    def reset(self) -> None:
        self.weight.copy_(self.head.embedding)
        self.pending = 0
        self._history.clear()
        self.learnt = 0

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of `hidden` (rows, channels) with the correction as it is now."""
        logits = output_logits(hidden.to(self.weight.dtype), None, self.weight, self.head.bias)
        if self.pending:  # + sum over the waiting updates of (hidden . h_j) e_j, into the fresh logits
            count = self.pending
            logits.addmm_(hidden.float() @ self._hiddens[:count].T, self._errors[:count])
        return logits

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits (vocab,) of one hidden state (channels,)."""
        return self.project(hidden[None])[0].float()

    def observe(self, position: int, token: int, rate: float, step: tuple) -> None:
        """The player's `token` came at `position`: learn from it if a step predicted it there.
        `step`: (the distribution it had, numpy or a tensor; its hidden state), or Nones
        (adapt.CacheWeight.predicted)."""
        probs, hidden = step
        if rate and probs is not None and hidden is not None:
            self.learn(position, probs, hidden, token, rate)

    def learn(self, position: int, probs, hidden: torch.Tensor, token: int, rate: float) -> None:
        """One step on the player's `token` at `position`, from the distribution `probs` the model had
        there (with the correction; numpy or a tensor) and the hidden state it came from."""
        if self.on_cpu:  # numpy: torch's calls on a few hundred numbers cost more than their work
            h = hidden.detach().float().numpy()
            scale = np.float32(rate / float(h.dot(h)))
            error = np.multiply(probs.numpy() if isinstance(probs, torch.Tensor) else probs, -scale, dtype=np.float32)
            error[token] += scale
            if self.pending == PENDING:
                self.flush()
            self._errors_np[self.pending] = error
            self._hiddens_np[self.pending] = h
            self.pending += 1
        else:
            h = hidden.detach().float()
            error = probs.float().clone()
            error[token] -= 1.0
            error *= -rate / h.dot(h)  # a device scalar: no read back
            self.weight.addr_(error, h)
        self._history.append((position, error, h))
        self.learnt += 1

    def flush(self) -> None:
        """Fold the waiting updates into the copy: one (vocab x k) (k x channels) product."""
        if self.pending:
            count = self.pending
            self.weight.addmm_(self._errors[:count].T, self._hiddens[:count])
            self.pending = 0

    def truncate(self, length: int) -> None:
        """A rollback to `length` tokens: the steps learnt from tokens at `length` or later are undone
        (a waiting one exactly, a folded one within float32 rounding)."""
        if length == 0:
            self.reset()
            return
        while self._history and self._history[-1][0] >= length:
            _, error, h = self._history.pop()
            if self.pending:  # the newest updates are the waiting ones
                self.pending -= 1
            else:
                self.weight.addr_(torch.as_tensor(error), torch.as_tensor(h), alpha=-1.0)
            self.learnt -= 1
