"""``bnrnn sample RUN``: text from a PTB run's checkpoint, one character at a time.

The model runs in evaluation mode, so every norm uses population statistics, and at time
steps past T_max (the training windows' length) the last step's statistics. A thousand
characters are ten times T_max: this is the paper's Fig. 3b point, seen as text. The
vocabulary comes from the run's ``vocab.json``, so the data set is not needed.

PTB's files write a space between symbols and ``_`` between words; a priming text is
written as plain text (a space between words, a newline for a line end) and converted.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch

from bnrnn.checkpoint import load_checkpoint, load_weights
from bnrnn.config import load_config, read_run_config
from bnrnn.data.ptb import EOL, Vocabulary, shown
from bnrnn.device import resolve_device
from bnrnn.errors import BnrnnError, ConfigError, DataError
from bnrnn.runfolder import checkpoint_file
from bnrnn.tasks import task_class
from bnrnn.tasks.ptb import VOCAB_FILE, language_model

WORD_BREAK = "_"


def symbols_of(text: str) -> list[str]:
    """Plain text -> PTB symbols: a space is the word break ``_``, a newline the line end."""
    return [WORD_BREAK if ch == " " else EOL if ch == "\n" else ch for ch in text]


def text_of(symbols: list[str]) -> str:
    """PTB symbols -> plain text (the inverse of :func:`symbols_of`)."""
    return "".join(" " if s == WORD_BREAK else "\n" if s == EOL else s for s in symbols)


def load_language_model(run_dir: Path, checkpoint: str, device_name: str | None):
    """The run's model (eval mode) and vocabulary; BnrnnError if the run is not a PTB run."""
    cfg = read_run_config(run_dir, "bnrnn sample")
    if device_name is not None:
        cfg.device.name = device_name
    cfg = load_config(cfg)
    task = task_class(cfg.task.kind)
    if not task.language_model:
        raise ConfigError(f"bnrnn sample needs a language-modelling run; {run_dir} trained on {cfg.task.name}")
    vocab_file = run_dir / VOCAB_FILE
    if not vocab_file.is_file():
        raise BnrnnError(f"{vocab_file} is missing: the run's vocabulary is needed to read and write text")
    vocab = Vocabulary.load(vocab_file)
    device = resolve_device(cfg.device.name)
    model = language_model(cfg.model, len(vocab), task.train_length_of(cfg.task))
    path = checkpoint_file(run_dir, checkpoint)
    weights = load_checkpoint(path)["model"]
    trained_on = weights.get("decoder.bias", torch.empty(len(vocab))).shape[0]
    if trained_on != len(vocab):
        raise DataError(f"{vocab_file} holds {len(vocab)} symbols, but {path} was trained on {trained_on}: it is not "
                        f"this run's vocabulary")
    load_weights(model, weights, path, run_dir / "config.yaml")
    # One step per call: the reference's few ops beat a fast path's per-call set-up here.
    model.rnn.backend = "reference"
    return model.to(device).eval(), vocab, device


def sample(model, vocab: Vocabulary, prime: str, length: int, temperature: float, seed: int,
           device: torch.device) -> str:
    """``length`` characters after ``prime``, drawn from softmax(logits / temperature).

    The prime is read first (its symbols must be in the vocabulary: ConfigError naming the
    others); the model then feeds each drawn symbol back in, carrying its state, at time
    step t = len(prime) + i.
    """
    return "".join(sample_pieces(model, vocab, prime, length, temperature, seed, device))


def sample_pieces(model, vocab: Vocabulary, prime: str, length: int, temperature: float, seed: int,
                  device: torch.device, piece: int = 100) -> Iterator[str]:
    """:func:`sample`'s text, ``piece`` characters at a time, as it is drawn (the command
    prints each piece at once; a reader that stops early stops the drawing). The checks run
    before the first piece."""
    if length < 1:
        raise ConfigError(f"--length {length} is invalid: it must be at least 1")
    if not 0 < temperature < math.inf:
        raise ConfigError(f"--temperature {temperature:g} is invalid: it must be a positive finite number (toward 0 "
                          f"the most likely symbol, 1 the model's own distribution)")
    primed = symbols_of(prime) or [EOL]  # no prime: start as after a line end
    unknown = sorted({s for s in primed if s not in vocab.index}, key=primed.index)
    if unknown:
        raise ConfigError(f"the priming text holds symbols outside the run's vocabulary: "
                          f"{', '.join(shown(s) for s in unknown)} ({len(vocab)} symbols, from ptb.char.train.txt)")
    return draw(model, vocab, primed, length, temperature, seed, device, piece)


def draw(model, vocab: Vocabulary, primed: list[str], length: int, temperature: float, seed: int,
         device: torch.device, piece: int) -> Iterator[str]:
    # no_grad around each call, not around the yields: a generator's grad mode would leak
    # into its caller between pieces
    step = torch.no_grad()(model)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.tensor([vocab.index[s] for s in primed], device=device).unsqueeze(1)  # (T, 1)
    logits, state = step(ids)
    t, drawn = len(primed), []
    for _ in range(length):
        # The largest logit is subtracted first: every scaled logit is then <= 0, so a tiny
        # temperature (1e-320) gives the argmax, not an overflow to NaN probabilities.
        last = logits[-1, 0].double().cpu()
        probs = torch.softmax((last - last.max()) / temperature, dim=0)
        token = int(torch.multinomial(probs, 1, generator=generator))
        drawn.append(vocab.symbols[token])
        if len(drawn) == piece:
            yield text_of(drawn)
            drawn = []
        logits, state = step(torch.tensor([[token]], device=device), state, t)
        t += 1
    if drawn:
        yield text_of(drawn)


def sample_run(run_dir: str | Path, prime: str = "", length: int = 1000, temperature: float = 1.0, seed: int = 0,
               checkpoint: str = "best", device_name: str | None = None) -> str:
    return "".join(sample_run_pieces(run_dir, prime, length, temperature, seed, checkpoint, device_name))


def sample_run_pieces(run_dir: str | Path, prime: str = "", length: int = 1000, temperature: float = 1.0,
                      seed: int = 0, checkpoint: str = "best", device_name: str | None = None) -> Iterator[str]:
    """:func:`sample_run`'s text as it is drawn (:func:`sample_pieces`)."""
    model, vocab, device = load_language_model(Path(run_dir), checkpoint, device_name)
    return sample_pieces(model, vocab, prime, length, temperature, seed, device)
